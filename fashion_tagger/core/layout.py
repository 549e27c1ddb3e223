"""Where everything lives: the home (raw/, cache/, runs/, locks/, the MLflow store) and one run's folder.

The only module that spells a file or folder name of these layouts; every other module asks it for paths.
A run folder is `<home>/runs/<run id>/` with the run's `config.yaml` and `state.json`, then one folder per
stage output: `validate/`, `split/`, `train/` (checkpoints, metrics, `eval/`, the export and registration).
Catalog tagging has a tags folder of its own (`TagsDir`), with a DAG run's work under `work/<run>/`.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from fashion_tagger.core.errors import ConfigError, RunError

T = TypeVar("T")

CONFIG_FILENAME = "config.yaml"
STYLES_FILENAME = "styles.csv"  # the Kaggle layout of a raw dataset folder
IMAGES_DIRNAME = "images"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# A scheme of two letters at least, so C:\data stays a folder; `s3:/x` (one slash) is a scheme too.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def is_url(location: str | Path) -> bool:
    """Whether LOCATION is a URL (`s3://bucket/prefix`, `gs://...`, a `s3:/x` typo) rather than a folder; a `Path`
    never is. The one test of it: config refuses a URL home, storage opens one, coordination needs a server for it."""
    return isinstance(location, str) and bool(_URL_SCHEME.match(location.strip()))


SCRATCH_ENV = "FASHION_TAGGER_SCRATCH"
APP_NAME = "fashion-tagger"
CALIBRATION_FILENAME = "calibration.json"
HOMES_DIRNAME = "homes"  # <scratch>/homes/<slug>/: this machine's working copy of an object-store home


def scratch_root() -> Path:
    """This machine's scratch folder: $FASHION_TAGGER_SCRATCH, else <user cache dir>/fashion-tagger/scratch
    (platformdirs, else XDG). It may be emptied at any time: everything in it comes back from the store."""
    if os.environ.get(SCRATCH_ENV):
        return Path(os.environ[SCRATCH_ENV]).expanduser().resolve()
    try:
        from platformdirs import user_cache_path

        cache = user_cache_path()
    except ImportError:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / APP_NAME / "scratch"


def home_slug(url: str) -> str:
    """A folder name for an object-store home: readable, and unique per URL (`ft-home-1a2b3c4d5e`)."""
    readable = _UNSAFE.sub("-", url.split("://", 1)[-1]).strip(".-")[:60] or "home"
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def localize_like(path: str | Path, anchor: str | Path) -> Path:
    """PATH, recorded on some machine, as the same file on this one. A path inside another machine's working copy
    of an object-store home (`<its scratch>/homes/<slug>/...`) becomes that path inside the copy ANCHOR is in (a
    folder of this machine's copy of the same home); any other path is returned as it is."""
    path, anchor = Path(path), Path(anchor)
    mine = anchor.parts
    for i in range(len(mine) - 1):
        if mine[i] == HOMES_DIRNAME:
            root, slug = Path(*mine[:i + 2]), mine[i + 1]
            break
    else:
        return path
    parts = path.parts
    for i in range(len(parts) - 1):
        if parts[i] == HOMES_DIRNAME and parts[i + 1] == slug:
            return root.joinpath(*parts[i + 2:])
    return path


def run_dir_name(run_id: str) -> str:
    """A folder name for a run id, unique per run id.

    Airflow run ids hold ':' and '+' (`manual__2025-01-01T00:00:00+00:00`); those become '-', and a short hash
    of the original id is appended whenever anything changed, so two ids never share a folder.
    """
    if not run_id or not run_id.strip():
        raise ConfigError("a run needs a non-empty run id to name its output folder")
    safe = _UNSAFE.sub("-", run_id).strip(".-")[:180] or "run"
    if safe != run_id:
        safe = f"{safe}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"
    return safe


def new_run_id(prefix: str = "cli") -> str:
    """`cli__2026-11-28T19-30-00.123Z-3f9a1c04b2e7`: sortable by start time, unique even within one millisecond
    (48 random bits: 2,000 ids in one millisecond collide with a chance of about 1 in 140 million; the 24 bits
    used before collided in about one test run in eight)."""
    now = datetime.now(UTC)
    return f"{prefix}__{now:%Y-%m-%dT%H-%M-%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(6)}"


class _In(Generic[T]):
    """An entry of a layout: NAME inside the layout's folder (its `dir`, or `root` for a run and the home), as a
    path or as a layout of its own (KIND). `report = _In("report.json", Path)` reads as `self.dir / "report.json"`."""

    def __init__(self, name: str, kind: Callable[[Path], T]) -> None:
        self.name, self.kind = name, kind

    @overload
    def __get__(self, obj: None, owner: type[Any] | None = None) -> _In[T]: ...

    @overload
    def __get__(self, obj: object, owner: type[Any] | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type[Any] | None = None) -> T | _In[T]:
        if obj is None:
            return self
        fields = vars(obj)
        return self.kind(Path(fields["dir"] if "dir" in fields else fields["root"]) / self.name)


@dataclass(frozen=True)
class ValidateDir:
    """`validate/`: the clean table, the rejected lines with their reasons, and the report."""

    dir: Path

    clean = _In("clean.parquet", Path)
    rejects = _In("rejects.csv", Path)
    report = _In("report.json", Path)


SPLIT_PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitDir:
    """`split/`: the encoded parts, the label space, the split report and what `prepare` cached for them."""

    dir: Path

    def part(self, name: str) -> Path:
        if name not in SPLIT_PARTS:
            raise ValueError(f"unknown split part {name!r}; expected one of {SPLIT_PARTS}")
        return self.dir / f"{name}.parquet"

    @property
    def train(self) -> Path:
        return self.part("train")

    @property
    def val(self) -> Path:
        return self.part("val")

    @property
    def test(self) -> Path:
        return self.part("test")

    # fingerprint.json: what a model trained on this split depends on (data, labels, training config).
    fingerprint = _In("fingerprint.json", Path)
    labels = _In("labels.json", Path)
    report = _In("split_report.json", Path)
    prepared = _In("prepared.json", Path)
    prepare_failures = _In("prepare_failures.json", Path)


@dataclass(frozen=True)
class EvalDir:
    """`train/eval/`: metrics, per-row predictions, per-class tables, confusion matrices and their plots."""

    dir: Path

    metrics = _In("metrics.json", Path)
    predictions = _In("predictions.parquet", Path)

    def per_class(self, attribute: str) -> Path:
        return self.dir / f"per_class_{attribute}.csv"

    def confusion(self, attribute: str) -> Path:
        return self.dir / f"confusion_{attribute}.csv"

    def per_class_plot(self, attribute: str) -> Path:
        return self.dir / f"per_class_f1_{attribute}.png"

    def confusion_plot(self, attribute: str) -> Path:
        return self.dir / f"confusion_{attribute}.png"

    def reliability_plot(self, attribute: str) -> Path:
        return self.dir / f"reliability_{attribute}.png"

    def risk_coverage_plot(self, attribute: str) -> Path:
        return self.dir / f"risk_coverage_{attribute}.png"


CHECKPOINT_BEST = "best"  # ModelCheckpoint file names, without the .ckpt suffix Lightning adds
CHECKPOINT_LAST = "last"


@dataclass(frozen=True)
class TrainDir:
    """`train/`: one training run: its config, checkpoints, metrics, evaluation, export and registration."""

    dir: Path

    config = _In(CONFIG_FILENAME, Path)
    checkpoints = _In("checkpoints", Path)

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / f"{CHECKPOINT_BEST}.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / f"{CHECKPOINT_LAST}.ckpt"

    def checkpoint(self) -> Path:
        """The one checkpoint lookup: the best checkpoint, else the last one."""
        for path in (self.best_checkpoint, self.last_checkpoint):
            if path.is_file():
                return path
        raise RunError(f"{self.checkpoints} holds no {self.best_checkpoint.name} or {self.last_checkpoint.name}: "
                       "train the run first")

    # run.json: the split the run trained on, the label space hash, attempts, precision.
    run_info = _In("run.json", Path)
    # calibration.json: per attribute the temperature and the review threshold fitted on the validation part.
    calibration = _In(CALIBRATION_FILENAME, Path)

    def recorded_split(self) -> Path:
        """The one answer to "which split did this training run use": what `train` recorded in run.json."""
        from fashion_tagger.core.io import read_json

        if not self.run_info.is_file():
            raise RunError(f"{self.run_info} does not exist: {self.dir} has not been trained yet")
        split_dir = localize_like(read_json(self.run_info)["split_dir"], self.dir)
        if not SplitDir(split_dir).labels.is_file():
            raise RunError(f"{self.dir} was trained on {split_dir}, which no longer holds a split (no labels.json)")
        return split_dir

    metrics = _In("metrics.json", Path)
    logs = _In("logs", Path)
    eval = _In("eval", EvalDir)
    export = _In("export", Path)
    registration = _In("registration.json", Path)
    model_card = _In("model_card.md", Path)
    sample_grid = _In("sample_predictions.png", Path)
    # mlflow_run.json: the MLflow run that tracks this training run, so later stages log into it.
    mlflow_run = _In("mlflow_run.json", Path)


@dataclass(frozen=True, order=True)
class RunLayout:
    """One run's folder: `config.yaml`, `state.json` and the stages' output folders."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    config = _In(CONFIG_FILENAME, Path)
    state = _In("state.json", Path)
    validate = _In("validate", ValidateDir)
    split = _In("split", SplitDir)
    train = _In("train", TrainDir)

    def to_dict(self) -> dict[str, str]:
        return {"root": str(self.root), "config": str(self.config), "validate": str(self.validate.dir),
                "split": str(self.split.dir), "train": str(self.train.dir)}


@dataclass(frozen=True)
class TagsDir:
    """The tags folder of `fashion-tagger tag` and of the tagging DAG: the catalog's tag table, the files it could
    not read, the review queue, the changed tags and the summary; a DAG run's inputs and shards under `work/`."""

    dir: Path

    tags = _In("tags.parquet", Path)
    rejects = _In("rejects.csv", Path)
    review_csv = _In("review.csv", Path)
    review_parquet = _In("review.parquet", Path)
    changes_csv = _In("changes.csv", Path)
    changes_parquet = _In("changes.parquet", Path)
    summary = _In("summary.json", Path)

    def work(self, run_id: str) -> TaggingWorkDir:
        """`work/<run>/`: where one orchestrated run keeps its inputs and shard outputs, beside the tags it updates."""
        return TaggingWorkDir(self.dir / "work" / run_dir_name(run_id))


LISTING_FILENAME = "catalog.parquet"  # a catalog listing (id, image_path): a shard's input


@dataclass(frozen=True)
class ShardDir(TagsDir):
    """`shard-00000/`: one shard's listing (`catalog.parquet`) and the tags `fashion-tagger tag` writes for it."""

    listing = _In(LISTING_FILENAME, Path)


@dataclass(frozen=True)
class TaggingWorkDir:
    """`work/<run>/`: one tagging DAG run's config.yaml, pinned model.json, the catalog's listing with the rejects of
    listing it, and one folder per shard."""

    dir: Path

    config = _In(CONFIG_FILENAME, Path)
    model = _In("model.json", Path)
    listing = _In(LISTING_FILENAME, Path)
    rejects = _In("rejects.csv", Path)

    def shard(self, number: int) -> ShardDir:
        return ShardDir(self.dir / f"shard-{number:05d}")


@dataclass(frozen=True)
class Home:
    """The data root: shared raw downloads, the prepared-image cache, runs, locks and the embedded MLflow store.

    ROOT is always a local folder. For an object-store home, URL is the store (`s3://bucket/prefix`) and ROOT
    this machine's working copy of it under the scratch folder (`mirror`); `workspace.Workspace` stages files
    between the two.
    """

    root: Path
    url: str | None = None

    @classmethod
    def mirror(cls, url: str) -> Home:
        """The home at the object-store URL, worked on in `<scratch>/homes/<slug>/` on this machine."""
        return cls(scratch_root() / HOMES_DIRNAME / home_slug(url), url)

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    @property
    def location(self) -> str:
        """The home as a user writes it: the URL, or the folder."""
        return self.url or str(self.root)

    def localize(self, path: str | Path) -> Path:
        """PATH as recorded by a stage that may have run on another machine, inside this machine's copy of the
        home (`localize_like`)."""
        return localize_like(path, self.root)

    raw = _In("raw", Path)
    cache = _In("cache", Path)
    runs = _In("runs", Path)
    weights = _In("weights", Path)
    # The catalog of product photos the tagging DAG tags when neither its form nor the environment names one.
    catalog = _In("catalog", Path)
    tags = _In("tags", TagsDir)
    mlflow_db = _In("mlflow.db", Path)
    mlflow_artifacts = _In("mlartifacts", Path)
    coordination_db = _In("coordination.db", Path)
    # `test_membership/`: the append-only record of which image (duplicate group) belongs to a test part.
    test_memberships = _In("test_membership", Path)

    def test_membership(self, test_fraction: float, seed: int) -> Path:
        """One membership table per (test fraction, seed): `test_membership/test-0.1-seed42.parquet`."""
        return self.test_memberships / f"test-{test_fraction:g}-seed{seed}.parquet"

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(self.runs / run_dir_name(run_id))

    def find_run(self, ref: str | Path) -> RunLayout:
        """A run by id (its folder name under runs/) or by folder path; an error naming both when neither exists."""
        text = str(ref).strip()
        if not text:
            raise RunError("no run given: pass a run id (see `fashion-tagger runs`) or a run folder")
        candidates = [Path(text).expanduser()] if ("/" in text or text.startswith(".")) else []
        candidates.append(self.runs / text)
        for candidate in candidates:
            layout = RunLayout(candidate.resolve())
            if layout.config.is_file():
                return layout
        raise RunError(f"run {text!r} not found: no {CONFIG_FILENAME} in {' or '.join(map(str, candidates))}; "
                       "`fashion-tagger runs` lists the runs of this home")

    def run_layouts(self) -> list[RunLayout]:
        """Every run folder of this home (one with a config.yaml), oldest first by name."""
        if not self.runs.is_dir():
            return []
        return sorted(RunLayout(p) for p in self.runs.iterdir() if (p / CONFIG_FILENAME).is_file())


def cache_size_dir(cache_root: str | Path, width: int, height: int) -> Path:
    return Path(cache_root) / "images" / f"{width}x{height}"


def cached_image_path(cache_root: str | Path, image_sha256: str, width: int, height: int) -> Path:
    """`<cache>/images/<W>x<H>/<sha[:2]>/<sha>.jpg`: one file per distinct image content and size."""
    return cache_size_dir(cache_root, width, height) / image_sha256[:2] / f"{image_sha256}.jpg"
