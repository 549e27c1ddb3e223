"""fetch: Kaggle via a fake client serving real zips in both published layouts, local folders, S3 (moto), markers."""

from __future__ import annotations

import shutil
import stat
import sys
import types
import zipfile
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from PIL import Image

from fashion_tagger.core import io
from fashion_tagger.core.errors import SourceError, SourceUnavailableError
from fashion_tagger.data.sources import extract_dataset_zip, fetch_dataset

SLUG = "paramaggarwal/fashion-product-images-small"
NAME = "paramaggarwal__fashion-product-images-small"
STYLES = (
    "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"
    "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt\n"
    "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual,Peter England Men Party Blue Jeans\n"
    "59263,Women,Accessories,Watches,Watches,Silver,Winter,2016,Casual,Titan Women Silver Watch\n"
)
IDS = (15970, 39386, 59263)


def datasets_in(raw_root):
    """What a fetch left in raw/, leaving out its lock files (kept so that waiting processes share one inode)."""
    return sorted(p.name for p in raw_root.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny dataset in the flat layout: styles.csv and images/<id>.jpg."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "images").mkdir()
    (root / "styles.csv").write_text(STYLES)
    for i, product_id in enumerate(IDS):
        Image.new("RGB", (60, 80), (40 * i, 90, 200)).save(root / "images" / f"{product_id}.jpg")
    return root


def _zip(dataset: Path, out: Path, layouts: tuple[str, ...]) -> Path:
    """A zip holding the dataset under each layout prefix ("" = flat), like the published archives."""
    with zipfile.ZipFile(out, "w") as zf:
        for layout in layouts:
            prefix = f"{layout}/" if layout else ""
            zf.write(dataset / "styles.csv", f"{prefix}styles.csv")
            zf.writestr(f"{prefix}images/", "")
            for image in sorted((dataset / "images").iterdir()):
                zf.write(image, f"{prefix}images/{image.name}")
            if layout == "fashion-dataset":  # the full archive also carries JSON per style and images.csv
                zf.writestr(f"{prefix}styles/15970.json", "{}")
                zf.writestr(f"{prefix}images.csv", "filename,link\n")
    return out


class FakeKaggleApi:
    """Same interface as KaggleApi; serves a prepared zip, or fails half-way like a dropped connection."""

    def __init__(self, archive: Path | None, fail_after_bytes: int | None = None):
        self.archive = archive
        self.fail_after_bytes = fail_after_bytes
        self.calls: list[tuple[str, str]] = []

    def authenticate(self) -> None:
        self.calls.append(("authenticate", ""))

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False, licenses=()):
        self.calls.append(("download", dataset))
        assert unzip is False
        out = Path(path) / (dataset.split("/")[1] + ".zip")
        data = self.archive.read_bytes()
        if self.fail_after_bytes is not None:
            out.write_bytes(data[: self.fail_after_bytes])
            raise ConnectionError("connection reset by peer")
        out.write_bytes(data)


def _assert_normalised(result, raw_root: Path, name: str = NAME) -> None:
    assert result.raw_dir == raw_root / name and result.name == name
    assert (result.raw_dir / "styles.csv").read_text() == STYLES
    assert sorted(p.name for p in (result.raw_dir / "images").iterdir()) == sorted(f"{i}.jpg" for i in IDS)
    assert io.is_complete(result.raw_dir)
    assert (result.rows, result.images) == (3, 3)
    # Nothing else survives: no zip, no partial folder, no unused parts of the archive.
    assert datasets_in(raw_root) == [name]
    assert sorted(p.name for p in result.raw_dir.iterdir()) == [io.COMPLETE_MARKER, "images", "styles.csv"]


@pytest.mark.parametrize(
    "layouts", [("fashion-dataset", ""), ("myntradataset", ""), ("myntradataset",), ("",)], ids=str
)
def test_kaggle_layouts_are_normalised_and_a_rerun_skips(dataset, tmp_path, layouts):
    api = FakeKaggleApi(_zip(dataset, tmp_path / "archive.zip", layouts))
    raw_root = tmp_path / "raw"
    first = fetch_dataset(f"kaggle:{SLUG}", raw_root, kaggle_api=api)
    assert first.downloaded is True and first.source == f"kaggle:{SLUG}"
    _assert_normalised(first, raw_root)
    assert api.calls == [("authenticate", ""), ("download", SLUG)]
    marker = io.read_json(first.raw_dir / io.COMPLETE_MARKER)
    assert marker["layout"] == (layouts[0] or ".")

    second = fetch_dataset(f"kaggle:{SLUG}", raw_root, kaggle_api=api)
    assert second.downloaded is False and second.raw_dir == first.raw_dir
    assert len(api.calls) == 2  # no second download


