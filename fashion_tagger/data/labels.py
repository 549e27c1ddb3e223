"""Per-attribute vocabularies: which classes are trainable, how labels encode to indices and back.

Classes seen fewer than `min_class_count` times and missing values become 'None', encoded as
`IGNORE_INDEX` and masked in loss and metrics. `labels.json` carries the vocabularies together with the
content hash of the clean table they came from, so training, evaluation and prediction decode identically.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fashion_tagger.core.errors import DataError
from fashion_tagger.core.io import read_json, write_json
from fashion_tagger.core.layout import SplitDir
from fashion_tagger.core.schema import IGNORE_INDEX, NONE_LABEL

FORMAT_VERSION = 1


def fold_case_variants(values: Iterable[str]) -> dict[str, str]:
    """Spellings of one label that differ only in case (`men`, `MEN`, `Men`) -> the most frequent of them.

    Ties go to the spelling that sorts first, so the choice does not depend on row order. Only spellings that
    change are returned: an empty dict means nothing to fold.
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    for value, count in Counter(values).items():
        groups.setdefault(value.casefold(), []).append((-count, value))
    folded: dict[str, str] = {}
    for spellings in groups.values():
        canonical = min(spellings)[1]
        folded.update({value: canonical for _, value in spellings if value != canonical})
    return folded


def label_column(attribute: str) -> str:
    """Name of the encoded column of an attribute in the split tables."""
    return f"y_{attribute}"


@dataclass(frozen=True)
class LabelSpace:
    """Trainable classes per attribute, in head-output order. 'None' is never a class of a head."""

    classes: Mapping[str, tuple[str, ...]]
    min_class_count: int
    source_hash: str = ""
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @property
    def attributes(self) -> list[str]:
        return list(self.classes)

    @property
    def num_classes(self) -> dict[str, int]:
        return {a: len(c) for a, c in self.classes.items()}

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        attributes: Sequence[str],
        min_class_count: int,
        source_hash: str = "",
    ) -> LabelSpace:
        missing = [a for a in attributes if a not in frame.columns]
        if missing:
            raise DataError(f"clean table is missing attribute columns: {', '.join(missing)}")
        classes: dict[str, tuple[str, ...]] = {}
        counts: dict[str, dict[str, int]] = {}
        for attribute in attributes:
            values = frame[attribute].dropna().astype(str)
            values = values[values != NONE_LABEL]
            value_counts = values.value_counts()
            counts[attribute] = {str(k): int(v) for k, v in value_counts.sort_index().items()}
            trainable = sorted(str(k) for k, v in value_counts.items() if v >= min_class_count)
            if not trainable:
                raise DataError(
                    f"attribute {attribute!r} has no class with at least min_class_count={min_class_count} "
                    f"rows (largest: {int(value_counts.max()) if len(value_counts) else 0}); "
                    "lower labels.min_class_count or use more data"
                )
            classes[attribute] = tuple(trainable)
        return cls(classes=classes, min_class_count=min_class_count, source_hash=source_hash, counts=counts)

    def index(self, attribute: str, value: Any) -> int:
        try:
            return self.classes[attribute].index(str(value))
        except ValueError:
            return IGNORE_INDEX

    def encode(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Encoded label columns `y_<attribute>` (int64; IGNORE_INDEX for 'None', rare or missing)."""
        out = {}
        for attribute, names in self.classes.items():
            lookup = {name: i for i, name in enumerate(names)}
            out[label_column(attribute)] = (
                frame[attribute].map(lookup).fillna(IGNORE_INDEX).astype("int64").to_numpy()
            )
        return pd.DataFrame(out, index=frame.index)

    def decode(self, attribute: str, indices: Iterable[int]) -> list[str]:
        names = self.classes[attribute]
        return [names[i] if 0 <= i < len(names) else NONE_LABEL for i in np.asarray(list(indices), dtype=int)]

    def mapped_to_none(self, attribute: str) -> dict[str, int]:
        """Classes of an attribute that became 'None' because they are rarer than min_class_count."""
        kept = set(self.classes[attribute])
        return {k: v for k, v in self.counts.get(attribute, {}).items() if k not in kept}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "none_label": NONE_LABEL,
            "ignore_index": IGNORE_INDEX,
            "min_class_count": self.min_class_count,
            "source_hash": self.source_hash,
            "attributes": {
                a: {
                    "classes": list(names),
                    "counts": dict(self.counts.get(a, {})),
                    "mapped_to_none": self.mapped_to_none(a),
                }
                for a, names in self.classes.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSpace:
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(f"labels format_version {data.get('format_version')!r} is not {FORMAT_VERSION}")
        attributes = data["attributes"]
        return cls(
            classes={a: tuple(v["classes"]) for a, v in attributes.items()},
            min_class_count=int(data["min_class_count"]),
            source_hash=str(data.get("source_hash", "")),
            counts={a: dict(v.get("counts", {})) for a, v in attributes.items()},
        )

    def save(self, path: str | Path) -> Path:
        """Write labels.json: into a split folder, or to the file path given."""
        path = Path(path)
        return write_json(SplitDir(path).labels if path.is_dir() else path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LabelSpace:
        path = Path(path)
        if path.is_dir():
            path = SplitDir(path).labels
        if not path.is_file():
            raise DataError(f"{path} does not exist: run `fashion-tagger split` first")
        return cls.from_dict(read_json(path))
