"""Fetch a dataset (Kaggle, a local folder, S3/MinIO or the generated one) into <raw_root>/<name>/{styles.csv,images/}.

Downloads land in a hidden partial folder and are renamed into place only after the completion marker is written,
so a folder under raw_root either carries the marker or is never taken for a dataset.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from fashion_tagger.core import io
from fashion_tagger.core.errors import SourceError, SourceUnavailableError
from fashion_tagger.core.layout import IMAGES_DIRNAME, STYLES_FILENAME
from fashion_tagger.storage.s3 import connect_s3, list_keys, s3_errors

log = logging.getLogger(__name__)

# Where styles.csv sits in the published archives: the full dataset, the 60x80 one, then a flat layout.
KAGGLE_LAYOUTS = ("fashion-dataset", "myntradataset", "")
ACCEPTED_FORMS = (
    "kaggle:OWNER/DATASET (e.g. kaggle:paramaggarwal/fashion-product-images-small), "
    "a local folder holding styles.csv and images/, s3://bucket/prefix, or synthetic:N (e.g. synthetic:2000)"
)
_KAGGLE_SLUG = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SYNTHETIC = re.compile(r"^synthetic:(\d+)$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least, so C:\data stays a folder
S3_DOWNLOAD_THREADS = 16


@dataclass
class FetchResult(io.StageResult):
    raw_dir: Path  # holds styles.csv and images/
    name: str
    source: str
    downloaded: bool  # False: an already complete copy (or a local folder) was used as is
    rows: int  # data lines of styles.csv, before validation
    images: int
    seconds: float


def fetch_dataset(
    source: str,
    raw_root: str | Path,
    *,
    s3_endpoint_url: str | None = None,
    synthetic_size: str = "small",
    synthetic_seed: int = 0,
    kaggle_api: Any = None,
    s3_client: Any = None,
) -> FetchResult:
    """Make `source` available as a raw dataset folder and say where it is; a complete earlier copy is reused."""
    started = time.perf_counter()
    raw_root = Path(raw_root)
    source = source.strip()
    if not source:
        raise SourceError(f"the dataset source is empty: give one of {ACCEPTED_FORMS}")
    if source.startswith("kaggle:"):
        raw_dir, name, downloaded = _fetch_kaggle(source.removeprefix("kaggle:"), raw_root, kaggle_api)
    elif source.startswith("s3://"):
        raw_dir, name, downloaded = _fetch_s3(source, raw_root, s3_client, s3_endpoint_url)
    elif source.startswith("synthetic:"):
        if not (match := _SYNTHETIC.match(source)):
            raise SourceError(f"bad generated-dataset source {source!r}: expected synthetic:N, e.g. synthetic:2000")
        raw_dir, name, downloaded = _fetch_synthetic(int(match.group(1)), raw_root, synthetic_size, synthetic_seed)
    elif _SCHEME.match(source) and not Path(source).exists():
        raise SourceError(f"unknown dataset source {source!r}: expected {ACCEPTED_FORMS}")
    else:
        raw_dir, name, downloaded = _local_dir(Path(source).expanduser()), Path(source).resolve().name, False
    return FetchResult(
        raw_dir=raw_dir,
        name=name,
        source=source,
        downloaded=downloaded,
        rows=count_data_lines(raw_dir / STYLES_FILENAME),
        images=_count_files(raw_dir / IMAGES_DIRNAME),
        seconds=round(time.perf_counter() - started, 3),
    )


def count_data_lines(styles_csv: Path) -> int:
    """Physical lines after the header, ended by LF, CRLF or CR as validate reads them; malformed lines count too."""
    with open(styles_csv, "rb") as fh:
        return max(len(fh.read().splitlines()) - 1, 0)


def _count_files(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    with os.scandir(directory) as entries:
        return sum(1 for entry in entries if entry.is_file())


# --- local folder --------------------------------------------------------------------------------------------------


def find_dataset_root(folder: Path) -> Path | None:
    """The folder holding styles.csv and images/: `folder` itself or one of the Kaggle layouts below it."""
    for layout in KAGGLE_LAYOUTS[::-1]:  # the folder itself first
        candidate = folder / layout if layout else folder
        if (candidate / STYLES_FILENAME).is_file() and (candidate / IMAGES_DIRNAME).is_dir():
            return candidate
    return None


def _local_dir(folder: Path) -> Path:
    # Raw data is immutable: the folder is used where it is, never copied or changed.
    if not folder.is_dir():
        raise SourceError(f"dataset folder {folder} does not exist: expected {ACCEPTED_FORMS}")
    root = find_dataset_root(folder)
    if root is None:
        raise SourceError(
            f"dataset folder {folder} holds no styles.csv with an images/ folder beside it "
            f"(looked in {folder}, {folder / 'fashion-dataset'} and {folder / 'myntradataset'}); "
            "point fetch at the folder that contains both"
        )
    return root.resolve()


# --- marker logic shared by every download -------------------------------------------------------------------------


def _materialize(raw_root: Path, name: str, fill: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """Reuse raw_root/name when complete; else fill a fresh partial folder, mark it complete, rename it into place.

    A lock per dataset makes a second process fetching the same source wait and then reuse the first one's
    download, instead of deleting its partial folder as a leftover.
    """
    dest = raw_root / name
    if io.is_complete(dest):
        log.info("%s is complete, skipping the download", dest)
        return dest, False
    raw_root.mkdir(parents=True, exist_ok=True)
    with io.file_lock(raw_root / f".{name}.lock", f"the fetch of {name}"):
        if io.is_complete(dest):
            log.info("%s was fetched by another process meanwhile: reusing it", dest)
            return dest, False
        if dest.exists():
            # Only complete folders are ever renamed here, so one without the marker is a leftover: redo it.
            log.warning("%s has no completion marker: removing it and fetching again", dest)
            shutil.rmtree(dest)
        partial = raw_root / f".{name}.partial"
        if partial.exists():
            log.warning("removing the leftover of an interrupted fetch: %s", partial)
            shutil.rmtree(partial)
        partial.mkdir()
        staged = partial / "data"
        staged.mkdir()
        try:
            info = fill(staged)
            if not (staged / STYLES_FILENAME).is_file():
                raise SourceError(f"fetching {name} produced no {STYLES_FILENAME}")
        except Exception:
            # A failed fetch can leave gigabytes behind; a killed one is cleaned by the next run instead.
            shutil.rmtree(partial, ignore_errors=True)
            raise
        (staged / IMAGES_DIRNAME).mkdir(exist_ok=True)
        io.mark_complete(staged, {"name": name, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})
        os.replace(staged, dest)
        shutil.rmtree(partial)
    return dest, True


# --- Kaggle --------------------------------------------------------------------------------------------------------


def kaggle_dataset_name(slug: str) -> str:
    """`paramaggarwal/fashion-product-images-dataset` -> `paramaggarwal__fashion-product-images-dataset`."""
    return slug.replace("/", "__")


def kaggle_config_dir() -> Path:
    """Where the kaggle package looks for kaggle.json: $KAGGLE_CONFIG_DIR, ~/.kaggle, then the XDG folder."""
    if value := os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(value).expanduser()
    legacy = Path.home() / ".kaggle"
    if legacy.exists():
        return legacy
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"


def check_kaggle_credentials() -> None:
    """Fail with both options named; the kaggle package itself prints help and calls exit() instead."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return
    if os.environ.get("KAGGLE_API_TOKEN"):
        return
    config_dir = kaggle_config_dir()
    config_file = config_dir / "kaggle.json"
    if config_file.is_file():
        try:
            values = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{config_file} is not valid JSON ({exc}): replace it from kaggle.com/settings") from exc
        if isinstance(values, dict) and values.get("username") and values.get("key"):
            return
        raise SourceError(f"{config_file} lacks 'username' and 'key': create a new API token at kaggle.com/settings")
    if (config_dir / "access_token").is_file():
        return
    legacy = Path.home() / ".kaggle" / "kaggle.json"
    where = (
        f"{config_file}" if config_file == legacy or "KAGGLE_CONFIG_DIR" in os.environ else f"{legacy} or {config_file}"
    )
    raise SourceError(
        "no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json (from kaggle.com/settings, "
        f"'Create New Token') at {where} (the folder can be set with KAGGLE_CONFIG_DIR)"
    )