def test_interrupted_download_is_never_taken_for_complete(dataset, tmp_path):
    archive = _zip(dataset, tmp_path / "archive.zip", ("myntradataset",))
    raw_root = tmp_path / "raw"
    with pytest.raises(SourceUnavailableError, match="downloading kaggle:.*failed.*connection reset"):
        fetch_dataset(f"kaggle:{SLUG}", raw_root, kaggle_api=FakeKaggleApi(archive, fail_after_bytes=300))
    assert not (raw_root / NAME).exists()

    # A killed process leaves its partial folder and half a zip behind; the next run cleans and redoes it.
    leftover = raw_root / f".{NAME}.partial" / "download"
    leftover.mkdir(parents=True)
    (leftover / "fashion-product-images-small.zip").write_bytes(archive.read_bytes()[:300])
    api = FakeKaggleApi(archive)
    result = fetch_dataset(f"kaggle:{SLUG}", raw_root, kaggle_api=api)
    assert result.downloaded is True and len(api.calls) == 2
    _assert_normalised(result, raw_root)


def test_a_folder_without_the_marker_is_fetched_again(dataset, tmp_path):
    raw_root = tmp_path / "raw"
    stale = raw_root / NAME / "images"
    stale.mkdir(parents=True)
    (stale.parent / "styles.csv").write_text("id\n")
    api = FakeKaggleApi(_zip(dataset, tmp_path / "archive.zip", ("myntradataset",)))
    result = fetch_dataset(f"kaggle:{SLUG}", raw_root, kaggle_api=api)
    assert result.downloaded is True
    _assert_normalised(result, raw_root)


def test_a_truncated_zip_is_a_clear_error(dataset, tmp_path):
    archive = _zip(dataset, tmp_path / "archive.zip", ("myntradataset",))
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[:-40])
    with pytest.raises(SourceError, match="not a complete zip archive.*rerun fetch"):
        fetch_dataset(f"kaggle:{SLUG}", tmp_path / "raw", kaggle_api=FakeKaggleApi(truncated))
    assert datasets_in(tmp_path / "raw") == []


def test_a_zip_of_something_else_names_what_it_holds(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/labels.txt", "x")
    with pytest.raises(SourceError, match="no styles.csv.*train/labels.txt"):
        fetch_dataset(f"kaggle:{SLUG}", tmp_path / "raw", kaggle_api=FakeKaggleApi(archive))


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "images/../../evil.txt"])
def test_zip_slip_is_refused(tmp_path, member):
    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("styles.csv", STYLES)
        zf.writestr(member, "pwned")
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    with pytest.raises(SourceError, match="unsafe member path"):
        extract_dataset_zip(archive, target)
    assert not list(tmp_path.rglob("evil.txt"))


