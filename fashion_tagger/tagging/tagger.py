"""Tag catalog items with one pinned model version: resolve the version once, load the served model's network and
preprocessing, and run it in batches while DataLoader workers read, hash and decode the images; content this
version has tagged already keeps its tags.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from fashion_tagger.core import io
from fashion_tagger.core.config import DEFAULT_REVIEW_THRESHOLDS, Config, TaggingConfig, load_config
from fashion_tagger.core.parallel import WorkerCount, loader_workers
from fashion_tagger.core.schema import ATTRIBUTES
from fashion_tagger.data.imaging import decode_image
from fashion_tagger.serving.rows import CONFIDENCE_SUFFIX, confidence_column, label_columns, read_one
from fashion_tagger.tagging.catalog import REJECT_COLUMNS, ImageReader, NoModelYet, TaggingError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from fashion_tagger.serving.predictor import Predictor

MODELS_SCHEME = "models:/"
LOCAL_MODEL_NAME = "local"
# The same column names as `fashion-tagger predict` and the served model.
TAG_COLUMNS = [column for a in ATTRIBUTES for column in (a, confidence_column(a))]
TABLE_COLUMNS = ["id", "image_path", "image_sha256", *TAG_COLUMNS, "model_name", "model_version", "tagged_at"]


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


def requested_model(config: Config) -> str:
    """`tagging.model`, or the champion of the registered model: models:/<registry.model_name>@champion."""
    return config.tagging.model or f"{MODELS_SCHEME}{config.registry.model_name}@champion"


def resolve_model(model_uri: str, config: Config | None = None) -> PinnedModel:
    """`models:/NAME@ALIAS` -> the version the alias points at now; `models:/NAME/VERSION` as is (checked);
    a local export folder, run folder or checkpoint -> version `sha256:<weights hash>`.

    Called once per catalog run, so that a champion promoted half-way does not mix two models in one table.
    """
    if model_uri.startswith(MODELS_SCHEME):
        from mlflow.exceptions import MlflowException

        from fashion_tagger.core import tracking

        rest = model_uri.removeprefix(MODELS_SCHEME).strip("/")
        alias: str | None = None
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = ""
        else:
            name, _, version = rest.rpartition("/")
        if not name or (alias is None and not version.isdigit()):
            raise TaggingError(f"model URI {model_uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
        with tracking.tracking_session(config or load_config()) as client:
            try:
                if alias is not None:
                    version = str(client.get_model_version_by_alias(name, alias).version)
                else:
                    client.get_model_version(name, version)
            except MlflowException as exc:
                missing = exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in exc.message.lower()
                raise (NoModelYet if missing else TaggingError)(
                    f"model {model_uri} is not in the registry at {tracking.tracking_uri(config or load_config())}: "
                    f"{exc.message}; register and promote a model first (`fashion-tagger register`), or check "
                    "MLFLOW_TRACKING_URI"
                ) from None
        return PinnedModel(name, str(version), f"{MODELS_SCHEME}{name}/{version}", model_uri)
    path = Path(model_uri).expanduser()
    if not path.exists():
        raise TaggingError(f"model {model_uri!r} is neither a models:/ URI nor an existing export, run folder or "
                           "checkpoint")
    from fashion_tagger.serving.predictor import WEIGHTS_FILENAME, model_location

    location = model_location(path.resolve())  # the file whose bytes are the local model's identity
    digest = io.sha256_file(location / WEIGHTS_FILENAME if location.is_dir() else location)
    return PinnedModel(LOCAL_MODEL_NAME, f"sha256:{digest[:16]}", str(path.resolve()), model_uri)


def load_tagger(model: PinnedModel, config: Config | None = None, device: str | None = None) -> Predictor:
    """The network and preprocessing the served pyfunc model wraps, loaded once, to run directly in batches."""
    from fashion_tagger.serving.predictor import Predictor, default_device, load_predictor

    device = device or default_device()
    if not model.uri.startswith(MODELS_SCHEME):
        return load_predictor(model.uri, device)
    import mlflow

    from fashion_tagger.core import tracking
    from fashion_tagger.serving.pyfunc_model import exported_tagger

    with tracking.tracking_session(config or load_config()), tempfile.TemporaryDirectory(prefix="tagger-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.uri, dst_path=tmp))
        return Predictor.from_export(exported_tagger(local), device)  # weights are in memory before tmp goes


def review_thresholds(predictor: Predictor, settings: TaggingConfig) -> dict[str, dict[str, Any]]:
    """Per attribute of the model, the threshold its tags are accepted at and where it comes from: a hand-set
    `tagging.thresholds` value; else the model's own, chosen on validation for its precision target when it was
    trained (None: no threshold reached the target, so every tag is reviewed); else, for a model without
    calibration, DEFAULT_REVIEW_THRESHOLDS."""
    own = predictor.calibration.get("thresholds", {})
    chosen: dict[str, dict[str, Any]] = {}
    for attribute in predictor.attributes:
        if attribute in settings.thresholds:
            chosen[attribute] = {"threshold": settings.thresholds[attribute], "source": "tagging.thresholds"}
        elif attribute in own:
            entry = own[attribute]
            chosen[attribute] = {"threshold": entry.get("threshold"), "source": "model",
                                 "target_precision": entry.get("target"),
                                 "validation_precision": entry.get("precision")}
        else:
            chosen[attribute] = {"threshold": DEFAULT_REVIEW_THRESHOLDS.get(attribute),
                                 "source": "default (the model carries no calibrated threshold)"}
    return chosen


# --- reading and decoding in DataLoader workers -------------------------------------------------------------------


class CatalogImages:
    """A map-style dataset over image locations: each item is read, hashed and, unless its hash is in
    `known` (already tagged by this model version), decoded and preprocessed. Failures are returned, not raised."""

    def __init__(self, locations: Sequence[str], transform: Any, known: Iterable[str] = (),
                 s3_endpoint_url: str | None = None) -> None:
        self.locations = list(locations)
        self.transform = transform
        self.known = frozenset(known)
        self.read = ImageReader(s3_endpoint_url)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        location = self.locations[index]
        item: dict[str, Any] = {"index": index, "sha": None, "pixels": None, "error": None}
        data, item["error"] = read_one(lambda: self.read(location))
        if data is None:
            return item
        item["sha"] = io.sha256_bytes(data)
        if item["sha"] not in self.known:
            # Decoded as the served model decodes a request, so a catalog's tags equal the served model's.
            item["pixels"], item["error"] = read_one(lambda: self.transform(decode_image(data, name=location)))
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


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c.endswith(CONFIDENCE_SUFFIX) else "object")
                         for c in TABLE_COLUMNS})


def _as_table(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in TABLE_COLUMNS:
        if column.endswith(CONFIDENCE_SUFFIX):
            frame[column] = frame[column].astype("float64")
    frame["tagged_at"] = pd.to_datetime(frame["tagged_at"], utc=True)
    return frame


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
    from torch.utils.data import DataLoader, Dataset

    # Batched convolutions run faster in NHWC (oneDNN on CPU, cuDNN on GPU); the results are the same up to float
    # rounding, so the tags stay the served model's.
    predictor.model.to(memory_format=torch.channels_last)
    # The table is built in columns, not in one dict per image: memory stays a few bytes a row, and the previous
    # table's rows are taken by position, not copied out one by one.
    same = empty_table()
    known: dict[str, int] = {}  # content hash -> the position in SAME of a row of it
    own: dict[tuple[str, str], int] = {}  # (id, content hash) -> the position of the item's own row
    if previous is not None and len(previous):
        mine = (previous["model_name"] == model.name) & (previous["model_version"] == model.version)
        same = previous[mine].reset_index(drop=True)
        for position, (item_id, sha) in enumerate(zip(same["id"].tolist(), same["image_sha256"].tolist(),
                                                      strict=True)):
            known.setdefault(sha, position)
            own[(item_id, sha)] = position
    dataset = CatalogImages(items["image_path"].tolist(), predictor.transform, known, s3_endpoint_url)
    num_workers = loader_workers(workers, len(items))
    # A map-style dataset by duck typing: subclassing torch's Dataset would import torch with this module.
    loader: DataLoader[dict[str, Any]] = DataLoader(
        cast("Dataset[dict[str, Any]]", dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        pin_memory=predictor.device.type == "cuda", worker_init_fn=_one_thread if num_workers else None,
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
    )
    ids, paths = items["id"].tolist(), items["image_path"].tolist()
    new: dict[str, list[Any]] = {column: [] for column in ("order", "id", "image_path", "image_sha256", "tagged_at")}
    tags: dict[str, list[Any]] = {column: [] for column in TAG_COLUMNS}
    reused: dict[str, list[Any]] = {column: [] for column in ("order", "id", "image_path", "image_sha256", "row")}
    pending: list[torch.Tensor] = []  # decoded images not yet through the network, in the order of `new`
    rejects: list[dict[str, Any]] = []
    counts = TagCounts()

    def run_pending() -> None:
        # Images to tag are gathered into full batches: on a rerun, where most are known, the few new ones of each
        # loader batch would otherwise go through the network a handful at a time.
        columns = label_columns(predictor.predict_probabilities(torch.cat(pending)), predictor.label_space)
        for name, values in columns.items():
            tags[name].extend(values)
        counts.tagged += sum(len(p) for p in pending)
        pending.clear()

    started = time.perf_counter()
    for batch, pixels in loader:
        now = datetime.now(UTC)
        for item in batch:
            i, sha = item["index"], item["sha"]
            if item["error"]:
                rejects.append({"id": ids[i], "image_path": paths[i], "reason": item["error"]})
                continue
            into = reused if sha in known else new
            for column, value in (("order", i), ("id", ids[i]), ("image_path", paths[i]), ("image_sha256", sha)):
                into[column].append(value)
            if into is reused:
                reused["row"].append(own.get((ids[i], sha), known[sha]))
            else:
                new["tagged_at"].append(now)
        if pixels is not None:
            pending.append(pixels)
            if sum(len(p) for p in pending) >= batch_size:
                run_pending()
    if pending:
        run_pending()
    counts.seconds = time.perf_counter() - started
    counts.reused = len(reused["order"])
    counts.rejected = len(rejects)
    # An attribute without a head in this model (no trainable class) has no tags: its columns stay empty.
    fresh = pd.DataFrame({**new, **{name: values for name, values in tags.items() if values},
                          "model_name": model.name, "model_version": model.version})
    kept = same.iloc[reused.pop("row")].reset_index(drop=True).assign(**reused)
    parts = [part for part in (fresh, kept) if len(part)]
    if not parts:
        return empty_table(), pd.DataFrame(rejects, columns=REJECT_COLUMNS), counts
    table = pd.concat(parts, ignore_index=True).sort_values("order", kind="stable").reset_index(drop=True)
    return _as_table(table.reindex(columns=TABLE_COLUMNS)), pd.DataFrame(rejects, columns=REJECT_COLUMNS), counts
