"""Frequency tables of the real Kaggle styles.csv (44,446 lines), read once from the CSV files in `counts/`.

Counts, not shares, so the files read like the source; the generator normalises them. Row order is part of the data:
sampling draws by position, so reordering a file changes every generated dataset.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType

ArticleCount = tuple[str, str, str, str, int]  # gender, masterCategory, subCategory, articleType, rows


def _read(name: str, *columns: str) -> list[list[str]]:
    """The rows of counts/<name>.csv below its header, which must be exactly `columns`."""
    path = resources.files("fashion_tagger.data.synthetic") / "counts" / f"{name}.csv"
    header, *rows = csv.reader(path.read_text(encoding="utf-8").splitlines())
    if header != list(columns) or any(len(row) != len(columns) for row in rows):
        raise ValueError(f"{path}: every row must have the columns {', '.join(columns)}")
    return rows


def _counts(column: str) -> Mapping[str, int]:
    """value -> rows of one column, from counts/<column>.csv."""
    return MappingProxyType({value: int(n) for value, n in _read(column, column, "rows")})


@cache
def articles() -> tuple[ArticleCount, ...]:
    """Rows per (gender, masterCategory, subCategory, articleType): drawn jointly, the hierarchy stays consistent."""
    rows = _read("articles", "gender", "masterCategory", "subCategory", "articleType", "rows")
    return tuple((g, m, s, a, int(n)) for g, m, s, a, n in rows)


@cache
def usage_by_article() -> Mapping[str, Mapping[str, int]]:
    """articleType -> usage -> rows (literal NA and empty usages excluded)."""
    out: dict[str, dict[str, int]] = {}
    for article, usage, n in _read("usage", "articleType", "usage", "rows"):
        out.setdefault(article, {})[usage] = int(n)
    return MappingProxyType({article: MappingProxyType(counts) for article, counts in out.items()})


@cache
def colour_counts() -> Mapping[str, int]:
    return _counts("baseColour")


@cache
def season_counts() -> Mapping[str, int]:
    return _counts("season")


@cache
def year_counts() -> Mapping[int, int]:
    return MappingProxyType({int(year): n for year, n in _counts("year").items()})


@cache
def brand_counts() -> Mapping[str, int]:
    """Brand prefixes of productDisplayName (the words before the gender word), most frequent first."""
    return _counts("brand")