def _default_kaggle_api() -> Any:
    check_kaggle_credentials()
    # Imported only now: importing the kaggle package authenticates and creates config folders as a side effect.
    from kaggle.api.kaggle_api_extended import KaggleApi

    return KaggleApi()


def _fetch_kaggle(slug: str, raw_root: Path, api: Any) -> tuple[Path, str, bool]:
    if not _KAGGLE_SLUG.match(slug):
        raise SourceError(f"bad Kaggle dataset {slug!r}: expected kaggle:OWNER/DATASET, e.g. {ACCEPTED_FORMS}")
    name = kaggle_dataset_name(slug)
    if io.is_complete(raw_root / name):
        return raw_root / name, name, False

    def fill(staged: Path) -> dict[str, Any]:
        client = api if api is not None else _default_kaggle_api()
        download_dir = staged.parent / "download"
        download_dir.mkdir()
        try:
            client.authenticate()
        except SystemExit as exc:  # the kaggle package exits instead of raising on bad credentials
            raise SourceError("Kaggle authentication failed: check KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json") from exc
        try:
            client.dataset_download_files(slug, path=str(download_dir), unzip=False, quiet=False)
        except Exception as exc:  # network, HTTP and API errors all mean the same thing to the caller
            raise SourceUnavailableError(
                f"downloading kaggle:{slug} failed: {exc}; rerun fetch to start again"
            ) from exc
        archives = sorted(download_dir.glob("*.zip"))
        if len(archives) != 1:
            found = sorted(p.name for p in download_dir.iterdir())
            raise SourceError(f"kaggle:{slug} download produced {found}, expected exactly one .zip archive")
        layout = extract_dataset_zip(archives[0], staged)
        archives[0].unlink()  # the full dataset's archive is ~25 GB: do not keep it beside its contents
        return {"source": f"kaggle:{slug}", "layout": layout or "."}

    dest, downloaded = _materialize(raw_root, name, fill)
    return dest, name, downloaded


