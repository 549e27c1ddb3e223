"""split: class shares within the deviation bound, duplicate groups on one side, determinism by seed, max_rows,
labels tied to the clean table; on the real styles.csv the bound holds within seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashion_tagger.errors import DataError
from fashion_tagger.labels import LabelSpace, label_column
from fashion_tagger.schema import ATTRIBUTES, IGNORE_INDEX
from fashion_tagger.split import split_dataset
from fashion_tagger.validate import CLEAN_COLUMNS, table_sha256, validate_dataset

# Skewed vocabularies like the real ones: a few big classes and a rare tail that maps to 'None'.
VOCAB = {
    "gender": (["Men", "Women", "Unisex", "Boys", "Girls"], [0.5, 0.4, 0.06, 0.025, 0.015]),
    "masterCategory": (["Apparel", "Accessories", "Footwear", "Personal Care", "Home"],
                       [0.48, 0.25, 0.2, 0.065, 0.005]),
    "subCategory": (["Topwear", "Shoes", "Bags", "Bottomwear", "Watches", "Socks"],
                    [0.35, 0.2, 0.15, 0.15, 0.12, 0.03]),
    "articleType": (["Tshirts", "Shirts", "Casual Shoes", "Handbags", "Watches", "Jeans", "Ties"],
                    [0.25, 0.2, 0.15, 0.13, 0.12, 0.135, 0.015]),
    "baseColour": (["Black", "White", "Blue", "Brown", "Grey", "Lime Green"], [0.3, 0.2, 0.2, 0.15, 0.13, 0.02]),
    "season": (["Summer", "Fall", "Winter", "Spring"], [0.45, 0.25, 0.2, 0.1]),
    "usage": (["Casual", "Sports", "Ethnic", "Formal", "Party"], [0.75, 0.1, 0.07, 0.06, 0.02]),
}
MIN_CLASS_COUNT = 100


def make_clean(clean_dir: Path, rows: int, *, seed: int = 0, duplicates: bool = True) -> pd.DataFrame:
    """A clean.parquet + report.json as validate writes them, with duplicate groups of 2-5 rows."""
    rng = np.random.default_rng(seed)
    data: dict[str, object] = {"id": np.arange(1000, 1000 + rows, dtype="int64")}
    for attribute, (names, probs) in VOCAB.items():
        values = rng.choice(names, size=rows, p=probs).astype(object)
        values[rng.random(rows) < 0.01] = None
        data[attribute] = pd.array(values, dtype="string")
    data["year"] = pd.array(rng.integers(2010, 2018, rows), dtype="Int64")
    data["productDisplayName"] = pd.array([f"product {i}" for i in range(rows)], dtype="string")
    data["image_path"] = pd.array([f"/raw/images/{1000 + i}.jpg" for i in range(rows)], dtype="string")
    hashes = np.array([f"{i:064x}" for i in range(rows)], dtype=object)
    groups = np.full(rows, None, dtype=object)
    if duplicates:
        start = 0
        members = rng.permutation(rows)
        for group, size in enumerate(rng.integers(2, 6, rows // 20)):
            chosen = members[start : start + size]
            start += size
            hashes[chosen] = hashes[chosen[0]]
            groups[chosen] = group
    data["image_sha256"] = pd.array(hashes, dtype="string")
    data["width"] = pd.array([60] * rows, dtype="Int64")
    data["height"] = pd.array([80] * rows, dtype="Int64")
    data["mode"] = pd.array(["RGB"] * rows, dtype="string")
    data["format"] = pd.array(["JPEG"] * rows, dtype="string")
    data["duplicate_group"] = pd.array(groups, dtype="Int64")
    frame = pd.DataFrame(data).loc[:, list(CLEAN_COLUMNS)]
    clean_dir.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(clean_dir / "clean.parquet", index=False)
    (clean_dir / "report.json").write_text(json.dumps({"clean_sha256": table_sha256(frame)}))
    return frame


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean")
    make_clean(folder, 4000)
    return folder


@pytest.fixture(scope="module")
def split(clean_dir, tmp_path_factory):
    result = split_dataset(clean_dir, tmp_path_factory.mktemp("split"), min_class_count=MIN_CLASS_COUNT, seed=3)
    return result, pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)


def recomputed_deviation(train: pd.DataFrame, val: pd.DataFrame, labels: LabelSpace, val_fraction=0.2) -> float:
    worst = 0.0
    for attribute, names in labels.classes.items():
        column = label_column(attribute)
        for index in range(len(names)):
            n_train, n_val = int((train[column] == index).sum()), int((val[column] == index).sum())
            worst = max(worst, abs(n_train / (n_train + n_val) - (1 - val_fraction)))
    return worst


def test_class_shares_stay_within_the_bound(split):
    result, train, val = split
    labels = LabelSpace.load(result.labels_path)
    report = json.loads(result.report_path.read_text())
    assert result.max_share_deviation == report["max_share_deviation"] <= 0.01
    assert recomputed_deviation(train, val, labels) == pytest.approx(result.max_share_deviation, abs=1e-6)
    assert abs(len(val) / (len(train) + len(val)) - 0.2) < 0.005
    watches = report["shares"]["articleType"]["classes"]["Watches"]
    assert watches["train_count"] == int((train[label_column("articleType")] == labels.index("articleType",
                                                                                              "Watches")).sum())


def test_no_duplicate_group_on_both_sides(split, clean_dir):
    _, train, val = split
    assert not set(train["duplicate_group"].dropna()) & set(val["duplicate_group"].dropna())
    assert not set(train["image_sha256"]) & set(val["image_sha256"])
    assert len(train) + len(val) == 4000
    assert not set(train["id"]) & set(val["id"])
    report = json.loads(split[0].report_path.read_text())
    clean = pd.read_parquet(clean_dir / "clean.parquet")
    assert report["duplicate_groups"] == clean["duplicate_group"].nunique() > 100


def test_labels_are_tied_to_the_clean_table_and_encoded(split, clean_dir):
    result, train, _ = split
    labels = LabelSpace.load(result.labels_path)
    clean = pd.read_parquet(clean_dir / "clean.parquet")
    assert labels.source_hash == result.source_hash == table_sha256(clean)
    assert "Lime Green" not in labels.classes["baseColour"] and "Ties" in labels.mapped_to_none("articleType")
    pd.testing.assert_frame_equal(train[[label_column(a) for a in ATTRIBUTES]], labels.encode(train))
    assert train[label_column("usage")].dtype == "int64"
    assert (train.loc[train["usage"].isna(), label_column("usage")] == IGNORE_INDEX).all()
    assert set(CLEAN_COLUMNS) <= set(train.columns)


def test_same_seed_same_split_other_seed_other_split(clean_dir, tmp_path, split):
    _, train, _ = split
    again = split_dataset(clean_dir, tmp_path / "again", min_class_count=MIN_CLASS_COUNT, seed=3)
    other = split_dataset(clean_dir, tmp_path / "other", min_class_count=MIN_CLASS_COUNT, seed=4)
    assert pd.read_parquet(again.train_path)["id"].tolist() == train["id"].tolist()
    assert pd.read_parquet(other.train_path)["id"].tolist() != train["id"].tolist()
    assert other.max_share_deviation <= 0.01


def test_max_rows_takes_a_stratified_subset_of_that_size(clean_dir, tmp_path):
    result = split_dataset(clean_dir, tmp_path / "subset", min_class_count=50, seed=1, max_rows=1500)
    train, val = pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)
    assert len(train) + len(val) == result.train_rows + result.val_rows == 1500
    full = pd.read_parquet(clean_dir / "clean.parquet")
    subset = pd.concat([train, val])
    for attribute in ("gender", "usage"):
        shares = subset[attribute].value_counts(normalize=True)
        assert (shares - full[attribute].value_counts(normalize=True)).abs().max() < 0.01
    assert not set(train["duplicate_group"].dropna()) & set(val["duplicate_group"].dropna())
    again = split_dataset(clean_dir, tmp_path / "subset2", min_class_count=50, seed=1, max_rows=1500)
    assert pd.read_parquet(again.val_path)["id"].tolist() == val["id"].tolist()


def test_metadata_only_table_splits_row_by_row(tmp_path):
    frame = make_clean(tmp_path / "clean", 1500, seed=5, duplicates=False)
    frame["image_sha256"] = pd.array([None] * len(frame), dtype="string")
    frame.to_parquet(tmp_path / "clean" / "clean.parquet", index=False)
    result = split_dataset(tmp_path / "clean", tmp_path / "split", min_class_count=50)
    assert result.train_rows + result.val_rows == 1500
    assert json.loads(result.report_path.read_text())["units"] == 1500


def test_missing_clean_table_says_to_validate_first(tmp_path):
    with pytest.raises(DataError, match=r"clean\.parquet does not exist: run the validate stage first"):
        split_dataset(tmp_path / "nothing", tmp_path / "split")


def test_synthetic_dataset_validates_and_splits(synthetic_raw, tmp_path):
    clean = validate_dataset(synthetic_raw, tmp_path / "clean", workers=2)
    result = split_dataset(clean.out_dir, tmp_path / "split", min_class_count=20)
    train, val = pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)
    assert len(train) + len(val) == clean.rows_clean
    assert not set(train["image_sha256"]) & set(val["image_sha256"])
    assert result.source_hash == clean.clean_sha256
    assert 0.15 < len(val) / clean.rows_clean < 0.25


# --- real-data tier -------------------------------------------------------------------------------------------


def test_real_metadata_split_stays_within_one_point(real_data, tmp_path):
    clean = validate_dataset(real_data, tmp_path / "clean", metadata_only=True)
    started = time.perf_counter()
    result = split_dataset(clean.out_dir, tmp_path / "split")
    elapsed = time.perf_counter() - started
    assert result.train_rows + result.val_rows == 44_424
    assert sum(result.num_classes.values()) == 71
    assert result.max_share_deviation <= 0.01
    assert elapsed < 20, f"split of the real table took {elapsed:.1f}s"


def test_real_small_images_validate_and_split(real_small_raw, tmp_path):
    raw = real_small_raw
    clean = validate_dataset(raw, tmp_path / "clean", workers=2)
    result = split_dataset(clean.out_dir, tmp_path / "split", min_class_count=100)
    train, val = pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)
    assert len(train) + len(val) == clean.rows_clean
    assert not set(train["image_sha256"]) & set(val["image_sha256"])
    assert result.max_share_deviation <= 0.01