def test_missing_kaggle_credentials_name_both_options(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    imported_before = "kaggle" in sys.modules
    with pytest.raises(SourceError) as info:
        fetch_dataset(f"kaggle:{SLUG}", tmp_path / "raw")
    message = str(info.value)
    assert "KAGGLE_USERNAME" in message and "KAGGLE_KEY" in message and "kaggle.json" in message
    assert str(tmp_path / "kaggle-config" / "kaggle.json") in message
    # The kaggle package authenticates on import: it must not even be imported without credentials.
    assert ("kaggle" in sys.modules) == imported_before
    assert not (tmp_path / "raw" / NAME).exists()


def test_kaggle_json_credentials_reach_the_real_client(dataset, tmp_path, monkeypatch):
    config = tmp_path / "kaggle-config"
    config.mkdir()
    (config / "kaggle.json").write_text('{"username": "someone", "key": "0123"}')
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    api = FakeKaggleApi(_zip(dataset, tmp_path / "archive.zip", ("myntradataset",)))
    extended = types.ModuleType("kaggle.api.kaggle_api_extended")
    extended.KaggleApi = lambda: api  # stands in for the real class: Kaggle is unreachable from tests
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", extended)
    result = fetch_dataset(f"kaggle:{SLUG}", tmp_path / "raw")
    assert result.downloaded is True and api.calls[0] == ("authenticate", "")


def test_kaggle_exit_on_bad_credentials_becomes_a_source_error(dataset, tmp_path):
    class Rejecting(FakeKaggleApi):
        def authenticate(self):
            raise SystemExit(1)

    with pytest.raises(SourceError, match="authentication failed.*KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json"):
        fetch_dataset(f"kaggle:{SLUG}", tmp_path / "raw", kaggle_api=Rejecting(None))


@pytest.mark.parametrize("layout", ["", "fashion-dataset", "myntradataset"])
def test_local_folder_is_used_in_place(dataset, tmp_path, layout):
    folder = tmp_path / "local"
    target = folder / layout if layout else folder
    shutil.copytree(dataset, target)
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    result = fetch_dataset(str(folder), tmp_path / "raw")
    assert result.raw_dir == target.resolve() and result.downloaded is False
    assert (result.rows, result.images) == (3, 3)
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
    assert not io.is_complete(result.raw_dir)  # raw data is never written to
    assert not (tmp_path / "raw").exists()


def test_local_folder_without_a_dataset_names_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty holds no styles.csv with an images/ folder.*myntradataset"):
        fetch_dataset(str(tmp_path / "empty"), tmp_path / "raw")
    with pytest.raises(SourceError, match="does not exist"):
        fetch_dataset(str(tmp_path / "nowhere"), tmp_path / "raw")


@pytest.mark.parametrize(
    "source",
    [
        "http://example.com/data.zip",
        "gs://bucket/x",
        "hf:user/data",
        "",
        "kaggle:nodataset",
        "kaggle:a/b/c",
        "synthetic:many",
        "s3://",
        "s3://UPPER/x",
    ],
)
def test_bad_sources_say_what_is_accepted(tmp_path, source):
    with pytest.raises(SourceError, match=r"kaggle:OWNER/DATASET|synthetic:N|s3://bucket/prefix"):
        fetch_dataset(source, tmp_path / "raw")


@pytest.mark.parametrize("layout", ["", "myntradataset"])
def test_s3_prefix_is_downloaded_once(dataset, tmp_path, monkeypatch, layout):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="fashion")
        base = f"datasets/v1/{layout}/" if layout else "datasets/v1/"
        s3.upload_file(str(dataset / "styles.csv"), "fashion", f"{base}styles.csv")
        for image in (dataset / "images").iterdir():
            s3.upload_file(str(image), "fashion", f"{base}images/{image.name}")
        s3.put_object(Bucket="fashion", Key="datasets/v2/styles.csv", Body=b"other")  # a sibling prefix
        raw_root = tmp_path / "raw"
        first = fetch_dataset("s3://fashion/datasets/v1", raw_root, s3_client=s3)
        _assert_normalised(first, raw_root, "fashion__datasets-v1")
        assert first.downloaded is True
        assert (first.raw_dir / "images" / "15970.jpg").read_bytes() == (dataset / "images" / "15970.jpg").read_bytes()

        second = fetch_dataset("s3://fashion/datasets/v1/", raw_root, s3_client=s3)
        assert second.downloaded is False and second.raw_dir == first.raw_dir

        with pytest.raises(SourceError, match="s3://fashion/nothing holds no styles.csv"):
            fetch_dataset("s3://fashion/nothing", raw_root, s3_client=s3)
        with pytest.raises(SourceError, match="reading s3://missing-bucket/x failed.*NoSuchBucket"):
            fetch_dataset("s3://missing-bucket/x", raw_root, s3_client=s3)
        assert datasets_in(raw_root) == ["fashion__datasets-v1"]


def test_synthetic_source_generates_once(tmp_path, monkeypatch):
    calls = []

    def generate_dataset(out_dir, *, rows, size="small", seed=0):
        calls.append((rows, size, seed))
        (Path(out_dir) / "images").mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "styles.csv").write_text(STYLES)
        Image.new("RGB", (60, 80)).save(Path(out_dir) / "images" / "15970.jpg")

    # synth.py is tested on its own; here only the marker logic around it matters.
    fake = types.SimpleNamespace(generate_dataset=generate_dataset)
    monkeypatch.setitem(sys.modules, "fashion_tagger.data.synthetic.generator", fake)
    raw_root = tmp_path / "raw"
    first = fetch_dataset("synthetic:3", raw_root, synthetic_size="small", synthetic_seed=5)
    assert first.raw_dir == raw_root / "synthetic-3-small-seed5" and first.downloaded is True
    assert io.is_complete(first.raw_dir) and (first.rows, first.images) == (3, 1)
    second = fetch_dataset("synthetic:3", raw_root, synthetic_size="small", synthetic_seed=5)
    assert second.downloaded is False and calls == [(3, "small", 5)]
    with pytest.raises(SourceError, match="size 'huge'"):
        fetch_dataset("synthetic:3", raw_root, synthetic_size="huge")


