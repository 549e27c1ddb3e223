"""Tag a catalog of product photos with one pinned model version: batched, incremental, with a review queue.

`tag_catalog` lists a folder or an s3:// prefix, tags every image whose content this model version has not
tagged yet (DataLoader workers read, hash and decode; the network runs in batches, on the GPU when there is
one) and writes the catalog's tag table, the files it could not read, the review queue and the changed tags
into one folder. The Airflow DAG runs the same steps per shard and merges them. See docs/tagging.md.
"""

from __future__ import annotations

import io as _io
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fashion_tagger.core import io
from fashion_tagger.core.config import Config, load_config
from fashion_tagger.core.errors import DataError, FashionTaggerError
from fashion_tagger.core.parallel import WorkerCount, loader_workers
from fashion_tagger.core.schema import ATTRIBUTES

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from fashion_tagger.serving.predict import Predictor

log = logging.getLogger(__name__)

# The output folder's layout, owned here: other modules and the DAG ask these names, never spell them.
TAGS_FILENAME = "tags.parquet"
REJECTS_FILENAME = "rejects.csv"
REVIEW_CSV, REVIEW_PARQUET = "review.csv", "review.parquet"
CHANGES_CSV, CHANGES_PARQUET = "changes.csv", "changes.parquet"
SUMMARY_FILENAME = "summary.json"
LISTING_FILENAME = "catalog.parquet"  # a listing (id, image_path): what `list_catalog` found, a shard's input
WORK_DIRNAME = "work"  # <out>/work/<run>/: a DAG run's config, pinned model, listing and shard folders
PINNED_MODEL_FILENAME = "model.json"

MANIFEST_FILENAME = "styles.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CONFIDENCE_SUFFIX = "_confidence"  # the same column names as `fashion-tagger predict` and the served model
MODELS_SCHEME = "models:/"
LOCAL_MODEL_NAME = "local"
TAG_COLUMNS = [column for a in ATTRIBUTES for column in (a, f"{a}{CONFIDENCE_SUFFIX}")]
TABLE_COLUMNS = ["id", "image_path", "image_sha256", *TAG_COLUMNS, "model_name", "model_version", "tagged_at"]
REJECT_COLUMNS = ["id", "image_path", "reason"]


class TaggingError(FashionTaggerError):
    """A model URI that does not resolve, or a catalog that cannot be listed."""


def confidence_column(attribute: str) -> str:
    return f"{attribute}{CONFIDENCE_SUFFIX}"


# --- the model: resolved once, then pinned ------------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedModel:
    """One concrete model version: `uri` loads exactly it (`models:/NAME/VERSION` or a local export/checkpoint)."""

    name: str
    version: str
    uri: str
    requested: str  # the URI as given, e.g. models:/fashion-tagger@champion

    def to_dict(self) -> dict[str, str]:
        return {"model_name": self.name, "model_version": self.version, "model_uri": self.uri,
                "requested": self.requested}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PinnedModel:
        return cls(str(data["model_name"]), str(data["model_version"]), str(data["model_uri"]),
                   str(data.get("requested", data["model_uri"])))


def _local_weights(path: Path) -> Path:
    """The file whose bytes are a local model's identity, found as `predict.load_predictor` finds the model."""
    from fashion_tagger.serving.predict import EXPORT_FILENAME, WEIGHTS_FILENAME

    if path.is_dir() and (path / EXPORT_FILENAME).is_file():
        return path / WEIGHTS_FILENAME
    if path.is_dir():
        from fashion_tagger.core.layout import RunLayout, TrainDir

        in_run = RunLayout(path).train
        return (in_run if in_run.dir.is_dir() else TrainDir(path)).checkpoint()
    return path


