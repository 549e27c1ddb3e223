"""split: three parts with class shares within the deviation bounds, duplicate groups in one part, test membership
stable when rows are added or removed, determinism by seed, max_rows, labels tied to the clean table; on the real
styles.csv the bounds hold within seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashion_tagger.core.config import Config, load_config
from fashion_tagger.core.errors import DataError
from fashion_tagger.core.schema import ATTRIBUTES, IGNORE_INDEX
from fashion_tagger.data.labels import LabelSpace, label_column
from fashion_tagger.data.split import split_dataset
from fashion_tagger.data.validate import CLEAN_COLUMNS, table_sha256, validate_dataset

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


def split_config(*overrides: str) -> Config:
    """The default configuration with labels.min_class_count=MIN_CLASS_COUNT (these tables' classes), then OVERRIDES."""
    return load_config(None, [f"labels.min_class_count={MIN_CLASS_COUNT}", *overrides])


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
    result = split_dataset(clean_dir, tmp_path_factory.mktemp("split"), split_config("split.seed=3"))
    return result, pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)


def recomputed_deviations(split_dir: Path, labels: LabelSpace, val_fraction=0.2, test_fraction=0.1):
    """(test share deviation over all rows, val share deviation over the non-test rows), from the parquet files."""
    train, val, test = (pd.read_parquet(split_dir / f"{p}.parquet") for p in ("train", "val", "test"))
    worst_test = worst_val = 0.0
    for attribute, names in labels.classes.items():
        column = label_column(attribute)
        for index in range(len(names)):
            n_train, n_val, n_test = (int((part[column] == index).sum()) for part in (train, val, test))
            worst_test = max(worst_test, abs(n_test / (n_train + n_val + n_test) - test_fraction))
            worst_val = max(worst_val, abs(n_val / (n_train + n_val) - val_fraction / (1 - test_fraction)))
    return worst_test, worst_val


def test_class_shares_stay_within_the_bound(split):
    result, train, val = split
    test = pd.read_parquet(result.test_path)
    labels = LabelSpace.load(result.labels_path)
    report = json.loads(result.report_path.read_text())
    assert result.max_share_deviation == report["max_share_deviation"] <= 0.01
    assert result.test_share_deviation == report["test_share_deviation"] <= 0.01
    test_deviation, val_deviation = recomputed_deviations(result.out_dir, labels)
    assert test_deviation == pytest.approx(report["test_share_deviation"], abs=1e-6)
    assert val_deviation == pytest.approx(report["val_share_deviation"], abs=1e-6)
    assert abs(len(val) / 4000 - 0.2) < 0.005 and abs(len(test) / 4000 - 0.1) < 0.005
    assert report["shares"]["gender"]["classes"]["Men"]["test_count"] == int((test["gender"] == "Men").sum())
    watches = report["shares"]["articleType"]["classes"]["Watches"]
    assert watches["train_count"] == int((train[label_column("articleType")] == labels.index("articleType",
                                                                                              "Watches")).sum())


def test_no_duplicate_group_or_id_in_two_parts(split, clean_dir):
    result, train, val = split
    test = pd.read_parquet(result.test_path)
    for a, b in ((train, val), (train, test), (val, test)):
        assert not set(a["duplicate_group"].dropna()) & set(b["duplicate_group"].dropna())
        assert not set(a["image_sha256"]) & set(b["image_sha256"])
        assert not set(a["id"]) & set(b["id"])
    assert len(train) + len(val) + len(test) == 4000
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
    again = split_dataset(clean_dir, tmp_path / "again", split_config("split.seed=3"))
    other = split_dataset(clean_dir, tmp_path / "other", split_config("split.seed=4"))
    assert pd.read_parquet(again.train_path)["id"].tolist() == train["id"].tolist()
    assert pd.read_parquet(other.train_path)["id"].tolist() != train["id"].tolist()
    assert other.max_share_deviation <= 0.01


def membership_record(tmp_path):
    """A test-membership record in a coordination database of its own (SQLite under TMP_PATH)."""
    from fashion_tagger.coordination import connect
    from fashion_tagger.coordination.membership import MembershipRecord

    return MembershipRecord(connect(None, tmp_path / "coordination-home"), "test-0.1-seed42")


def test_test_membership_is_stable_when_rows_are_added_and_removed(tmp_path):
    """The home's membership record keeps every earlier test image in test, and every earlier train/val image
    out of it (a champion trained on it must never be scored on it), while the shares stay near target."""
    membership = membership_record(tmp_path)
    full = make_clean(tmp_path / "all", 4400, seed=11)
    first_rows = full.iloc[:4000]
    (tmp_path / "v1").mkdir()
    first_rows.to_parquet(tmp_path / "v1" / "clean.parquet", index=False)
    first = split_dataset(tmp_path / "v1", tmp_path / "s1", split_config(), test_membership=membership)
    test_1 = set(pd.read_parquet(first.test_path)["id"])
    rest_1 = set(pd.read_parquet(first.train_path)["id"]) | set(pd.read_parquet(first.val_path)["id"])

    # 10% new rows (some of them duplicates of earlier images) and 100 earlier rows removed.
    grown = full.drop(index=full.index[:100])
    second = split_dataset(tmp_path / "all", tmp_path / "s2", split_config(), test_membership=membership)
    (tmp_path / "v3").mkdir()
    grown.to_parquet(tmp_path / "v3" / "clean.parquet", index=False)
    third = split_dataset(tmp_path / "v3", tmp_path / "s3", split_config(), test_membership=membership)
    for result in (second, third):
        test = pd.read_parquet(result.test_path)
        rest = pd.concat([pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)])
        assert test_1 - set(range(1000, 1100)) <= set(test["id"])  # every earlier test id still there
        assert not rest_1 & set(test["id"])
        assert not set(test["image_sha256"]) & set(rest["image_sha256"])
        report = json.loads(result.report_path.read_text())
        # The rarest classes here hold about 100 rows, so one row moves their share by 0.01.
        assert report["test_share_deviation"] <= 0.03 and report["val_share_deviation"] <= 0.01
    report = json.loads(second.report_path.read_text())["test_membership"]
    assert report["known_units"] == first.train_rows + first.val_rows + first.test_rows - (
        4000 - json.loads(first.report_path.read_text())["units"])
    assert report["new_units"] > 0 and 0 < report["new_test_units"] < report["new_units"] * 0.2
    assert json.loads(third.report_path.read_text())["test_membership"]["new_units"] == 0
    # Without a record, the same table splits the same way again (deterministic by seed).
    a = split_dataset(tmp_path / "v1", tmp_path / "a", split_config())
    b = split_dataset(tmp_path / "v1", tmp_path / "b", split_config())
    assert pd.read_parquet(a.test_path)["id"].tolist() == pd.read_parquet(b.test_path)["id"].tolist()