def test_synthetic_source_runs_the_generator(tmp_path):
    result = fetch_dataset("synthetic:40", tmp_path / "raw", synthetic_seed=3)
    assert result.raw_dir == tmp_path / "raw" / "synthetic-40-small-seed3" and result.downloaded is True
    assert result.rows == 40 and 0 < result.images <= 40 and io.is_complete(result.raw_dir)
    assert datasets_in(tmp_path / "raw") == ["synthetic-40-small-seed3"]


def test_generated_dataset_served_as_the_full_kaggle_archive(synthetic_raw, tmp_path):
    api = FakeKaggleApi(_zip(synthetic_raw, tmp_path / "archive.zip", ("fashion-dataset", "")))
    result = fetch_dataset("kaggle:paramaggarwal/fashion-product-images-dataset", tmp_path / "raw", kaggle_api=api)
    assert result.name == "paramaggarwal__fashion-product-images-dataset"
    assert (result.raw_dir / "styles.csv").read_bytes() == (synthetic_raw / "styles.csv").read_bytes()
    assert result.images == len(list((synthetic_raw / "images").iterdir()))
    assert result.rows == len((synthetic_raw / "styles.csv").read_bytes().splitlines()) - 1


def _hostile_zip(dataset: Path, out: Path, kind: str) -> Path:
    archive = _zip(dataset, out, ("myntradataset",))
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        if kind == "symlink":
            link = zipfile.ZipInfo("myntradataset/images/777.jpg")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(link, "/etc/passwd")
        elif kind == "fifo":
            fifo = zipfile.ZipInfo("myntradataset/images/778.jpg")
            fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
            zf.writestr(fifo, "")
        elif kind == "bomb":
            zf.writestr("myntradataset/images/779.jpg", b"\0" * (64 << 20))  # 64 MB of zeros in about 64 KB
    return archive


@pytest.mark.parametrize(("kind", "message"), [
    ("symlink", "member 'myntradataset/images/777.jpg' is a symbolic link: the dataset holds plain files only"),
    ("fifo", "member 'myntradataset/images/778.jpg' is a special file"),
    ("bomb", r"member 'myntradataset/images/779.jpg' expands \d+ bytes to 67108864 \(over 200x\): refusing a "
             "possible zip bomb"),
])
def test_links_special_files_and_zip_bombs_are_refused_before_anything_is_extracted(dataset, tmp_path, kind, message):
    archive = _hostile_zip(dataset, tmp_path / "archive.zip", kind)
    with pytest.raises(SourceError, match=message):
        fetch_dataset(f"kaggle:{SLUG}", tmp_path / "raw", kaggle_api=FakeKaggleApi(archive))
    assert datasets_in(tmp_path / "raw") == []
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))


def test_an_archive_larger_than_the_extract_limit_is_refused(dataset, tmp_path, monkeypatch):
    archive = _zip(dataset, tmp_path / "archive.zip", ("myntradataset",))
    monkeypatch.setenv("FASHION_TAGGER_MAX_EXTRACT_GB", "0.000001")  # 1 KB
    with pytest.raises(SourceError, match=r"would extract 0\.0 GB, more than the limit of 0\.0 GB "
                                          r"\(\$FASHION_TAGGER_MAX_EXTRACT_GB\): refusing a possible zip bomb"):
        fetch_dataset(f"kaggle:{SLUG}", tmp_path / "raw", kaggle_api=FakeKaggleApi(archive))
    monkeypatch.setenv("FASHION_TAGGER_MAX_EXTRACT_GB", "lots")
    with pytest.raises(SourceError, match=r"\$FASHION_TAGGER_MAX_EXTRACT_GB must be a number of GB, not 'lots'"):
        fetch_dataset(f"kaggle:{SLUG}", tmp_path / "raw2", kaggle_api=FakeKaggleApi(archive))


def test_a_member_longer_than_its_header_declares_is_refused():
    from io import BytesIO

    from fashion_tagger.data.sources import _copy_at_most

    out = BytesIO()
    with pytest.raises(SourceError, match="member 'x' holds more than the 5 bytes its header declares"):
        _copy_at_most(BytesIO(b"0123456789"), out, 5, "member 'x'")
    _copy_at_most(BytesIO(b"01234"), out, 5, "member 'y'")
    assert out.getvalue() == b"01234"
