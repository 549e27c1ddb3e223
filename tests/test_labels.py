"""LabelSpace: rare and missing labels become 'None' (IGNORE_INDEX), encode/decode agree, labels.json round-trips."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fashion_tagger.core.errors import DataError
from fashion_tagger.core.schema import IGNORE_INDEX, NONE_LABEL
from fashion_tagger.data.labels import LabelSpace, label_column

LABELS_FILENAME = "labels.json"  # the file name the split folder promises (layout.SplitDir.labels)


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gender": pd.array(["Men"] * 5 + ["Women"] * 4 + ["Girls"] + [None], dtype="string"),
            "season": pd.array(["Summer"] * 6 + ["Fall"] * 3 + [NONE_LABEL, "Winter"], dtype="string"),
        }
    )


@pytest.fixture
def labels(frame) -> LabelSpace:
    return LabelSpace.from_frame(frame, ["gender", "season"], min_class_count=3, source_hash="abc123")


def test_rare_classes_and_missing_values_are_not_classes(labels):
    assert labels.classes == {"gender": ("Men", "Women"), "season": ("Fall", "Summer")}
    assert labels.num_classes == {"gender": 2, "season": 2}
    assert labels.mapped_to_none("gender") == {"Girls": 1}
    assert labels.mapped_to_none("season") == {"Winter": 1}
    assert NONE_LABEL not in labels.counts["season"]


def test_encode_maps_rare_missing_and_unknown_to_ignore_index(labels, frame):
    extra = pd.DataFrame({"gender": pd.array(["Boys"], dtype="string"), "season": pd.array(["Fall"], dtype="string")})
    encoded = labels.encode(pd.concat([frame, extra], ignore_index=True))
    assert list(encoded.columns) == [label_column("gender"), label_column("season")] == ["y_gender", "y_season"]
    assert encoded.dtypes.eq("int64").all()
    assert encoded["y_gender"].tolist() == [0] * 5 + [1] * 4 + [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert encoded["y_season"].tolist() == [1] * 6 + [0] * 3 + [IGNORE_INDEX, IGNORE_INDEX, 0]


def test_decode_inverts_encode_and_none_for_ignored(labels, frame):
    encoded = labels.encode(frame)
    decoded = labels.decode("gender", encoded["y_gender"])
    expected = [v if v in ("Men", "Women") else NONE_LABEL for v in frame["gender"].fillna(NONE_LABEL)]
    assert decoded == expected
    assert labels.decode("season", [IGNORE_INDEX, 5]) == [NONE_LABEL, NONE_LABEL]
    assert labels.index("season", "Summer") == 1 and labels.index("season", "Winter") == IGNORE_INDEX


def test_save_load_round_trip(labels, tmp_path):
    path = labels.save(tmp_path)
    assert path == tmp_path / LABELS_FILENAME
    assert LabelSpace.load(tmp_path) == LabelSpace.load(path) == labels
    data = json.loads(path.read_text())
    assert data["source_hash"] == "abc123" and data["ignore_index"] == IGNORE_INDEX
    assert data["attributes"]["gender"]["classes"] == ["Men", "Women"]


def test_clear_errors(frame, tmp_path):
    with pytest.raises(DataError, match="no class with at least min_class_count=50"):
        LabelSpace.from_frame(frame, ["gender"], min_class_count=50)
    with pytest.raises(DataError, match="missing attribute columns: usage"):
        LabelSpace.from_frame(frame, ["gender", "usage"], min_class_count=1)
    with pytest.raises(DataError, match="run `fashion-tagger split` first"):
        LabelSpace.load(tmp_path / "missing")
    (tmp_path / LABELS_FILENAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        LabelSpace.load(tmp_path)
