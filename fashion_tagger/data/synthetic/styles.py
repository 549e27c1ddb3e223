"""The values of a generated styles.csv: ids, labels drawn at the real class frequencies, display names.

Labels come from the real tables (`tables`), the hierarchy drawn jointly so it stays consistent; display names
read like the real ones, including the unquoted commas that break the real file's lines.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import cache

import numpy as np

from fashion_tagger.data.synthetic import tables

# Display-name nouns where stripping a plural 's' reads wrong.
NOUNS = {"Tshirts": "T-shirt", "Jeans": "Jeans", "Shorts": "Shorts", "Trousers": "Trousers", "Briefs": "Briefs"}
STYLE_WORDS = ("", "", "", "Solid", "Printed", "Striped", "Checked", "Casual", "Slim Fit", "Classic")
GENDER_WORDS = {"Men": "Men", "Women": "Women", "Unisex": "Unisex", "Boys": "Boys", "Girls": "Girls"}


def vocabularies() -> dict[str, set[str]]:
    """The real value set of every categorical column (what the generator can write besides NA and empty)."""
    joint = tables.articles()
    usages = {u for counts in tables.usage_by_article().values() for u in counts}
    return {
        "gender": {r[0] for r in joint},
        "masterCategory": {r[1] for r in joint},
        "subCategory": {r[2] for r in joint},
        "articleType": {r[3] for r in joint},
        "baseColour": set(tables.colour_counts()),
        "season": set(tables.season_counts()),
        "usage": usages,
    }


def _probabilities(counts: Sequence[int]) -> np.ndarray:
    p = np.asarray(counts, dtype=np.float64)
    return p / p.sum()


@cache
def _usage_tables() -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    by_article = tables.usage_by_article()
    out = {a: (tuple(c), _probabilities(list(c.values()))) for a, c in by_article.items()}
    marginal: dict[str, int] = {}
    for counts in by_article.values():
        for u, n in counts.items():
            marginal[u] = marginal.get(u, 0) + n
    out[""] = (tuple(marginal), _probabilities(list(marginal.values())))
    return out


def _noun(article: str) -> str:
    if article in NOUNS:
        return NOUNS[article]
    if article.endswith(("sses", "ches", "shes")):
        return article[:-2]
    return article[:-1] if article.endswith("s") and not article.endswith("ss") else article


def display_name(rng: random.Random, row: dict[str, str], commas: int = 0) -> str:
    """A productDisplayName for the row's labels; commas > 0 writes one of the real unquoted-comma names."""
    brand = rng.choice(_brands())
    gender = GENDER_WORDS[row["gender"]]
    colour, noun = row["baseColour"], _noun(row["articleType"])
    if commas == 0:
        style = rng.choice(STYLE_WORDS)
        return " ".join(w for w in (brand, gender, style, colour, noun) if w)
    # The real broken lines: an unquoted list inside the name ("White, Blue and Orange", "Live, Laugh, Love").
    if commas >= 2:
        return f"{brand} {gender} {colour} Live, Laugh, Love {noun}"
    other = rng.choice([c for c in ("Black", "White", "Blue", "Red", "Grey") if c != colour])
    if row["masterCategory"] != "Accessories" or rng.random() < 0.5:
        return f"{brand} {gender} {colour}, {other} and Orange {noun}"
    return f"{brand} {gender} Formal {colour} {noun}, Cufflink and Pocket Square Combo Set"


@cache
def _brands() -> tuple[str, ...]:
    return tuple(tables.brand_counts())


def sample_labels(rows: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """The label columns of `rows` rows, each column at its real frequency (usage conditional on articleType)."""
    joint = tables.articles()
    combo_idx = rng.choice(len(joint), size=rows, p=_probabilities([r[4] for r in joint]))
    colour_counts, season_counts, year_counts = tables.colour_counts(), tables.season_counts(), tables.year_counts()
    colours = list(colour_counts)
    colour_idx = rng.choice(len(colours), size=rows, p=_probabilities(list(colour_counts.values())))
    seasons = list(season_counts)
    season_idx = rng.choice(len(seasons), size=rows, p=_probabilities(list(season_counts.values())))
    years = list(year_counts)
    year_idx = rng.choice(len(years), size=rows, p=_probabilities(list(year_counts.values())))
    usage_u = rng.random(rows)
    usage_tables = _usage_tables()
    out = []
    for i in range(rows):
        gender, master, sub, article, _ = joint[combo_idx[i]]
        names, p = usage_tables.get(article, usage_tables[""])
        usage = names[min(int(np.searchsorted(np.cumsum(p), usage_u[i])), len(names) - 1)]
        out.append(
            {
                "gender": gender,
                "masterCategory": master,
                "subCategory": sub,
                "articleType": article,
                "baseColour": colours[colour_idx[i]],
                "season": seasons[season_idx[i]],
                "year": str(years[year_idx[i]]),
                "usage": usage,
            }
        )
    return out


def sample_ids(rows: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` distinct product ids in shuffled order."""
    # Real ids run 1163..60000 in shuffled order; widen the range only when more rows are asked for.
    low, high = 1163, max(60000, 1163 + 2 * rows)
    return rng.choice(np.arange(low, high + 1), size=rows, replace=False)
