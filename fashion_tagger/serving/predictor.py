"""The tagger at inference: a `Predictor` rebuilt from a training checkpoint or from a Lightning-free export.

The export (weights.pt + tagger.json) needs only torch, timm and Pillow; the served pyfunc model, `predict`,
evaluation and catalog tagging all load a model through `Predictor.from_checkpoint`/`from_export`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

from fashion_tagger.core.errors import FashionTaggerError, first_line
from fashion_tagger.core.layout import CALIBRATION_FILENAME, RunLayout, TrainDir
from fashion_tagger.data.imaging import ImageTransform
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.model.network import NETWORK_FIELDS, FashionTagger, build_network
from fashion_tagger.serving.rows import confidence_column, label_columns

EXPORT_FORMAT_VERSION = 1
EXPORT_FILENAME = "tagger.json"
WEIGHTS_FILENAME = "weights.pt"
DEVICE_ENV = "FASHION_TAGGER_DEVICE"  # cpu keeps a server or a tagging job off a shared GPU


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
        calibration: Mapping[str, Any] | None = None,
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
        # Temperatures (and the review thresholds chosen with them) fitted on the validation part after training:
        # every confidence this predictor gives is calibrated. A model from before calibration has T = 1.
        self.calibration: dict[str, Any] = dict(calibration or {})
        self.temperatures = {a: float(t) for a, t in self.calibration.get("temperatures", {}).items()}

    @property
    def thresholds(self) -> dict[str, float | None]:
        """The model's review threshold per attribute (None: no tag of it is accepted); empty before calibration."""
        return {a: t.get("threshold") for a, t in self.calibration.get("thresholds", {}).items()}

    @property
    def attributes(self) -> list[str]:
        return self.label_space.attributes

    @classmethod
    def _build(cls, model_config: dict[str, Any], labels: dict[str, Any], image_size: Sequence[int],
               state_dict: dict[str, torch.Tensor], device: str | torch.device | None, **kwargs: Any) -> Predictor:
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
                f"{path} is not a fashion-tagger checkpoint: torch cannot load it ({first_line(exc)}); "
                "give a .ckpt written by `fashion-tagger train`"
            ) from exc
        hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
        if not {"config", "labels", "image_size"} <= set(hparams) or "state_dict" not in checkpoint:
            raise FashionTaggerError(f"{path} is not a fashion-tagger checkpoint (no config/labels in its hparams)")
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        with _rebuilding(path):
            return cls._build(
                hparams["config"]["model"], hparams["labels"], hparams["image_size"], state, device,
                config=hparams["config"], calibration=_calibration_beside(path),
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
        if self.calibration:  # calibrated confidences are other outputs; an uncalibrated model hashes as before
            spec["calibration"] = self.calibration
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
            **({"calibration": self.calibration} if self.calibration else {}),
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
                mean=image["mean"], std=image["std"], calibration=spec.get("calibration"),
            )

    def preprocess(self, images: Iterable[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    @torch.inference_mode()
    def predict_probabilities(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax probabilities per attribute for a preprocessed batch (N x 3 x H x W)."""
        logits = self.model(batch.to(self.device, non_blocking=True))
        return {a: torch.softmax(v.float() / self.temperatures.get(a, 1.0), dim=1) for a, v in logits.items()}

    def predict(self, images: Sequence[Image.Image], batch_size: int = 64) -> pd.DataFrame:
        """One row per image: `<attribute>` (class name) and `<attribute>_confidence` (its probability)."""
        columns: dict[str, list[Any]] = {name: [] for a in self.attributes for name in (a, confidence_column(a))}
        for start in range(0, len(images), batch_size):
            probabilities = self.predict_probabilities(self.preprocess(images[start : start + batch_size]))
            for name, values in label_columns(probabilities, self.label_space).items():
                columns[name].extend(values)
        return pd.DataFrame(columns)


@contextmanager
def _rebuilding(source: Path) -> Iterator[None]:
    """A checkpoint or export that loads but cannot be turned back into the tagger is named in one line."""
    try:
        yield
    except FashionTaggerError:
        raise
    except Exception as exc:  # noqa: BLE001 - JSON, torch and timm each raise their own types for a damaged file
        raise FashionTaggerError(f"cannot rebuild the tagger from {source}: {first_line(exc)}") from exc


def _calibration_beside(checkpoint: Path) -> dict[str, Any] | None:
    """The training folder's calibration.json for a checkpoint in it (train/checkpoints/<name>.ckpt), if any."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / CALIBRATION_FILENAME
        if path.is_file():
            data = json.loads(path.read_text())
            return {key: data[key] for key in ("temperatures", "thresholds", "target_precision") if key in data}
    return None


def default_device() -> str | None:
    """`$FASHION_TAGGER_DEVICE`, or None: the GPU when there is one."""
    return os.environ.get(DEVICE_ENV) or None


def model_location(path: str | Path) -> Path:
    """What a local model reference names: an export directory (tagger.json) as it is; a run folder or its
    train/ folder -> its best checkpoint; a file -> itself (a .ckpt)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / EXPORT_FILENAME).is_file():
        return path
    if path.is_dir():
        in_run = RunLayout(path).train
        return (in_run if in_run.dir.is_dir() else TrainDir(path)).checkpoint()
    return path


def load_predictor(path: str | Path, device: str | torch.device | None = None) -> Predictor:
    """A .ckpt file, an export directory (tagger.json), a run folder or its train/ folder (the best checkpoint)."""
    location = model_location(path)
    if location.is_dir():
        return Predictor.from_export(location, device)
    return Predictor.from_checkpoint(location, device)
