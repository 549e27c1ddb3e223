"""Tag product photos: a `Predictor` built from a training checkpoint or a Lightning-free export.

Raw images go through the same fit-into-width x height, pad-white step as `prepare`, then the backbone's
normalisation, so a photo is seen exactly as the cached training images were. The export (weights.pt +
tagger.json) needs only torch, timm and Pillow; the MLflow pyfunc model is built on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fashion_tagger.core.errors import DataError, FashionTaggerError
from fashion_tagger.core.layout import RunLayout, TrainDir
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.data.prepare import resize_image
from fashion_tagger.model.network import NETWORK_FIELDS, FashionTagger, build_network

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
EXPORT_FILENAME = "tagger.json"
WEIGHTS_FILENAME = "weights.pt"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
CONFIDENCE_SUFFIX = "_confidence"
ERROR_COLUMN = "error"  # None for a tagged image, else why it could not be read (its tags stay empty)


class ImageTransform:
    """PIL image -> normalised float tensor (3 x height x width): fit, pad white, RGB, scale, normalise."""

    def __init__(self, width: int, height: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.width, self.height = int(width), int(height)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = resize_image(image, self.width, self.height)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float() / 255.0 - self.mean) / self.std


class Predictor:
    """A tagger in eval mode plus everything needed to preprocess images and decode its outputs."""

    def __init__(
        self,
        model: FashionTagger,
        label_space: LabelSpace,
        image_size: Sequence[int],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        model_config: dict[str, Any],
        config: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.label_space = label_space
        self.image_size = (int(image_size[0]), int(image_size[1]))  # (width, height)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.model_config = {k: model_config[k] for k in NETWORK_FIELDS}
        self.config = config or {}  # the training config, when built from a checkpoint
        self.transform = ImageTransform(*self.image_size, self.mean, self.std)

    @property
    def attributes(self) -> list[str]:
        return self.label_space.attributes

    @classmethod
    def _build(
        cls,
        model_config: dict[str, Any],
        labels: dict[str, Any],
        image_size: Sequence[int],
        state_dict: dict[str, torch.Tensor],
        device: str | torch.device | None,
        **kwargs: Any,
    ) -> Predictor:
        label_space = LabelSpace.from_dict(labels)
        model = build_network(model_config, label_space.num_classes)
        model.load_state_dict(state_dict)
        mean = kwargs.pop("mean", None) or model.data_config["mean"]
        std = kwargs.pop("std", None) or model.data_config["std"]
        return cls(model, label_space, image_size, mean=mean, std=std, model_config=model_config, device=device,
                   **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> Predictor:
        """Rebuild from a training checkpoint; the network comes from its hyperparameters, not from the hub."""
        path = Path(path)
        if not path.is_file():
            raise FashionTaggerError(f"checkpoint {path} does not exist")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError... for non-checkpoints
            raise FashionTaggerError(
                f"{path} is not a fashion-tagger checkpoint: torch cannot load it ({_first_line(exc)}); "
                "give a .ckpt written by `fashion-tagger train`"
            ) from exc
        hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
        if not {"config", "labels", "image_size"} <= set(hparams) or "state_dict" not in checkpoint:
            raise FashionTaggerError(f"{path} is not a fashion-tagger checkpoint (no config/labels in its hparams)")
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        with _rebuilding(path):
            return cls._build(
                hparams["config"]["model"], hparams["labels"], hparams["image_size"], state, device,
                config=hparams["config"],
            )

    def identity(self) -> str:
        """What this tagger computes, as a hash: its weights' tensors, the label space and the preprocessing.

        Two checkpoints of the same weights hash alike, although their files differ (optimizer state, epoch
        counters, pickling order), so a model registered once is recognised from any run that produced it.
        """
        digest = hashlib.sha256()
        spec = {
            "model": self.model_config,
            "labels": {attribute: list(names) for attribute, names in self.label_space.classes.items()},
            "image": {"width": self.image_size[0], "height": self.image_size[1], "mean": self.mean, "std": self.std},
        }
        digest.update(json.dumps(spec, sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def export(self, directory: str | Path) -> Path:
        """Write weights.pt (state dict) and tagger.json (network, labels, image size, normalisation)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, directory / WEIGHTS_FILENAME)
        spec = {
            "format_version": EXPORT_FORMAT_VERSION,
            "model": self.model_config,
            "labels": self.label_space.to_dict(),
            "image": {"width": self.image_size[0], "height": self.image_size[1], "mean": self.mean, "std": self.std},
        }
        (directory / EXPORT_FILENAME).write_text(json.dumps(spec, indent=2) + "\n")
        return directory

    @classmethod
    def from_export(cls, directory: str | Path, device: str | torch.device | None = None) -> Predictor:
        directory = Path(directory)
        spec_path = directory / EXPORT_FILENAME
        if not spec_path.is_file():
            raise FashionTaggerError(f"{directory} is not a tagger export: {EXPORT_FILENAME} is missing")
        with _rebuilding(directory):
            spec = json.loads(spec_path.read_text())
            if spec.get("format_version") != EXPORT_FORMAT_VERSION:
                raise FashionTaggerError(
                    f"{spec_path}: format_version {spec.get('format_version')!r} is not supported"
                )
            state = torch.load(directory / WEIGHTS_FILENAME, map_location="cpu", weights_only=True)
            image = spec["image"]
            return cls._build(
                spec["model"], spec["labels"], (image["width"], image["height"]), state, device,
                mean=image["mean"], std=image["std"],
            )

    def preprocess(self, images: Iterable[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    @torch.inference_mode()
    def predict_probabilities(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax probabilities per attribute for a preprocessed batch (N x 3 x H x W)."""
        logits = self.model(batch.to(self.device, non_blocking=True))
        return {a: torch.softmax(v.float(), dim=1) for a, v in logits.items()}

    def predict(self, images: Sequence[Image.Image], batch_size: int = 64) -> pd.DataFrame:
        """One row per image: `<attribute>` (class name) and `<attribute>_confidence` (its probability)."""
        columns: dict[str, list[Any]] = {}
        for attribute in self.attributes:
            columns[attribute], columns[f"{attribute}{CONFIDENCE_SUFFIX}"] = [], []
        for start in range(0, len(images), batch_size):
            probabilities = self.predict_probabilities(self.preprocess(images[start : start + batch_size]))
            for attribute, probs in probabilities.items():
                confidence, index = probs.max(1)
                columns[attribute].extend(self.label_space.decode(attribute, index.cpu().tolist()))
                columns[f"{attribute}{CONFIDENCE_SUFFIX}"].extend(confidence.cpu().tolist())
        return pd.DataFrame(columns)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextmanager
def _rebuilding(source: Path) -> Iterator[None]:
    """A checkpoint or export that loads but cannot be turned back into the tagger is named in one line."""
    try:
        yield
    except FashionTaggerError:
        raise
    except Exception as exc:  # noqa: BLE001 - JSON, torch and timm each raise their own types for a damaged file
        raise FashionTaggerError(f"cannot rebuild the tagger from {source}: {_first_line(exc)}") from exc


def with_errors(table: pd.DataFrame, errors: Sequence[str | None]) -> pd.DataFrame:
    """One row per input: TABLE holds the predictions of the readable inputs (those whose error is None), in
    order; an unreadable input gets empty tags and its error in the `error` column."""
    readable = [i for i, error in enumerate(errors) if error is None]
    out = table.reset_index(drop=True).set_axis(readable).reindex(range(len(errors)))
    out[ERROR_COLUMN] = pd.Series(list(errors), dtype=object)
    return out


def failed_images(table: pd.DataFrame) -> int:
    """How many rows of a prediction table hold an error instead of tags."""
    return int(table[ERROR_COLUMN].notna().sum()) if ERROR_COLUMN in table.columns else 0


def read_image(path: str | Path, width: int, height: int) -> Image.Image:
    """The image at PATH fully decoded and fitted into width x height as `prepare` does.

    Raises whatever Pillow raises for a file it cannot read: OSError (truncated, not an image),
    DecompressionBombError, ValueError, SyntaxError..., which become that row's `error`.
    """
    with Image.open(path) as image:
        return resize_image(image, width, height)


def load_predictor(path: str | Path, device: str | torch.device | None = None) -> Predictor:
    """A .ckpt file, an export directory (tagger.json), a run folder or its train/ folder (the best checkpoint)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / EXPORT_FILENAME).is_file():
        return Predictor.from_export(path, device)
    if path.is_dir():
        in_run = RunLayout(path).train
        train_dir = in_run if in_run.dir.is_dir() else TrainDir(path)
        return Predictor.from_checkpoint(train_dir.checkpoint(), device)
    return Predictor.from_checkpoint(path, device)


def collect_images(inputs: Iterable[str | Path]) -> tuple[list[Path], bool]:
    """Image files from files and folders (folders searched recursively, sorted); True when a folder was given."""
    files: list[Path] = []
    had_folder = False
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            had_folder = True
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
    return files, had_folder


def _predict_files(predictor: Predictor, files: Sequence[Path], batch_size: int = 64) -> pd.DataFrame:
    """Decode (to the model's size) at most one batch of files at a time; an unreadable file becomes an error row."""
    tables, errors = [], []
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start : start + batch_size]:
            try:
                images.append(read_image(path, *predictor.image_size))
                errors.append(None)
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file; each becomes a row
                errors.append(_first_line(exc))
        if images or not tables:  # an all-unreadable batch adds no rows; the first one still gives the columns
            tables.append(predictor.predict(images, batch_size=batch_size))
    return with_errors(pd.concat(tables, ignore_index=True), errors)


def _predict_with_mlflow(model_uri: str, files: Sequence[Path]) -> pd.DataFrame:
    from mlflow.exceptions import MlflowException

    # Resolves models:/ URIs against this project's store even when MLFLOW_TRACKING_URI is unset.
    from fashion_tagger.core.tracking import load_model

    try:
        model = load_model(model_uri)
    except MlflowException as exc:
        raise FashionTaggerError(
            f"cannot load the model {model_uri!r}: {_first_line(exc)}; give models:/NAME@ALIAS, models:/NAME/VERSION, "
            "runs:/RUN_ID/model or a model folder (`fashion-tagger models` lists versions and aliases)"
        ) from exc
    # Unreadable files are caught here, so the model only sees images (older models reject a whole batch).
    errors: list[str | None] = []
    for path in files:
        try:
            read_image(path, 64, 64)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - as in _predict_files
            errors.append(_first_line(exc))
    readable = [path for path, error in zip(files, errors, strict=True) if error is None]
    if not readable:
        return with_errors(pd.DataFrame(), errors)
    try:
        table = pd.DataFrame(model.predict(pd.DataFrame({"image": [path.read_bytes() for path in readable]})))
    except MlflowException as exc:
        raise FashionTaggerError(f"the model {model_uri!r} refused the images: {_first_line(exc)}") from exc
    model_errors = table.pop(ERROR_COLUMN) if ERROR_COLUMN in table.columns else None
    out = with_errors(table, errors)
    if model_errors is not None:
        rows = [i for i, error in enumerate(errors) if error is None]
        out.loc[rows, ERROR_COLUMN] = model_errors.where(model_errors.notna(), None).tolist()
    return out


def attributes_of(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if f"{c}{CONFIDENCE_SUFFIX}" in table.columns]


def draw_grid(files: Sequence[Path], table: pd.DataFrame, out_path: str | Path, *, columns: int = 4) -> Path:
    """The images with their predicted tags underneath (the reference notebook's external-image check)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = attributes_of(table)
    columns = max(1, min(columns, len(files)))
    rows = math.ceil(len(files) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, (4.2 + 0.17 * len(attributes)) * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, (_, row) in zip(axes.flat, files, table.iterrows(), strict=False):
        if isinstance(row.get(ERROR_COLUMN), str):
            ax.imshow(Image.new("RGB", (240, 320), (235, 235, 235)))  # the same frame as a tagged image
            ax.text(0.5, 0.5, textwrap.fill(row[ERROR_COLUMN][:200], 34), transform=ax.transAxes, ha="center",
                    va="center", fontsize=7, color="darkred")
            tags = "(not tagged)"
        else:
            ax.imshow(read_image(path, 240, 320))
            tags = "\n".join(f"{a}: {row[a]} ({row[f'{a}{CONFIDENCE_SUFFIX}']:.2f})" for a in attributes)
        ax.set_title(path.name, fontsize=8)
        ax.text(0.5, -0.02, tags, transform=ax.transAxes, ha="center", va="top", fontsize=7, family="monospace")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def run_predict(
    images: Sequence[str | Path],
    *,
    checkpoint: str | Path | None = None,
    model_uri: str | None = None,
    as_json: bool = False,
    out_csv: str | Path | None = None,
    grid: str | Path | None = None,
) -> pd.DataFrame:
    """Tag image files/folders with a checkpoint (or export/run dir) or an MLflow model URI.

    Prints a table (or JSON records) to stdout; writes a CSV to `out_csv`, by default predictions.csv in
    the working directory when a folder was given; draws a tagged grid PNG when `grid` is set.
    """
    if (checkpoint is None) == (model_uri is None):
        raise FashionTaggerError("give exactly one of checkpoint or model_uri")
    files, had_folder = collect_images(images)
    if model_uri is not None:
        table = _predict_with_mlflow(model_uri, files)
    else:
        table = _predict_files(load_predictor(checkpoint), files)
    table.insert(0, "image", [str(path) for path in files])
    for column in table.columns:
        if column.endswith(CONFIDENCE_SUFFIX):
            table[column] = table[column].astype(float).round(4)
    if failed := failed_images(table):
        failures = table.loc[table[ERROR_COLUMN].notna(), ["image", ERROR_COLUMN]]
        log.warning("%d of %d images could not be read and have no tags:\n%s", failed, len(table),
                    "\n".join(f"  {row.image}: {row.error}" for row in failures.itertuples()))

    if out_csv is None and had_folder:
        out_csv = Path("predictions.csv")
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False)
        log.info("wrote %d predictions to %s", len(table), Path(out_csv).resolve())
    if as_json:
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")  # null, not NaN
        print(json.dumps(records, indent=2))
    else:
        print(table.astype(object).where(table.notna(), "").to_string(index=False))
    if grid is not None:
        log.info("drew %s", draw_grid(files, table, grid))
    return table