def test_max_rows_takes_a_stratified_subset_of_that_size(clean_dir, tmp_path):
    subset_config = split_config("labels.min_class_count=50", "split.seed=1", "data.max_rows=1500")
    result = split_dataset(clean_dir, tmp_path / "subset", subset_config)
    train, val = pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)
    test = pd.read_parquet(result.test_path)
    assert len(train) + len(val) + len(test) == result.train_rows + result.val_rows + result.test_rows == 1500
    full = pd.read_parquet(clean_dir / "clean.parquet")
    subset = pd.concat([train, val, test])
    for attribute in ("gender", "usage"):
        shares = subset[attribute].value_counts(normalize=True)
        assert (shares - full[attribute].value_counts(normalize=True)).abs().max() < 0.01
    assert not set(train["duplicate_group"].dropna()) & set(val["duplicate_group"].dropna())
    again = split_dataset(clean_dir, tmp_path / "subset2", subset_config)
    assert pd.read_parquet(again.val_path)["id"].tolist() == val["id"].tolist()


def test_metadata_only_table_splits_row_by_row(tmp_path):
    frame = make_clean(tmp_path / "clean", 1500, seed=5, duplicates=False)
    frame["image_sha256"] = pd.array([None] * len(frame), dtype="string")
    frame.to_parquet(tmp_path / "clean" / "clean.parquet", index=False)
    result = split_dataset(tmp_path / "clean", tmp_path / "split", split_config("labels.min_class_count=50"))
    assert result.train_rows + result.val_rows + result.test_rows == 1500
    assert json.loads(result.report_path.read_text())["units"] == 1500


def test_missing_clean_table_says_to_validate_first(tmp_path):
    with pytest.raises(DataError, match=r"clean\.parquet does not exist: run the validate stage first"):
        split_dataset(tmp_path / "nothing", tmp_path / "split", load_config())


def test_synthetic_dataset_validates_and_splits(synthetic_raw, tmp_path):
    clean = validate_dataset(synthetic_raw, tmp_path / "clean", load_config(None, ["images.workers=2"]))
    result = split_dataset(clean.out_dir, tmp_path / "split", split_config("labels.min_class_count=20"))
    train, val = pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)
    test = pd.read_parquet(result.test_path)
    assert len(train) + len(val) + len(test) == clean.rows_clean
    assert not set(train["image_sha256"]) & (set(val["image_sha256"]) | set(test["image_sha256"]))
    assert result.source_hash == clean.clean_sha256
    assert 0.15 < len(val) / clean.rows_clean < 0.25 and 0.06 < len(test) / clean.rows_clean < 0.14


# --- real-data tier -------------------------------------------------------------------------------------------


def test_real_metadata_split_keeps_every_class_near_its_test_and_val_share(real_data, tmp_path, capsys):
    clean = validate_dataset(real_data, tmp_path / "clean", load_config(None, ["data.metadata_only=true"]))
    started = time.perf_counter()
    result = split_dataset(clean.out_dir, tmp_path / "split", load_config(),
                           test_membership=membership_record(tmp_path))
    elapsed = time.perf_counter() - started
    assert result.train_rows + result.val_rows + result.test_rows == 44_424
    assert sum(result.num_classes.values()) == 71
    report = json.loads(result.report_path.read_text())
    with capsys.disabled():
        print(f"\nreal styles.csv: test {result.test_rows} rows, per-class test share deviation "
              f"{report['test_share_deviation']:.4f} (goal <= 0.02), val {report['val_share_deviation']:.4f}")
    assert report["test_share_deviation"] <= 0.02
    assert report["val_share_deviation"] <= 0.01
    assert elapsed < 30, f"split of the real table took {elapsed:.1f}s"


def test_real_small_images_validate_and_split(real_small_raw, tmp_path):
    raw = real_small_raw
    clean = validate_dataset(raw, tmp_path / "clean", load_config(None, ["images.workers=2"]))
    result = split_dataset(clean.out_dir, tmp_path / "split", split_config())
    train, val = pd.read_parquet(result.train_path), pd.read_parquet(result.val_path)
    assert len(train) + len(val) + result.test_rows == clean.rows_clean
    assert not set(train["image_sha256"]) & set(val["image_sha256"])
    assert result.max_share_deviation <= 0.02
