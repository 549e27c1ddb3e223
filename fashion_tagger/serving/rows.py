"""One row per input, the same way in `predict`, the served model and catalog tagging: each input read into an
image or the reason it cannot be, softmax outputs turned into `<attribute>` + `<attribute>_confidence` columns,
and an `error` column for the inputs that have no tags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd

from fashion_tagger.data.imaging import ImageReadError

if TYPE_CHECKING:
    import torch

    from fashion_tagger.data.labels import LabelSpace

Item = TypeVar("Item")
Result = TypeVar("Result")

IMAGE_COLUMN, PATH_COLUMN = "image", "path"  # the served model's input columns: encoded bytes, or a file path
CONFIDENCE_SUFFIX = "_confidence"
ERROR_COLUMN = "error"  # None for a tagged image, else why it could not be read (its tags stay empty)


def confidence_column(attribute: str) -> str:
    return f"{attribute}{CONFIDENCE_SUFFIX}"


def read_one(read: Callable[[], Result], *, where: str | None = None) -> tuple[Result | None, str | None]:
    """(READ's result, None), or (None, why) when the item cannot be read (an `ImageReadError`, prefixed by
    WHERE, e.g. "row 3"). Any other exception is a bug and propagates."""
    try:
        return read(), None
    except ImageReadError as exc:
        return None, f"{where}: {exc}" if where else str(exc)


def read_each(items: Iterable[Item], read: Callable[[Item], Result]) -> tuple[list[Result | None], list[str | None]]:
    """`read_one` over ITEMS: the results (None where unreadable) and the errors (None where read)."""
    values: list[Result | None] = []
    errors: list[str | None] = []
    for item in items:
        value, error = read_one(partial(read, item))
        values.append(value)
        errors.append(error)
    return values, errors


def label_columns(probabilities: Mapping[str, torch.Tensor], label_space: LabelSpace) -> dict[str, list[Any]]:
    """The one "probabilities to labels": per attribute its top class name (`<attribute>`) and that class's
    probability (`<attribute>_confidence`), one entry per row of the batch."""
    columns: dict[str, list[Any]] = {}
    for attribute, probs in probabilities.items():
        confidence, index = probs.max(1)
        columns[attribute] = label_space.decode(attribute, index.cpu().tolist())
        columns[confidence_column(attribute)] = confidence.cpu().tolist()
    return columns


def with_errors(table: pd.DataFrame, errors: Sequence[str | None]) -> pd.DataFrame:
    """One row per input: TABLE holds the predictions of the readable inputs (those whose error is None), in
    order; an unreadable input gets empty tags and its error in the `error` column."""
    readable = [i for i, error in enumerate(errors) if error is None]
    out = table.reset_index(drop=True).set_axis(readable).reindex(range(len(errors)))
    out[ERROR_COLUMN] = pd.Series(list(errors), dtype=object)
    return out


def failed_images(table: pd.DataFrame) -> int:
    """How many rows of a prediction table hold an error instead of tags."""
    return int(table[ERROR_COLUMN].notna().sum()) if ERROR_COLUMN in table.columns else 0


def attributes_of(table: pd.DataFrame) -> list[str]:
    """The attributes a prediction table tags (those with a confidence column)."""
    return [c for c in table.columns if confidence_column(c) in table.columns]