def resolve_model(model_uri: str, config: Config | None = None) -> PinnedModel:
    """`models:/NAME@ALIAS` -> the version the alias points at now; `models:/NAME/VERSION` as is (checked);
    a local export folder, run folder or checkpoint -> version `sha256:<weights hash>`.

    Called once per catalog run, so that a champion promoted half-way does not mix two models in one table.
    """
    if model_uri.startswith(MODELS_SCHEME):
        from mlflow.exceptions import MlflowException

        from fashion_tagger.core import tracking

        rest = model_uri.removeprefix(MODELS_SCHEME).strip("/")
        name, alias = rest.split("@", 1) if "@" in rest else (rest.rpartition("/")[0], None)
        version = None if alias is not None else rest.rpartition("/")[2]
        if not name or (alias is None and not (version or "").isdigit()):
            raise TaggingError(f"model URI {model_uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
        with tracking.tracking_session(config or load_config()) as client:
            try:
                if alias is not None:
                    version = str(client.get_model_version_by_alias(name, alias).version)
                else:
                    client.get_model_version(name, version)
            except MlflowException as exc:
                raise TaggingError(
                    f"model {model_uri} is not in the registry at {tracking.tracking_uri(config or load_config())}: "
                    f"{exc.message}; register and promote a model first (`fashion-tagger register`), or check "
                    "MLFLOW_TRACKING_URI"
                ) from None
        return PinnedModel(name, str(version), f"{MODELS_SCHEME}{name}/{version}", model_uri)
    path = Path(model_uri).expanduser()
    if not path.exists():
        raise TaggingError(f"model {model_uri!r} is neither a models:/ URI nor an existing export, run folder or "
                           "checkpoint")
    digest = io.sha256_file(_local_weights(path.resolve()))
    return PinnedModel(LOCAL_MODEL_NAME, f"sha256:{digest[:16]}", str(path.resolve()), model_uri)


def _export_dir(model_dir: Path) -> Path:
    """Where a downloaded pyfunc model keeps the exported tagger (its `tagger` artifact)."""
    import yaml

    from fashion_tagger.serving.predict import EXPORT_FILENAME
    from fashion_tagger.serving.pyfunc_model import TAGGER_ARTIFACT

    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        relative = (flavor.get("artifacts") or {}).get(TAGGER_ARTIFACT, {}).get("path")
        if relative and (model_dir / relative / EXPORT_FILENAME).is_file():
            return model_dir / relative
    found = sorted(model_dir.rglob(EXPORT_FILENAME))
    if not found:
        raise TaggingError(f"the model in {model_dir} holds no exported tagger ({EXPORT_FILENAME}): it was not "
                           "logged by `fashion-tagger register`")
    return found[0].parent


def load_tagger(model: PinnedModel, config: Config | None = None, device: str | None = None) -> Predictor:
    """The network and preprocessing the served pyfunc model wraps, loaded once, to run directly in batches."""
    from fashion_tagger.serving.predict import Predictor, load_predictor

    if not model.uri.startswith(MODELS_SCHEME):
        return load_predictor(model.uri, device)
    import mlflow

    from fashion_tagger.core import tracking

    with tracking.tracking_session(config or load_config()), tempfile.TemporaryDirectory(prefix="tagger-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.uri, dst_path=tmp))
        return Predictor.from_export(_export_dir(local), device)  # weights are in memory before tmp goes


def default_device() -> str | None:
    """`$FASHION_TAGGER_DEVICE` (the served model's setting) or None: the GPU when there is one."""
    from fashion_tagger.serving.pyfunc_model import DEVICE_ENV

    return os.environ.get(DEVICE_ENV) or None


# --- the catalog --------------------------------------------------------------------------------------------------


def _manifest_ids(path: Path | str, read: Any = None) -> set[str]:
    """The `id` column of a styles.csv-like file (lines with stray commas skipped, as validate does)."""
    source = read if read is not None else path
    try:
        frame = pd.read_csv(source, dtype=str, on_bad_lines="skip", usecols=lambda c: c.strip() == "id")
    except ValueError as exc:
        raise DataError(f"manifest {path} cannot be read as CSV: {exc}") from None
    if "id" not in [c.strip() for c in frame.columns]:
        raise DataError(f"manifest {path} has no column 'id': it must list the catalog's ids like styles.csv")
    return {value.strip() for value in frame.iloc[:, 0].dropna()}


def _with_manifest(items: pd.DataFrame, ids: set[str] | None, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first image per id (and only listed ids when there is a manifest); the rest become rejects."""
    rejects = []
    duplicated = items["id"].duplicated(keep="first")
    first_path = items.drop_duplicates("id").set_index("id")["image_path"]
    for row in items[duplicated].itertuples(index=False):
        rejects.append({"id": row.id, "image_path": row.image_path,
                        "reason": f"duplicate id: {first_path[row.id]} has the same file name"})
    items = items[~duplicated]
    if ids is not None:
        unlisted = ~items["id"].isin(ids)
        if unlisted.any():
            log.info("%s: %d images are not in the manifest and are left out", where, int(unlisted.sum()))
        items = items[~unlisted]
        for missing in sorted(ids - set(items["id"])):
            rejects.append({"id": missing, "image_path": None, "reason": "in the manifest but no image has this id"})
    return items.reset_index(drop=True), pd.DataFrame(rejects, columns=REJECT_COLUMNS)


def _list_folder(folder: Path, manifest: Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    images_root = folder
    if (folder / "images").is_dir() and (folder / MANIFEST_FILENAME).is_file():  # the Kaggle layout
        images_root = folder / "images"
    if manifest is None and (folder / MANIFEST_FILENAME).is_file():
        manifest = folder / MANIFEST_FILENAME
    files = sorted(p for p in images_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"catalog {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = pd.DataFrame({"id": [p.stem for p in files], "image_path": [str(p) for p in files]})
    return _with_manifest(items, _manifest_ids(manifest) if manifest else None, str(folder))


def _list_s3(uri: str, manifest: Path | None, endpoint_url: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    from botocore.exceptions import BotoCoreError, ClientError

    from fashion_tagger.data.sources import _default_s3_client, _list_keys, parse_s3_uri

    bucket, prefix = parse_s3_uri(uri)
    s3 = _default_s3_client(endpoint_url)
    try:
        keys = _list_keys(s3, bucket, f"{prefix}/" if prefix else "")
        images = sorted(k for k in keys if Path(k).suffix.lower() in IMAGE_SUFFIXES)
        ids = _manifest_ids(manifest) if manifest else None
        manifest_key = f"{prefix}/{MANIFEST_FILENAME}" if prefix else MANIFEST_FILENAME
        if ids is None and manifest_key in keys:
            body = s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
            ids = _manifest_ids(f"s3://{bucket}/{manifest_key}", _io.BytesIO(body))
    except (BotoCoreError, ClientError) as exc:
        raise TaggingError(
            f"listing {uri} failed: {exc} (endpoint: set data.s3_endpoint_url or AWS_ENDPOINT_URL)"
        ) from None
    if not images:
        raise DataError(f"catalog {uri} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = pd.DataFrame({"id": [Path(k).stem for k in images], "image_path": [f"s3://{bucket}/{k}" for k in images]})
    return _with_manifest(items, ids, uri)


def read_listing(path: str | Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    missing = [c for c in ("id", "image_path") if c not in frame.columns]
    if missing:
        raise DataError(f"catalog listing {path} is missing columns: {', '.join(missing)}; write it with "
                        "`list_catalog` (id, image_path)")
    return frame[["id", "image_path"]].astype(str).reset_index(drop=True)


def list_catalog(
    source: str | Path, *, manifest: str | Path | None = None, s3_endpoint_url: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, rejects): one item (id, image_path) per image of SOURCE, id = the file name without suffix.

    SOURCE is a folder (searched recursively; the Kaggle layout styles.csv + images/ too), an s3://bucket/prefix,
    or a listing parquet this function's output was saved as. A manifest (default: styles.csv beside the images)
    limits the catalog to its ids; ids without an image and second files with the same id are rejects.
    """
    manifest = Path(manifest).expanduser() if manifest else None
    if manifest is not None and not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    text = str(source)
    if text.startswith("s3://"):
        return _list_s3(text, manifest, s3_endpoint_url)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".parquet":
        return read_listing(path), pd.DataFrame(columns=REJECT_COLUMNS)
    if not path.is_dir():
        raise DataError(f"catalog {source} is neither a folder, an s3://bucket/prefix nor a listing .parquet")
    return _list_folder(path.resolve(), manifest)


def run_work_dir(out_dir: str | Path, run_name: str) -> Path:
    """Where one orchestrated run keeps its inputs and shard outputs, beside the tags it updates."""
    return Path(out_dir) / WORK_DIRNAME / run_name


def split_listing(items: pd.DataFrame, shard_size: int, out_dir: str | Path) -> list[Path]:
    """Write ITEMS as listings of at most SHARD_SIZE rows: out_dir/shard-00000/catalog.parquet, ..."""
    out_dir = Path(out_dir)
    paths = []
    for number, start in enumerate(range(0, max(len(items), 1), shard_size)):
        path = out_dir / f"shard-{number:05d}" / LISTING_FILENAME
        io.write_parquet(items.iloc[start : start + shard_size], path)
        paths.append(path)
    return paths


# --- reading and decoding in DataLoader workers -------------------------------------------------------------------


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB image exactly as the served model decodes a request (`pyfunc_model.open_image`), so the
    tags of a catalog run equal the served model's for the same file."""
    from PIL import Image

    image = Image.open(_io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class CatalogImages:
    """A map-style dataset over image locations: each item is read, hashed and, unless its hash is in
    `known` (already tagged by this model version), decoded and preprocessed. Failures are returned, not raised."""

    def __init__(self, locations: Sequence[str], transform: Any, known: Iterable[str] = (),
                 s3_endpoint_url: str | None = None) -> None:
        self.locations = list(locations)
        self.transform = transform
        self.known = frozenset(known)
        self.s3_endpoint_url = s3_endpoint_url
        self._s3 = None  # one client per worker process, made on first use (clients do not survive a fork)

    def __len__(self) -> int:
        return len(self.locations)

    def _read(self, location: str) -> bytes:
        if not location.startswith("s3://"):
            return Path(location).read_bytes()
        from botocore.exceptions import BotoCoreError, ClientError

        from fashion_tagger.data.sources import _default_s3_client, parse_s3_uri

        if self._s3 is None:
            self._s3 = _default_s3_client(self.s3_endpoint_url)
        bucket, key = parse_s3_uri(location)
        try:
            return self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise OSError(str(exc)) from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        item: dict[str, Any] = {"index": index, "sha": None, "pixels": None, "error": None}
        try:
            data = self._read(self.locations[index])
        except OSError as exc:
            item["error"] = f"cannot read the file: {exc}"
            return item
        item["sha"] = io.sha256_bytes(data)
        if item["sha"] in self.known:
            return item
        if not data:
            item["error"] = "empty file (0 bytes)"
            return item
        try:
            item["pixels"] = self.transform(decode_image(data))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
            item["error"] = f"not a readable image: {type(exc).__name__}: {exc}"
        return item


def _collate(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    import torch

    decoded = [item.pop("pixels") for item in items if item["pixels"] is not None]
    return items, torch.stack(decoded) if decoded else None


def _one_thread(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # a worker decodes one image at a time; more threads only fight the main process


# --- tagging ------------------------------------------------------------------------------------------------------


@dataclass
class TagCounts:
    tagged: int = 0  # run through the network in this call
    reused: int = 0  # same content already tagged by this model version
    rejected: int = 0
    seconds: float = 0.0


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c.endswith(CONFIDENCE_SUFFIX) else "object")
                         for c in TABLE_COLUMNS})


def _as_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS) if rows else _empty_table()
    for column in TABLE_COLUMNS:
        if column.endswith(CONFIDENCE_SUFFIX):
            frame[column] = frame[column].astype("float64")
    frame["tagged_at"] = pd.to_datetime(frame["tagged_at"], utc=True)
    return frame


def read_table(path: str | Path) -> pd.DataFrame | None:
    """A tag table written by this module, or None when there is none yet."""
    path = Path(path)
    return pd.read_parquet(path) if path.is_file() else None


def tag_items(
    items: pd.DataFrame,
    predictor: Predictor,
    model: PinnedModel,
    *,
    previous: pd.DataFrame | None = None,
    batch_size: int = 64,
    workers: WorkerCount = "auto",
    s3_endpoint_url: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, TagCounts]:
    """(table, rejects, counts) for ITEMS (id, image_path), in their order.

    An image whose content hash PREVIOUS holds under the same model name and version keeps those tags (not
    decoded again); every other readable image goes through the network in batches.
    """
    import torch
    from torch.utils.data import DataLoader

    # Batched convolutions run faster in NHWC (oneDNN on CPU, cuDNN on GPU); the results are the same up to float
    # rounding, so the tags stay the served model's.
    predictor.model.to(memory_format=torch.channels_last)
    known: dict[str, dict[str, Any]] = {}  # content hash -> a row of it; the item's own row where it has one
    own: dict[tuple[str, str], dict[str, Any]] = {}
    if previous is not None and len(previous):
        same = previous[(previous["model_name"] == model.name) & (previous["model_version"] == model.version)]
        for row in same.to_dict("records"):
            known.setdefault(row["image_sha256"], row)
            own[(row["id"], row["image_sha256"])] = row
    dataset = CatalogImages(items["image_path"].tolist(), predictor.transform, known, s3_endpoint_url)
    num_workers = loader_workers(workers, len(items))
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        pin_memory=predictor.device.type == "cuda", worker_init_fn=_one_thread if num_workers else None,
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
    )
    ids, paths = items["id"].tolist(), items["image_path"].tolist()
    rows: list[dict[str, Any] | None] = [None] * len(items)
    rejects: list[dict[str, Any]] = []
    counts = TagCounts()
    started = time.perf_counter()
    for batch, pixels in loader:
        now = datetime.now(UTC)
        to_tag = []
        for item in batch:
            i = item["index"]
            base = {"id": ids[i], "image_path": paths[i], "image_sha256": item["sha"]}
            if item["error"]:
                rejects.append({"id": ids[i], "image_path": paths[i], "reason": item["error"]})
            elif item["sha"] in known:
                rows[i] = {**own.get((ids[i], item["sha"]), known[item["sha"]]), **base}
                counts.reused += 1
            else:
                rows[i] = {**base, "model_name": model.name, "model_version": model.version, "tagged_at": now}
                to_tag.append(i)
        if pixels is None:
            continue
        for attribute, probabilities in predictor.predict_probabilities(pixels).items():
            confidence, index = probabilities.max(1)
            names = predictor.label_space.decode(attribute, index.cpu().tolist())
            for i, name, value in zip(to_tag, names, confidence.cpu().tolist(), strict=True):
                rows[i][attribute] = name
                rows[i][confidence_column(attribute)] = value
        counts.tagged += len(to_tag)
    counts.seconds = time.perf_counter() - started
    counts.rejected = len(rejects)
    return _as_table([r for r in rows if r is not None]), pd.DataFrame(rejects, columns=REJECT_COLUMNS), counts


# --- what the run leaves: review queue, changes, summary ----------------------------------------------------------


def review_queue(table: pd.DataFrame, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """Items with any tag below its attribute's threshold, least confident first: `lowest_confidence` (over all
    its tags) and `low_attributes` (the ones under threshold) lead, then the table's columns."""
    attributes = [a for a in thresholds if a in table.columns and table[confidence_column(a)].notna().any()]
    confidences = table[[confidence_column(a) for a in attributes]]
    low = pd.DataFrame({a: table[confidence_column(a)] < thresholds[a] for a in attributes}, index=table.index)
    queue = table[low.any(axis=1)].copy() if attributes else table.iloc[:0].copy()
    queue.insert(2, "lowest_confidence", confidences.min(axis=1).loc[queue.index] if attributes else [])
    queue.insert(3, "low_attributes", [",".join(a for a in attributes if low.at[i, a]) for i in queue.index])
    return queue.sort_values(["lowest_confidence", "id"], kind="stable").reset_index(drop=True)


def changed_tags(previous: pd.DataFrame | None, table: pd.DataFrame) -> pd.DataFrame:
    """One row per (item, attribute) whose tag differs from the previous table's, with both confidences."""
    columns = ["id", "image_path", "attribute", "previous_tag", "previous_confidence", "tag", "confidence",
               "previous_model_version", "model_version", "previous_image_sha256", "image_sha256"]
    if previous is None or not len(previous) or not len(table):
        return pd.DataFrame(columns=columns)
    both = previous.merge(table, on="id", suffixes=("_previous", ""))
    parts = []
    for attribute in ATTRIBUTES:
        before, after = both[f"{attribute}_previous"], both[attribute]
        differs = (before != after) & ~(before.isna() & after.isna())
        if differs.any():
            rows = both[differs]
            parts.append(pd.DataFrame({
                "id": rows["id"], "image_path": rows["image_path"], "attribute": attribute,
                "previous_tag": rows[f"{attribute}_previous"],
                "previous_confidence": rows[f"{confidence_column(attribute)}_previous"],
                "tag": rows[attribute], "confidence": rows[confidence_column(attribute)],
                "previous_model_version": rows["model_version_previous"], "model_version": rows["model_version"],
                "previous_image_sha256": rows["image_sha256_previous"], "image_sha256": rows["image_sha256"],
            }))
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True).sort_values(["id", "attribute"], kind="stable").reset_index(drop=True)


@dataclass
class TaggingResult(io.StageResult):
    out_dir: Path
    table: Path
    model_name: str
    model_version: str
    model_uri: str
    listed: int  # images in the catalog
    tagged: int  # run through the network in this run
    reused: int  # kept from an earlier run of the same model version (same content hash)
    rejected: int
    review: int
    changed_items: int
    changed_tags: int
    removed: int  # in the previous table, no longer in the catalog
    seconds: float  # tagging time (summed over shards)
    images_per_second: float
    shards: int = 1
    files: dict[str, str] = field(default_factory=dict)


def write_outputs(
    out_dir: str | Path,
    table: pd.DataFrame,
    rejects: pd.DataFrame,
    *,
    model: PinnedModel,
    counts: TagCounts,
    previous: pd.DataFrame | None,
    thresholds: Mapping[str, float],
    shards: int = 1,
) -> TaggingResult:
    """Write the table, rejects, review queue, changes and summary.json into OUT_DIR; the table last but one and
    the summary last, each atomically, so a reader never meets a half-written folder's table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = table.sort_values("id", kind="stable").reset_index(drop=True)
    queue = review_queue(table, thresholds)
    changes = changed_tags(previous, table)
    for frame, csv_name, parquet_name in ((queue, REVIEW_CSV, REVIEW_PARQUET), (changes, CHANGES_CSV, CHANGES_PARQUET)):
        io.write_parquet(frame, out_dir / parquet_name)
        with io.atomic_path(out_dir / csv_name) as tmp:
            frame.to_csv(tmp, index=False)
    with io.atomic_path(out_dir / REJECTS_FILENAME) as tmp:
        rejects.to_csv(tmp, index=False)
    io.write_parquet(table, out_dir / TAGS_FILENAME)
    removed = 0 if previous is None else int((~previous["id"].isin(table["id"])).sum())
    result = TaggingResult(
        out_dir=out_dir, table=out_dir / TAGS_FILENAME, model_name=model.name, model_version=model.version,
        model_uri=model.uri, listed=len(table) + len(rejects), tagged=counts.tagged, reused=counts.reused,
        rejected=len(rejects), review=len(queue), changed_items=int(changes["id"].nunique()),
        changed_tags=len(changes), removed=removed, seconds=round(counts.seconds, 3),
        images_per_second=round(counts.tagged / counts.seconds, 1) if counts.tagged and counts.seconds else 0.0,
        shards=shards,
        files={name: str(out_dir / name) for name in (TAGS_FILENAME, REJECTS_FILENAME, REVIEW_CSV, REVIEW_PARQUET,
                                                      CHANGES_CSV, CHANGES_PARQUET)},
    )
    io.write_json(out_dir / SUMMARY_FILENAME, {**result.to_dict(), "requested_model": model.requested,
                                                "thresholds": dict(thresholds)})
    log.info("tagged %d, reused %d, rejected %d of %d images; %d to review, %d items changed -> %s",
             result.tagged, result.reused, result.rejected, result.listed, result.review, result.changed_items,
             out_dir)
    return result


def tag_catalog(
    source: str | Path,
    model_uri: str | PinnedModel,
    out_dir: str | Path,
    *,
    config: Config | None = None,
    manifest: str | Path | None = None,
    previous: str | Path | None = None,
    device: str | None = None,
) -> TaggingResult:
    """Tag every image of SOURCE with one pinned version of MODEL_URI into OUT_DIR (see the module doc).

    The previous table is OUT_DIR/tags.parquet unless PREVIOUS names another one (a shard compares against
    the merged table). Images it holds under the same model version and content hash are not tagged again.
    """
    config = config or load_config()
    model = model_uri if isinstance(model_uri, PinnedModel) else resolve_model(model_uri, config)
    out_dir = Path(out_dir).expanduser()
    items, rejects = list_catalog(source, manifest=manifest, s3_endpoint_url=config.data.s3_endpoint_url)
    before = read_table(previous if previous is not None else out_dir / TAGS_FILENAME)
    log.info("tagging %d images of %s with %s version %s", len(items), source, model.name, model.version)
    predictor = load_tagger(model, config, device or default_device())
    settings = config.tagging
    table, unreadable, counts = tag_items(items, predictor, model, previous=before, batch_size=settings.batch_size,
                                          workers=settings.workers, s3_endpoint_url=config.data.s3_endpoint_url)
    rejects = pd.concat([df for df in (rejects, unreadable) if len(df)] or [rejects], ignore_index=True)
    return write_outputs(out_dir, table, rejects, model=model, counts=counts, previous=before,
                         thresholds=settings.thresholds)


def merge_shards(
    shard_dirs: Sequence[str | Path],
    out_dir: str | Path,
    model: PinnedModel,
    *,
    config: Config | None = None,
    extra_rejects: pd.DataFrame | None = None,
) -> TaggingResult:
    """Merge shard folders (each written by `tag_catalog`) into OUT_DIR against OUT_DIR's previous table."""
    config = config or load_config()
    out_dir = Path(out_dir)
    tables, rejects, counts = [], [extra_rejects] if extra_rejects is not None else [], TagCounts()
    for shard in map(Path, shard_dirs):
        summary = io.read_json(shard / SUMMARY_FILENAME)
        if (summary["model_name"], summary["model_version"]) != (model.name, model.version):
            raise TaggingError(f"shard {shard} was tagged with {summary['model_name']} version "
                               f"{summary['model_version']}, not the run's pinned version {model.version}")
        tables.append(pd.read_parquet(shard / TAGS_FILENAME))
        rejects.append(pd.read_csv(shard / REJECTS_FILENAME, dtype=str))
        counts.tagged += summary["tagged"]
        counts.reused += summary["reused"]
        counts.seconds += summary["seconds"]
    table = pd.concat([t for t in tables if len(t)] or [_empty_table()], ignore_index=True)
    rejected = pd.concat([r for r in rejects if len(r)] or [pd.DataFrame(columns=REJECT_COLUMNS)], ignore_index=True)
    return write_outputs(out_dir, table, rejected, model=model, counts=counts,
                         previous=read_table(out_dir / TAGS_FILENAME), thresholds=config.tagging.thresholds,
                         shards=len(shard_dirs))


# --- the MLflow summary -------------------------------------------------------------------------------------------


def confidence_histograms(table: pd.DataFrame, thresholds: Mapping[str, float], out_dir: str | Path) -> list[Path]:
    """One PNG per tagged attribute: the histogram of its confidences, the review threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for attribute in ATTRIBUTES:
        values = table[confidence_column(attribute)].dropna() if len(table) else pd.Series(dtype=float)
        if values.empty:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(values, bins=20, range=(0, 1), color="#4c72b0")
        if attribute in thresholds:
            ax.axvline(thresholds[attribute], color="#c44e52", linestyle="--",
                       label=f"review below {thresholds[attribute]:.2f}")
            ax.legend(fontsize=8)
        ax.set(title=f"{attribute}: confidence of {len(values)} tags", xlabel="confidence", ylabel="images")
        fig.tight_layout()
        path = out_dir / f"confidence_{attribute}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def log_summary(out_dir: str | Path, config: Config | None = None, *, tags: Mapping[str, str] | None = None) -> str:
    """Log a finished run's summary to the MLflow experiment `tagging.experiment`: counts and throughput as
    metrics, the model as params, a confidence histogram per attribute and the small CSVs as artifacts."""
    from fashion_tagger.core import tracking

    config = config or load_config()
    out_dir = Path(out_dir)
    summary = io.read_json(out_dir / SUMMARY_FILENAME)
    table = pd.read_parquet(out_dir / TAGS_FILENAME)
    experiment_config = config.model_copy(
        update={"registry": config.registry.model_copy(update={"experiment": config.tagging.experiment})})
    metrics = {key: float(summary[key]) for key in ("listed", "tagged", "reused", "rejected", "review",
                                                    "changed_items", "changed_tags", "removed", "seconds",
                                                    "images_per_second", "shards")}
    for attribute in ATTRIBUTES:
        values = table[confidence_column(attribute)].dropna() if len(table) else pd.Series(dtype=float)
        if len(values):
            metrics[f"mean_confidence.{attribute}"] = float(values.mean())
    with tracking.tracking_session(experiment_config) as client:
        from mlflow.entities import Metric, Param

        experiment_id = tracking.ensure_experiment(client, experiment_config)
        run_tags = {"fashion_tagger.model_name": summary["model_name"],
                    "fashion_tagger.model_version": summary["model_version"], **(tags or {})}
        run = client.create_run(experiment_id, run_name=f"{summary['model_name']}-v{summary['model_version']}",
                                tags=run_tags)
        run_id = run.info.run_id
        stamp = int(time.time() * 1000)
        params = {"model_uri": summary["model_uri"], "requested_model": summary.get("requested_model", ""),
                  "out_dir": str(out_dir), **{f"threshold.{a}": str(v) for a, v in summary["thresholds"].items()}}
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        with tempfile.TemporaryDirectory(prefix="tagging-summary-") as tmp:
            confidence_histograms(table, summary["thresholds"], Path(tmp) / "histograms")
            client.log_artifacts(run_id, str(Path(tmp) / "histograms"), "histograms")
        for name in (SUMMARY_FILENAME, REVIEW_CSV, CHANGES_CSV, REJECTS_FILENAME):
            client.log_artifact(run_id, str(out_dir / name))
        client.set_terminated(run_id)
    log.info("logged the tagging summary as run %s of experiment %s", run_id, config.tagging.experiment)
    return run_id
