"""A generated dataset in the exact Kaggle layout (styles.csv + images/<id>.jpg) with the real file's quirks.

Labels follow the real class frequencies (synth_tables); every attribute is drawn into the picture (silhouette,
fill colour, texture, marks) so a small CNN can learn it, and everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import io
import random
import shutil
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fashion_tagger.core.errors import DataError
from fashion_tagger.core.io import StageResult
from fashion_tagger.core.schema import STYLE_COLUMNS
from fashion_tagger.data.synthetic import tables

SIZES: dict[str, int] = {"small": 1, "full": 30}  # scale over the 60x80 base: full is 1800x2400
BASE_W, BASE_H = 60, 80
JPEG_QUALITY = 90

# Real rates per data line (44,446 lines): quirks are placed at exactly these shares, and at least once each
# from MIN_ROWS_FOR_QUIRKS rows on, so a test-sized dataset still shows every one of them.
MIN_ROWS_FOR_QUIRKS = 200
MALFORMED_RATE = 22 / 44446
NA_RATES = {"usage": 316 / 44446, "baseColour": 15 / 44446, "productDisplayName": 7 / 44446}
EMPTY_RATES = {"season": 21 / 44446, "usage": 1 / 44446, "year": 1 / 44446}
MISSING_IMAGE_RATE = 5 / 44446
GRAYSCALE_RATE = 50 / 6000  # measured on the real images-small sample
ODD_SIZE_RATE = 2 / 6000
DUPLICATE_GROUP_RATE = 652 / 44446
ODD_SIZES = ((60, 79), (60, 60), (60, 72), (55, 80))

# RGB of every real baseColour; 'Multi' is drawn as bands of MULTI_BANDS instead.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "Black": (20, 20, 20),
    "White": (250, 250, 250),
    "Blue": (30, 80, 200),
    "Brown": (120, 70, 30),
    "Grey": (128, 128, 128),
    "Red": (210, 30, 30),
    "Green": (30, 150, 50),
    "Pink": (245, 140, 180),
    "Navy Blue": (20, 30, 90),
    "Purple": (120, 40, 150),
    "Silver": (192, 192, 200),
    "Yellow": (245, 220, 30),
    "Beige": (225, 205, 165),
    "Gold": (212, 175, 55),
    "Maroon": (120, 15, 35),
    "Orange": (250, 130, 20),
    "Olive": (110, 115, 35),
    "Multi": (150, 120, 110),
    "Cream": (250, 240, 205),
    "Steel": (110, 125, 140),
    "Charcoal": (55, 60, 65),
    "Peach": (250, 185, 150),
    "Off White": (240, 235, 225),
    "Skin": (230, 180, 145),
    "Lavender": (180, 160, 225),
    "Grey Melange": (165, 165, 160),
    "Khaki": (190, 170, 110),
    "Magenta": (210, 20, 140),
    "Teal": (0, 120, 120),
    "Tan": (205, 160, 110),
    "Mustard": (210, 165, 20),
    "Bronze": (170, 110, 50),
    "Copper": (185, 95, 50),
    "Turquoise Blue": (40, 200, 210),
    "Rust": (170, 65, 20),
    "Burgundy": (90, 10, 30),
    "Metallic": (160, 165, 175),
    "Coffee Brown": (80, 50, 30),
    "Mauve": (175, 120, 150),
    "Rose": (230, 90, 120),
    "Nude": (235, 200, 175),
    "Sea Green": (45, 160, 110),
    "Mushroom Brown": (150, 125, 105),
    "Taupe": (135, 115, 100),
    "Lime Green": (160, 220, 40),
    "Fluorescent Green": (90, 255, 60),
}
MULTI_BANDS = ((210, 30, 30), (30, 80, 200), (245, 220, 30))
OUTLINE_RGB = (175, 175, 175)
MARK_RGB = (45, 45, 45)

# subCategory -> silhouette family; articleTypes of a family differ in proportions and details.
FAMILY_BY_SUBCATEGORY: dict[str, str] = {
    "Topwear": "top",
    "Loungewear and Nightwear": "top",
    "Apparel Set": "top",
    "Innerwear": "inner",
    "Bottomwear": "bottom",
    "Dress": "dress",
    "Saree": "dress",
    "Shoes": "shoe",
    "Sandal": "sandal",
    "Flip Flops": "sandal",
    "Socks": "socks",
    "Watches": "watch",
    "Bags": "bag",
    "Wallets": "bag",
    "Eyewear": "eyewear",
    "Belts": "belt",
    "Jewellery": "jewel",
    "Cufflinks": "jewel",
    "Headwear": "cap",
    "Ties": "tie",
    "Scarves": "scarf",
    "Stoles": "scarf",
    "Mufflers": "scarf",
    "Fragrance": "bottle",
    "Perfumes": "bottle",
    "Skin": "bottle",
    "Skin Care": "bottle",
    "Hair": "bottle",
    "Bath and Body": "bottle",
    "Lips": "tube",
    "Makeup": "tube",
    "Nails": "tube",
    "Eyes": "tube",
    "Beauty Accessories": "tube",
}

# Display-name nouns where stripping a plural 's' reads wrong.
NOUNS = {"Tshirts": "T-shirt", "Jeans": "Jeans", "Shorts": "Shorts", "Trousers": "Trousers", "Briefs": "Briefs"}
STYLE_WORDS = ("", "", "", "Solid", "Printed", "Striped", "Checked", "Casual", "Slim Fit", "Classic")
GENDER_WORDS = {"Men": "Men", "Women": "Women", "Unisex": "Unisex", "Boys": "Boys", "Girls": "Girls"}


@dataclasses.dataclass
class SynthResult(StageResult):
    out_dir: Path
    rows: int
    images: int
    malformed_lines: int
    missing_images: int
    duplicate_groups: int
    duplicate_files: int
    grayscale: int
    odd_size: int
    literal_na_lines: int
    size: str
    seed: int
    seconds: float


# ---------------------------------------------------------------------------------------------------- labels


def vocabularies() -> dict[str, set[str]]:
    """The real value set of every categorical column (what the generator can write besides NA and empty)."""
    joint = tables.JOINT_COUNTS
    usages = {u for counts in tables.USAGE_BY_ARTICLE.values() for u in counts}
    return {
        "gender": {r[0] for r in joint},
        "masterCategory": {r[1] for r in joint},
        "subCategory": {r[2] for r in joint},
        "articleType": {r[3] for r in joint},
        "baseColour": set(tables.COLOUR_COUNTS),
        "season": set(tables.SEASON_COUNTS),
        "usage": usages,
    }


def _probabilities(counts: Sequence[int]) -> np.ndarray:
    p = np.asarray(counts, dtype=np.float64)
    return p / p.sum()


@cache
def _usage_tables() -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    out = {a: (tuple(c), _probabilities(list(c.values()))) for a, c in tables.USAGE_BY_ARTICLE.items()}
    marginal: dict[str, int] = {}
    for counts in tables.USAGE_BY_ARTICLE.values():
        for u, n in counts.items():
            marginal[u] = marginal.get(u, 0) + n
    out[""] = (tuple(marginal), _probabilities(list(marginal.values())))
    return out


def _quirk_count(rows: int, rate: float) -> int:
    floor = 1 if rows >= MIN_ROWS_FOR_QUIRKS else 0
    return max(round(rows * rate), floor)


def _noun(article: str) -> str:
    if article in NOUNS:
        return NOUNS[article]
    if article.endswith(("sses", "ches", "shes")):
        return article[:-2]
    return article[:-1] if article.endswith("s") and not article.endswith("ss") else article


def _display_name(rng: random.Random, row: dict[str, str], commas: int = 0) -> str:
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
    return tuple(tables.BRAND_COUNTS)


def _sample_labels(rows: int, rng: np.random.Generator) -> list[dict[str, str]]:
    joint = tables.JOINT_COUNTS
    combo_idx = rng.choice(len(joint), size=rows, p=_probabilities([r[4] for r in joint]))
    colours = list(tables.COLOUR_COUNTS)
    colour_idx = rng.choice(len(colours), size=rows, p=_probabilities(list(tables.COLOUR_COUNTS.values())))
    seasons = list(tables.SEASON_COUNTS)
    season_idx = rng.choice(len(seasons), size=rows, p=_probabilities(list(tables.SEASON_COUNTS.values())))
    years = list(tables.YEAR_COUNTS)
    year_idx = rng.choice(len(years), size=rows, p=_probabilities(list(tables.YEAR_COUNTS.values())))
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


def _sample_ids(rows: int, rng: np.random.Generator) -> np.ndarray:
    # Real ids run 1163..60000 in shuffled order; widen the range only when more rows are asked for.
    low, high = 1163, max(60000, 1163 + 2 * rows)
    return rng.choice(np.arange(low, high + 1), size=rows, replace=False)


# ---------------------------------------------------------------------------------------------------- shapes
# A shape is a list of primitives in a unit box (x right, y down, both 0..1):
#   ("poly", points) | ("ellipse", box) | ("rect", box) | ("line", points, width_in_base_pixels)


@cache
def _variant_index() -> dict[tuple[str, str], int]:
    """(subCategory, articleType) -> index within its silhouette family, most frequent first (stable)."""
    totals: dict[tuple[str, str], int] = {}
    for _, _, sub, article, n in tables.JOINT_COUNTS:
        totals[(sub, article)] = totals.get((sub, article), 0) + n
    seen: dict[str, dict[str, int]] = {}
    out = {}
    for sub, article in sorted(totals, key=lambda k: (-totals[k], k)):
        family = FAMILY_BY_SUBCATEGORY.get(sub, "box")
        known = seen.setdefault(family, {})
        out[(sub, article)] = known.setdefault(article, len(known))
    return out


def _detail(kind: int, x0: float, y0: float, x1: float, y1: float) -> list[tuple]:
    """One of four detail marks inside a part's box: none, centre seam, band, pocket."""
    cx = (x0 + x1) / 2
    if kind == 1:
        return [("line", [(cx, y0 + 0.03), (cx, y1 - 0.03)], 1.4)]
    if kind == 2:
        h = (y1 - y0) * 0.12
        return [("rect", (x0, y1 - 2 * h, x1, y1 - h))]
    if kind == 3:
        w, h = (x1 - x0) * 0.22, (y1 - y0) * 0.16
        return [("rect", (cx + w * 0.2, y0 + h, cx + w * 1.2, y0 + 2.2 * h))]
    return []


