"""The Kaggle Fashion Product Images format: the columns of styles.csv and the seven tagged attributes."""

from __future__ import annotations

# What the model tags; `year` and `productDisplayName` stay in the clean table for lineage only.
ATTRIBUTES: tuple[str, ...] = (
    "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage",
)

# Column order of the published styles.csv: the attributes, with `year` before `usage`.
STYLE_COLUMNS: tuple[str, ...] = ("id", *ATTRIBUTES[:6], "year", ATTRIBUTES[6], "productDisplayName")

NONE_LABEL = "None"
IGNORE_INDEX = -1  # encoded value of a 'None' label: masked in loss and metrics