def _safe_relative(member: str) -> PurePosixPath | None:
    """The member's path when it stays inside the target folder; None for absolute or `..` paths (zip slip)."""
    path = PurePosixPath(member.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", member):
        return None
    return path


def extract_dataset_zip(archive: Path, target: Path) -> str:
    """Unpack styles.csv and images/ of the first published layout found into target; return that layout.

    The published archives carry the dataset twice (e.g. `fashion-dataset/` and a flat copy) plus per-style JSON
    we do not use, so only one layout's styles.csv and images are extracted.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{archive} is not a complete zip archive ({exc}): rerun fetch to download it again") from exc
    with zf:
        names = set(zf.namelist())
        layout = next((lay for lay in KAGGLE_LAYOUTS if f"{lay}/{STYLES_FILENAME}".lstrip("/") in names), None)
        if layout is None:
            sample = ", ".join(sorted(names)[:8])
            raise SourceError(
                f"{archive} holds no styles.csv at its root, in fashion-dataset/ or in myntradataset/ "
                f"(it starts with: {sample}): is this the Fashion Product Images dataset?"
            )
        base = PurePosixPath(layout) if layout else PurePosixPath()
        target_resolved = target.resolve()
        members = []
        for info in zf.infolist():
            rel = _safe_relative(info.filename)
            if rel is None:
                raise SourceError(f"{archive} has an unsafe member path {info.filename!r}: refusing to extract it")
            if info.is_dir() or not _is_under(rel, base):
                continue
            inner = rel.relative_to(base)
            if inner == PurePosixPath(STYLES_FILENAME) or (len(inner.parts) == 2 and inner.parts[0] == IMAGES_DIRNAME):
                out = (target / inner).resolve()
                if not out.is_relative_to(target_resolved):
                    raise SourceError(f"{archive} member {info.filename!r} escapes {target}: refusing to extract it")
                _check_member(archive, info)
                members.append((info, out))
        total = sum(info.file_size for info, _ in members)
        if total > (limit := max_extracted_bytes()):
            raise SourceError(f"{archive} would extract {total / 1e9:.1f} GB, more than the limit of {limit / 1e9:.1f} "
                              f"GB (${MAX_EXTRACT_ENV}): refusing a possible zip bomb; raise the limit if it is real")
        (target / IMAGES_DIRNAME).mkdir(parents=True, exist_ok=True)
        for info, out in tqdm(members, desc=f"unzip {archive.name}", unit="file", disable=None):
            with zf.open(info) as src, open(out, "wb") as dst:
                _copy_at_most(src, dst, info.file_size, f"{archive} member {info.filename!r}")
    return layout


MAX_EXTRACT_ENV = "FASHION_TAGGER_MAX_EXTRACT_GB"  # what one archive may unpack to; the real dataset is about 25 GB
MAX_EXTRACT_GB = 100.0
MAX_COMPRESSION_RATIO = 200  # a JPEG barely compresses and styles.csv about 5x; zip bombs reach 1000x and more


def max_extracted_bytes() -> int:
    value = os.environ.get(MAX_EXTRACT_ENV, "").strip()
    try:
        gigabytes = float(value) if value else MAX_EXTRACT_GB
    except ValueError:
        raise SourceError(f"${MAX_EXTRACT_ENV} must be a number of GB, not {value!r}") from None
    return int(gigabytes * 1e9)


def _check_member(archive: Path, info: zipfile.ZipInfo) -> None:
    """Refuse links and special files (by their Unix mode) and members that decompress suspiciously far."""
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded (DOS attributes, permissions only)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if kind == stat.S_IFLNK else "a special file"
        raise SourceError(f"{archive} member {info.filename!r} is {what}: the dataset holds plain files only; "
                          "refusing to extract it")
    if info.file_size > (1 << 20) and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise SourceError(f"{archive} member {info.filename!r} expands {info.compress_size} bytes to "
                          f"{info.file_size} (over {MAX_COMPRESSION_RATIO}x): refusing a possible zip bomb")


def _copy_at_most(src: Any, dst: Any, size: int, what: str) -> None:
    """Copy SRC to DST, never more than the SIZE the archive declared (a forged header cannot unpack more)."""
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > size:
            raise SourceError(f"{what} holds more than the {size} bytes its header declares: refusing it")
        dst.write(chunk)


def _is_under(path: PurePosixPath, base: PurePosixPath) -> bool:
    return base == PurePosixPath() or path.parts[: len(base.parts)] == base.parts


# --- S3 / MinIO ----------------------------------------------------------------------------------------------------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    match = re.match(r"^s3://([a-z0-9][a-z0-9.\-]{1,62})(?:/(.*))?$", uri)
    if not match:
        raise SourceError(f"bad S3 source {uri!r}: expected s3://bucket/prefix")
    return match.group(1), (match.group(2) or "").strip("/")


def s3_dataset_name(bucket: str, prefix: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix).strip("-")
    return f"{bucket}__{slug}" if slug else bucket


def _fetch_s3(uri: str, raw_root: Path, client: Any, endpoint_url: str | None) -> tuple[Path, str, bool]:
    bucket, prefix = parse_s3_uri(uri)
    name = s3_dataset_name(bucket, prefix)
    if io.is_complete(raw_root / name):
        return raw_root / name, name, False

    def fill(staged: Path) -> dict[str, Any]:
        s3 = client if client is not None else connect_s3(endpoint_url)
        with s3_errors(f"reading {uri}"):
            keys = list_keys(s3, bucket, f"{prefix}/" if prefix else "")
            base = _s3_dataset_base(keys, prefix)
            if base is None:
                raise SourceError(
                    f"{uri} holds no styles.csv (looked under {prefix or 'the bucket root'} and its "
                    "fashion-dataset/ and myntradataset/ folders): upload styles.csv and images/ there"
                )
            image_prefix = f"{base}{IMAGES_DIRNAME}/"
            jobs = [(f"{base}{STYLES_FILENAME}", staged / STYLES_FILENAME)]
            (staged / IMAGES_DIRNAME).mkdir()
            for key in keys:
                rel = key[len(image_prefix) :] if key.startswith(image_prefix) else ""
                if rel and "/" not in rel and _safe_relative(rel) is not None:
                    jobs.append((key, staged / IMAGES_DIRNAME / rel))
            with ThreadPoolExecutor(S3_DOWNLOAD_THREADS) as pool:
                done = pool.map(lambda job: s3.download_file(bucket, job[0], str(job[1])), jobs)
                for _ in tqdm(done, total=len(jobs), desc=f"s3://{bucket}/{base}", unit="file", disable=None):
                    pass
        return {"source": uri, "layout": base[len(prefix) :].strip("/") or "."}

    dest, downloaded = _materialize(raw_root, name, fill)
    return dest, name, downloaded


def _s3_dataset_base(keys: list[str], prefix: str) -> str | None:
    present = set(keys)
    root = f"{prefix}/" if prefix else ""
    for layout in KAGGLE_LAYOUTS[::-1]:
        base = f"{root}{layout}/" if layout else root
        if f"{base}{STYLES_FILENAME}" in present:
            return base
    return None


# --- generated dataset ---------------------------------------------------------------------------------------------


def synthetic_dataset_name(rows: int, size: str, seed: int) -> str:
    return f"synthetic-{rows}-{size}-seed{seed}"


def _fetch_synthetic(rows: int, raw_root: Path, size: str, seed: int) -> tuple[Path, str, bool]:
    if rows < 1:
        raise SourceError(f"synthetic:{rows} asks for no rows: use synthetic:N with N >= 1")
    if size not in ("small", "full"):
        raise SourceError(f"synthetic size {size!r} is not one of: small, full")
    name = synthetic_dataset_name(rows, size, seed)

    def fill(staged: Path) -> dict[str, Any]:
        from fashion_tagger.data.synthetic.generator import generate_dataset

        generate_dataset(staged, rows=rows, size=size, seed=seed)
        return {"source": f"synthetic:{rows}", "size": size, "seed": seed}

    dest, downloaded = _materialize(raw_root, name, fill)
    return dest, name, downloaded