def _shape(family: str, k: int) -> tuple[list[tuple], list[tuple]]:
    """Body and detail primitives of variant k of a family; a, b, c pick proportions and details."""
    a, b, c = k % 3, k % 4, (k // 3) % 2
    if family == "top":
        length = (0.62, 0.78, 1.0)[a]
        w = (0.24, 0.28, 0.22)[c * 2 if b == 3 else c]
        yb = 0.08 + 0.9 * length
        body = [("poly", [(0.5 - w, 0.08), (0.5 + w, 0.08), (0.5 + w, yb), (0.5 - w, yb)])]
        sl = 0.35 if c == 0 else 0.85
        for s in (-1, 1):
            xs = 0.5 + s * w
            body.append(
                ("poly", [(xs, 0.08), (xs + s * 0.22, 0.08 + sl * 0.6), (xs + s * 0.1, 0.1 + sl * 0.65), (xs, 0.3)])
            )
        return body, [("ellipse", (0.42, 0.04, 0.58, 0.14)), *_detail(b, 0.5 - w, 0.12, 0.5 + w, yb)]
    if family == "dress":
        length = (1.0, 0.8, 0.9)[a]
        flare = (0.42, 0.3, 0.48)[b % 3]
        yb = 0.06 + 0.92 * length
        body = [("poly", [(0.36, 0.06), (0.64, 0.06), (0.5 + flare, yb), (0.5 - flare, yb)])]
        return body, _detail(b, 0.5 - flare / 2, 0.2, 0.5 + flare / 2, yb)
    if family == "bottom":
        length = (1.0, 0.45, 0.85)[a]
        spread = (0.0, 0.08, -0.04)[b % 3]
        yb = 0.14 + 0.84 * length
        body = [("rect", (0.24, 0.04, 0.76, 0.14))]
        body.append(("poly", [(0.24, 0.14), (0.5, 0.14), (0.47, yb), (0.25 - spread, yb)]))
        body.append(("poly", [(0.5, 0.14), (0.76, 0.14), (0.75 + spread, yb), (0.53, yb)]))
        return body, _detail(b, 0.26, 0.04, 0.74, 0.5)
    if family == "inner":
        if a == 0:
            body = [("poly", [(0.18, 0.3), (0.82, 0.3), (0.82, 0.42), (0.58, 0.7), (0.42, 0.7), (0.18, 0.42)])]
        elif a == 1:
            body = [("ellipse", (0.16, 0.3, 0.5, 0.58)), ("ellipse", (0.5, 0.3, 0.84, 0.58))]
            body.append(("line", [(0.3, 0.32), (0.3, 0.1)], 2)), body.append(("line", [(0.7, 0.32), (0.7, 0.1)], 2))
        else:
            body = [("rect", (0.26, 0.22, 0.74, 0.92)), ("line", [(0.32, 0.22), (0.32, 0.05)], 3)]
            body.append(("line", [(0.68, 0.22), (0.68, 0.05)], 3))
        return body, _detail(b, 0.3, 0.32, 0.7, 0.6)
    if family == "shoe":
        heel = (0.0, 0.07, 0.28)[a]
        toe = (0.1, 0.16, 0.04)[b % 3]
        ys = 0.72
        body = [("rect", (0.06, ys, 0.94, ys + 0.08 + heel * 0.3))]
        body.append(("poly", [(0.06, ys - 0.22 - heel), (0.42, ys - 0.2 - heel), (0.94 - toe, ys - 0.1), (0.94, ys)]))
        body.append(("poly", [(0.06, ys - 0.22 - heel), (0.94, ys), (0.06, ys)]))
        if heel > 0.2:
            body.append(("rect", (0.06, ys, 0.16, ys + 0.22)))
        return body, _detail(b, 0.3, ys - 0.2 - heel / 2, 0.7, ys)
    if family == "sandal":
        body = [("rect", (0.08, 0.66, 0.92, 0.74))]
        if a == 0:  # flip flop: a V strap
            body += [("line", [(0.3, 0.66), (0.55, 0.45), (0.8, 0.66)], 3)]
        else:
            for x in (0.3, 0.5, 0.7)[: a + 1]:
                body.append(("line", [(x - 0.08, 0.66), (x + 0.05, 0.42), (x + 0.12, 0.66)], 2.5))
        return body, _detail(b, 0.2, 0.58, 0.8, 0.74)
    if family == "socks":
        length = (0.6, 0.35, 0.8)[a]
        y0 = 0.75 - length
        body = [("poly", [(0.3, y0), (0.58, y0), (0.58, 0.7), (0.8, 0.72), (0.8, 0.88), (0.3, 0.88)])]
        return body, _detail(b, 0.3, y0, 0.58, 0.6)
    if family == "watch":
        r = (0.26, 0.3, 0.22)[a]
        band = (0.18, 0.26, 0.12)[b % 3]
        body = [
            ("rect", (0.5 - band, 0.0, 0.5 + band, 1.0)),
            ("ellipse", (0.5 - r, 0.5 - r * 0.75, 0.5 + r, 0.5 + r * 0.75)),
        ]
        return body, [("line", [(0.5, 0.5), (0.5, 0.5 - r * 0.55), (0.5, 0.5), (0.5 + r * 0.5, 0.5)], 1.5)]
    if family == "bag":
        w, h = ((0.8, 0.5), (0.6, 0.75), (0.9, 0.32))[a]
        w, h = (w * (1.0 - 0.08 * c), h * (1.0 - 0.1 * (b == 3)))
        y1 = 0.92
        body = [
            ("poly", [(0.5 - w / 2 + 0.05, y1 - h), (0.5 + w / 2 - 0.05, y1 - h), (0.5 + w / 2, y1), (0.5 - w / 2, y1)])
        ]
        if b != 1:
            top = y1 - h
            body.append(("line", [(0.35, top), (0.4, top - 0.18), (0.6, top - 0.18), (0.65, top)], 2.5))
        return body, _detail(b, 0.5 - w / 2, y1 - h, 0.5 + w / 2, y1)
    if family == "eyewear":
        r = (0.19, 0.21, 0.17)[a]
        body = [
            ("ellipse", (0.5 - 0.03 - 2 * r, 0.4, 0.47, 0.4 + 1.4 * r)),
            ("ellipse", (0.53, 0.4, 0.53 + 2 * r, 0.4 + 1.4 * r)),
        ]
        body.append(("line", [(0.44, 0.44), (0.56, 0.44)], 2))
        return body, _detail(b, 0.1, 0.4, 0.9, 0.4 + 1.4 * r)
    if family == "belt":
        h = (0.12, 0.09, 0.15)[a]
        body = [("rect", (0.0, 0.5 - h / 2, 1.0, 0.5 + h / 2)), ("rect", (0.12, 0.5 - h, 0.3, 0.5 + h))]
        return body, _detail(b, 0.35, 0.5 - h / 2, 0.95, 0.5 + h / 2)
    if family == "jewel":
        if a == 0:
            body = [("ellipse", (0.28, 0.34, 0.72, 0.66))]
        elif a == 1:
            body = [("ellipse", (0.2, 0.45, 0.4, 0.65)), ("ellipse", (0.6, 0.45, 0.8, 0.65))]
            body += [("line", [(0.3, 0.45), (0.3, 0.3)], 1.5), ("line", [(0.7, 0.45), (0.7, 0.3)], 1.5)]
        else:
            body = [("line", [(0.2, 0.1), (0.5, 0.55), (0.8, 0.1)], 1.5), ("ellipse", (0.4, 0.5, 0.6, 0.72))]
        return body, _detail(b, 0.3, 0.35, 0.7, 0.7)
    if family == "cap":
        top = (0.3, 0.2, 0.35)[a]
        body = [("ellipse", (0.2, top, 0.8, 0.7 + (0.7 - top) * 0.2)), ("rect", (0.2, 0.6, 0.95 - 0.1 * c, 0.68))]
        return body, _detail(b, 0.25, top, 0.75, 0.6)
    if family == "tie":
        w = (0.1, 0.14, 0.07)[a]
        body = [("poly", [(0.5 - w / 2, 0.05), (0.5 + w / 2, 0.05), (0.5 + w, 0.85), (0.5, 0.95), (0.5 - w, 0.85)])]
        return body, _detail(b, 0.5 - w, 0.2, 0.5 + w, 0.8)
    if family == "scarf":
        w = (0.3, 0.22, 0.4)[a]
        body = [("poly", [(0.5 - w, 0.05), (0.5 + w, 0.05), (0.5 + w * 0.8, 0.95), (0.5 - w * 1.2, 0.95)])]
        return body, _detail(b, 0.5 - w, 0.1, 0.5 + w, 0.9)
    if family == "bottle":
        w, h = ((0.3, 0.6), (0.4, 0.4), (0.2, 0.75))[a]
        w *= 1.0 - 0.1 * c
        y0 = 0.95 - h
        body = [("rect", (0.5 - w / 2, y0, 0.5 + w / 2, 0.95)), ("rect", (0.5 - w / 6, y0 - 0.12, 0.5 + w / 6, y0))]
        return body, _detail(b, 0.5 - w / 2, y0, 0.5 + w / 2, 0.95)
    if family == "tube":
        if a == 2:
            body = [("ellipse", (0.2, 0.45, 0.8, 0.75))]
        else:
            w = (0.14, 0.24)[a]
            body = [
                ("rect", (0.5 - w / 2, 0.3, 0.5 + w / 2, 0.9)),
                ("rect", (0.5 - w / 3, 0.15 + 0.1 * c, 0.5 + w / 3, 0.3)),
            ]
        return body, _detail(b, 0.35, 0.4, 0.65, 0.85)
    w, h = ((0.6, 0.6), (0.8, 0.4), (0.45, 0.8))[a]
    body = [("rect", (0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2))]
    return body, _detail(b, 0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2)


@cache
def _season_pattern(season: str, scale: int) -> Image.Image | None:
    """An L mask, a little larger than the image so a random crop jitters the texture's phase."""
    if season == "Summer":
        return None
    h, w = (BASE_H + 8) * scale, (BASE_W + 8) * scale
    yy, xx = np.mgrid[0:h, 0:w] // scale
    if season == "Fall":
        on = (xx + yy) % 6 < 2
    elif season == "Winter":
        on = yy % 4 < 2
    else:
        on = (xx % 5 < 2) & (yy % 5 < 2)
    return Image.fromarray((on * 255).astype(np.uint8), "L")


def _shade(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Darker for light colours, lighter for dark ones, so textures and details stay visible on any fill."""
    if sum(rgb) > 3 * 110:
        return tuple(int(v * (1 - amount)) for v in rgb)
    return tuple(int(v + (255 - v) * amount) for v in rgb)


def _draw_primitives(draw: ImageDraw.ImageDraw, prims, to_px, scale: float, fill, grow: float = 0.0) -> None:
    for prim in prims:
        kind = prim[0]
        if kind == "poly":
            pts = [to_px(p) for p in prim[1]]
            draw.polygon(pts, fill=fill)
            if grow:
                draw.line([*pts, pts[0]], fill=fill, width=max(1, round(2 * grow)))
        elif kind in ("ellipse", "rect"):
            x0, y0 = to_px(prim[1][:2])
            x1, y1 = to_px(prim[1][2:])
            # PIL boxes include their far edge: minus one pixel keeps small and full renders the same shape
            box = (min(x0, x1) - grow, min(y0, y1) - grow, max(x0, x1) + grow - 1, max(y0, y1) + grow - 1)
            (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=fill)
        else:
            width = max(1, round(prim[2] * scale + 2 * grow))
            draw.line([to_px(p) for p in prim[1]], fill=fill, width=width, joint="curve")


def _draw_mark(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r - 1, cy + r - 1)
    if shape == "square":
        draw.rectangle(box, fill=MARK_RGB)
    elif shape == "circle":
        draw.ellipse(box, fill=MARK_RGB)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=MARK_RGB)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=MARK_RGB)
    elif shape == "ring":
        draw.ellipse(box, outline=MARK_RGB, width=max(1, round(r / 2.5)))
    elif shape == "cross":
        w = max(1, round(r / 2))
        draw.line([(cx - r, cy), (cx + r, cy)], fill=MARK_RGB, width=w)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=MARK_RGB, width=w)
    elif shape == "hbar":
        draw.rectangle((cx - r * 1.6, cy - r / 2.5, cx + r * 1.6 - 1, cy + r / 2.5 - 1), fill=MARK_RGB)
    else:  # vbar
        draw.rectangle((cx - r / 2.5, cy - r, cx + r / 2.5 - 1, cy + r - 1), fill=MARK_RGB)


# gender -> corner marks (x, y in base pixels, shape); usage -> a mark at the bottom centre.
GENDER_MARKS = {
    "Men": ((5.5, 5.5, "square"),),
    "Women": ((54.5, 5.5, "circle"),),
    "Unisex": ((5.5, 5.5, "square"), (54.5, 5.5, "circle")),
    "Boys": ((5.5, 74.5, "square"),),
    "Girls": ((54.5, 74.5, "circle"),),
}
USAGE_MARKS = {
    "Casual": "hbar",
    "Sports": "triangle",
    "Ethnic": "diamond",
    "Formal": "square",
    "Smart Casual": "ring",
    "Party": "cross",
    "Travel": "circle",
    "Home": "vbar",
}


def render_image(attrs: dict[str, str], seed: int, scale: int = 1) -> Image.Image:
    """Draw one product: silhouette from sub/articleType, fill from baseColour, texture from season, marks."""
    rng = random.Random(seed)
    w_px, h_px = BASE_W * scale, BASE_H * scale
    canvas = Image.new("RGB", (w_px, h_px), (255, 255, 255))
    mask = Image.new("L", (w_px, h_px), 0)
    draw, mask_draw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)

    family = FAMILY_BY_SUBCATEGORY.get(attrs["subCategory"], "box")
    body, details = _shape(family, _variant_index().get((attrs["subCategory"], attrs["articleType"]), 0))
    size = rng.uniform(0.92, 1.04)
    bw, bh = 42 * size * scale, 56 * size * scale
    x0 = (30 + rng.uniform(-2, 2)) * scale - bw / 2
    y0 = (40 + rng.uniform(-2, 2)) * scale - bh / 2

    def to_px(p):
        return (x0 + p[0] * bw, y0 + p[1] * bh)

    _draw_primitives(draw, body, to_px, scale, OUTLINE_RGB, grow=0.7 * scale)
    _draw_primitives(mask_draw, body, to_px, scale, 255)

    colour = attrs["baseColour"]
    base = COLOUR_RGB[colour]
    fill = tuple(min(255, max(0, v + rng.randint(-6, 6))) for v in base)
    layer = Image.new("RGB", (w_px, h_px), fill)
    if colour == "Multi":
        band = w_px // 3 + 1
        for j, rgb in enumerate(MULTI_BANDS):
            layer.paste(rgb, (j * band, 0, (j + 1) * band, h_px))
    pattern = _season_pattern(attrs["season"], scale)
    if pattern is not None:
        ox, oy = rng.randrange(6) * scale, rng.randrange(6) * scale
        layer.paste(_shade(fill, 0.3), (0, 0), pattern.crop((ox, oy, ox + w_px, oy + h_px)))
    canvas.paste(layer, (0, 0), mask)
    _draw_primitives(draw, details, to_px, scale, _shade(fill, 0.5))

    for mx, my, shape in GENDER_MARKS[attrs["gender"]]:
        _draw_mark(draw, shape, (mx + rng.uniform(-1, 1)) * scale, (my + rng.uniform(-1, 1)) * scale, 2.6 * scale)
    usage_mark = USAGE_MARKS.get(attrs["usage"], "vbar")
    _draw_mark(
        draw, usage_mark, (30 + rng.uniform(-1.5, 1.5)) * scale, (75 + rng.uniform(-0.5, 0.5)) * scale, 2.6 * scale
    )

    # Light sensor noise, on the base grid so a downscaled full image matches the small one.
    noise = np.random.default_rng(seed).integers(-5, 6, size=(BASE_H, BASE_W, 1), dtype=np.int16)
    if scale != 1:
        noise = noise.repeat(scale, axis=0).repeat(scale, axis=1)
    pixels = np.asarray(canvas, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class _Plan:
    malformed: dict[int, int]  # row -> commas in its name
    literal_na: dict[int, list[str]]  # row -> columns written as NA
    empty: dict[int, list[str]]  # row -> columns written empty
    missing_image: set[int]
    grayscale: set[int]
    odd_size: dict[int, tuple[int, int]]
    duplicate_of: dict[int, int]  # member row -> source row whose image (and visual labels) it shares
    duplicate_groups: int


def _plan_quirks(rows: int, rng: np.random.Generator) -> _Plan:
    """Place every quirk on its own rows (disjoint sets), in exact counts derived from the real rates."""
    order = iter(rng.permutation(rows).tolist())

    def take(n: int) -> list[int]:
        return [next(order) for _ in range(n)]

    counts = {
        "malformed": _quirk_count(rows, MALFORMED_RATE),
        "missing_image": _quirk_count(rows, MISSING_IMAGE_RATE),
        "grayscale": _quirk_count(rows, GRAYSCALE_RATE),
        "odd_size": _quirk_count(rows, ODD_SIZE_RATE),
        "groups": _quirk_count(rows, DUPLICATE_GROUP_RATE),
    }
    na_counts = {col: _quirk_count(rows, r) for col, r in NA_RATES.items()}
    empty_counts = {col: _quirk_count(rows, r) for col, r in EMPTY_RATES.items()}
    group_sizes = [2 + int(rng.geometric(0.75)) - 1 for _ in range(counts["groups"])]
    needed = sum(counts.values()) - counts["groups"] + sum(na_counts.values()) + sum(empty_counts.values())
    if needed + sum(group_sizes) > rows:  # tiny datasets: drop the duplicates before anything else
        group_sizes = []

    malformed = {r: (2 if rng.random() < 0.1 else 1) for r in take(counts["malformed"])}
    literal_na: dict[int, list[str]] = {}
    for col, n in na_counts.items():
        for r in take(n):
            literal_na.setdefault(r, []).append(col)
    empty: dict[int, list[str]] = {}
    for col, n in empty_counts.items():
        for r in take(n):
            empty.setdefault(r, []).append(col)
    missing_image = set(take(counts["missing_image"]))
    grayscale = set(take(counts["grayscale"]))
    odd_size = {r: ODD_SIZES[int(rng.integers(len(ODD_SIZES)))] for r in take(counts["odd_size"])}
    duplicate_of = {}
    for size in group_sizes:
        source, *members = take(size)
        duplicate_of.update({m: source for m in members})
    return _Plan(malformed, literal_na, empty, missing_image, grayscale, odd_size, duplicate_of, len(group_sizes))


def _prepare_target(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} already exists and is not empty: remove it or choose another output folder")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():  # left by an interrupted run of ours
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    return tmp


def generate_dataset(out_dir: str | Path, *, rows: int, size: str = "small", seed: int = 0) -> SynthResult:
    """Write out_dir/styles.csv and out_dir/images/<id>.jpg; the folder appears only once complete."""
    started = time.perf_counter()
    if not isinstance(rows, int) or rows < 1:
        raise DataError(f"rows must be an integer >= 1, got {rows!r}")
    if size not in SIZES:
        raise DataError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    out_dir = Path(out_dir)
    scale = SIZES[size]
    rng = np.random.default_rng(seed)
    ids = _sample_ids(rows, rng)
    labels = _sample_labels(rows, rng)
    plan = _plan_quirks(rows, rng)
    visual = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")
    for member, source in plan.duplicate_of.items():
        labels[member].update({k: labels[source][k] for k in visual})

    tmp = _prepare_target(out_dir)
    name_rng = random.Random(seed)
    names = [_display_name(name_rng, labels[i], plan.malformed.get(i, 0)) for i in range(rows)]
    for member, source in plan.duplicate_of.items():
        names[member] = names[source]
    sources = set(plan.duplicate_of.values())
    lines = [",".join(STYLE_COLUMNS)]
    encoded: dict[int, bytes] = {}
    images = 0
    for i in tqdm(range(rows), desc="synth", unit="img", disable=True if rows < 5000 else None):
        values = {"id": str(ids[i]), **labels[i], "productDisplayName": names[i]}
        for col in plan.literal_na.get(i, ()):
            values[col] = "NA"
        for col in plan.empty.get(i, ()):
            values[col] = ""
        lines.append(",".join(values[c] for c in STYLE_COLUMNS))

        if i in plan.missing_image:
            continue
        source = plan.duplicate_of.get(i, i)
        data = encoded.get(source)
        if data is None:
            image = render_image(labels[source], seed * 1_000_003 + source, scale)
            if source in plan.odd_size:
                w, h = plan.odd_size[source]
                image = image.resize((w * scale, h * scale), Image.BILINEAR)
            if source in plan.grayscale:
                image = image.convert("L")
            data = _encode(image)
            if source in sources:
                encoded[source] = data
        (tmp / "images" / f"{ids[i]}.jpg").write_bytes(data)
        images += 1

    (tmp / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return SynthResult(
        out_dir=out_dir,
        rows=rows,
        images=images,
        malformed_lines=len(plan.malformed),
        missing_images=len(plan.missing_image),
        duplicate_groups=plan.duplicate_groups,
        duplicate_files=plan.duplicate_groups + len(plan.duplicate_of),
        grayscale=len(plan.grayscale),
        odd_size=len(plan.odd_size),
        literal_na_lines=len(plan.literal_na),
        size=size,
        seed=seed,
        seconds=round(time.perf_counter() - started, 3),
    )
