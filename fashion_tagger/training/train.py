"""Train the tagger with Lightning: masked multi-head loss, AdamW with warmup + cosine, best/last checkpoints.

`train_model` is the stage function behind `fashion-tagger train`. Training the same run directory again
resumes from its last checkpoint at the next epoch, so a retried Airflow task continues instead of restarting;
a run that already finished is returned as it is.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from fashion_tagger.core.config import CHECK_ENVIRONMENT, Config, load_config, save_config
from fashion_tagger.core.errors import RunError
from fashion_tagger.core.io import StageResult, atomic_path, read_json, remove_stale_temporaries, write_json
from fashion_tagger.core.layout import CHECKPOINT_BEST, SplitDir, TrainDir
from fashion_tagger.core.parallel import cpu_threads, parse_devices
from fashion_tagger.data.cache import read_prepared
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.evaluation.metrics import macro_f1
from fashion_tagger.model.network import FashionTagger, build_network
from fashion_tagger.model.weights import resolve_pretrained_path
from fashion_tagger.training.datamodule import TaggerDataModule, normalize, pixel_stats
from fashion_tagger.training.epoch_log import EpochProgressLog, lightning_logs_once
from fashion_tagger.training.losses import build_loss

log = logging.getLogger(__name__)

MONITOR = "val_macro_f1"  # mean over attributes of validation macro-F1: the headline metric
MIN_LR_RATIO = 0.01  # cosine ends at 1% of the peak, not 0, so the last epoch still learns


class TrainError(RunError):
    """A run directory or setting that training cannot use as it is."""


@dataclass
class TrainResult(StageResult):
    run_dir: Path
    split_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    epochs_completed: int
    best_score: float
    best_epoch: int
    resumed: bool
    stopped_early: bool = False
    already_complete: bool = False  # nothing left to train: the finished run was returned as it is
    images_per_s: float = 0.0
    seconds: float = 0.0
    metrics_path: Path | None = None
    scores: dict[str, float] = field(default_factory=dict)  # validation macro-F1 per attribute at the best epoch


class TaggerModule(L.LightningModule):
    """The tagger, its loss and optimiser; hyperparameters hold the whole config and label space.

    A checkpoint is therefore self-contained: `Predictor.from_checkpoint` rebuilds the network from it
    without the split directory or the config file.
    """

    def __init__(
        self,
        config: dict[str, Any],
        labels: dict[str, Any],
        image_size: Sequence[int],
        load_pretrained: bool = False,
    ) -> None:
        super().__init__()
        # load_pretrained is left out so that loading a checkpoint never reaches for the hub.
        self.save_hyperparameters(ignore=["load_pretrained"])
        self.config = Config.model_validate(config, context={CHECK_ENVIRONMENT: False})
        self.label_space = LabelSpace.from_dict(labels)
        self.attributes = self.label_space.attributes
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.model = build_model(self.config, self.label_space, pretrained=load_pretrained)
        # Buffers follow the module to its device; not persistent, so checkpoints hold only the network.
        pixel_mean, pixel_std = pixel_stats(self.model.data_config["mean"], self.model.data_config["std"])
        self.register_buffer("pixel_mean", pixel_mean, persistent=False)
        self.register_buffer("pixel_std", pixel_std, persistent=False)
        train = self.config.train
        self.criterion = build_loss(
            train.loss,
            self.attributes,
            label_smoothing=train.label_smoothing,
            attribute_weights=train.attribute_weights,
        )
        self._val_preds: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images)

    def _targets(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.attributes, labels.unbind(1), strict=True))

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The loader's uint8 batch, normalised here on the device."""
        images = normalize(images, self.pixel_mean, self.pixel_std)
        return images.contiguous(memory_format=torch.channels_last) if self.config.train.channels_last else images

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss, parts = self.criterion(self(self._inputs(images)), self._targets(labels))
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train_loss_{a}": v for a, v in parts.items()}, on_step=False, on_epoch=True,
                      batch_size=len(images))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(self._inputs(images))
        loss, _ = self.criterion(logits, self._targets(labels))
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(images))
        self._val_preds.append(torch.stack([logits[a].argmax(1) for a in self.attributes], 1))
        self._val_labels.append(labels)

    def on_validation_epoch_end(self) -> None:
        if not self._val_preds:
            return
        preds, labels = torch.cat(self._val_preds), torch.cat(self._val_labels)
        self._val_preds.clear()
        self._val_labels.clear()
        if self.trainer.world_size > 1:
            # DistributedSampler pads every rank to the same length, so the gathered tensors stack.
            preds = self.all_gather(preds).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        preds, labels = preds.cpu().numpy(), labels.cpu().numpy()
        scores = {
            a: macro_f1(labels[:, i], preds[:, i], self.label_space.num_classes[a])
            for i, a in enumerate(self.attributes)
        }
        # Every rank computed the same numbers from the gathered tensors; sync_dist only averages equal values.
        self.log_dict({f"val_f1_{a}": s for a, s in scores.items()}, sync_dist=True)
        self.log(MONITOR, sum(scores.values()) / len(scores), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        train = self.config.train
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, train.lr, train.backbone_lr_scale, train.weight_decay), lr=train.lr
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        factor = lr_factor_fn(
            train.schedule,
            total_steps=total_steps,
            warmup_steps=int(round(train.warmup_epochs * steps_per_epoch)),
            step_every=train.step_size * steps_per_epoch,
            step_gamma=train.step_gamma,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_model(config: Config, label_space: LabelSpace, *, pretrained: bool) -> FashionTagger:
    """The network of `config` sized from the label space; pretrained weights only when asked (fresh runs)."""
    m = config.model
    # model.pretrained=false trains from scratch even where a preset names weights in pretrained_path.
    load = pretrained and m.pretrained
    return build_network(
        m.model_dump(), label_space.num_classes, pretrained=load,
        pretrained_path=resolve_pretrained_path(m.pretrained_path, m.backbone, config.home_dir) if load else None,
    )


def parameter_groups(
    model: FashionTagger, lr: float, backbone_lr_scale: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Backbone at lr x scale, heads at lr; biases and norm weights (1-d) get no weight decay."""
    groups = []
    for part, part_lr in ((model.backbone, lr * backbone_lr_scale), (model.heads, lr)):
        params = list(part.parameters())
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups.append({"params": decay, "lr": part_lr, "weight_decay": weight_decay})
        groups.append({"params": no_decay, "lr": part_lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def lr_factor_fn(
    schedule: str, *, total_steps: int, warmup_steps: int, step_every: int, step_gamma: float
):
    """Multiplier of each group's base lr per optimiser step: linear warmup, then cosine or step decay."""
    warmup_steps = min(warmup_steps, max(0, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "step":
            return step_gamma ** ((step - warmup_steps) // max(1, step_every))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class BackboneFreeze(BaseFinetuning):
    """Train only the heads for the first `epochs` epochs, then the whole network.

    Freezing happens per epoch rather than before training so that DDP registers every parameter when it
    wraps the model (it would never synchronise parameters frozen at that moment); the backbone's parameters
    are in the optimiser from the start, so unfreezing adds no parameter group. BatchNorm layers keep
    training, as in Lightning's fine-tuning example.
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Nothing here on purpose: see the class docstring."""

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        backbone = pl_module.model.backbone
        if epoch < self.epochs:
            self.freeze(backbone, train_bn=True)
        elif any(not p.requires_grad for p in backbone.parameters()):
            log.info("epoch %d: unfreezing the backbone", epoch)
            self.make_trainable(backbone)


class EpochHistory(Callback):
    """Per-epoch metrics, time and train images/s, kept in the checkpoint and mirrored to metrics.json.

    It records at validation end, before ModelCheckpoint saves (Lightning runs checkpoint callbacks last),
    so last.ckpt always holds the history up to and including its own epoch.
    """

    def __init__(self, metrics_path: Path) -> None:
        self.metrics_path = metrics_path
        self.history: list[dict[str, Any]] = []
        self._epoch_start = 0.0
        self._train_seconds = 0.0
        self._train_images = 0
        self._loss_sum = 0.0
        self._loss_batches = 0

    @property
    def state_key(self) -> str:
        return "EpochHistory"

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._train_images = 0
        self._loss_sum, self._loss_batches = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._train_images += len(batch[0]) * trainer.world_size
        self._train_seconds = time.perf_counter() - self._epoch_start
        # Lightning's epoch-mean train loss is only reduced after validation; keep our own (this rank's).
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum += float(loss)
            self._loss_batches += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        val_metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.history = [h for h in self.history if h["epoch"] != trainer.current_epoch]
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "train_loss": round(self._loss_sum / max(1, self._loss_batches), 6),
                **dict(sorted(val_metrics.items())),
                "lr": trainer.optimizers[0].param_groups[-1]["lr"] if trainer.optimizers else None,
                "train_seconds": round(self._train_seconds, 3),
                "epoch_seconds": round(time.perf_counter() - self._epoch_start, 3),
                "train_images_per_s": round(self._train_images / max(self._train_seconds, 1e-9), 2),
            }
        )
        if trainer.is_global_zero:
            write_json(self.metrics_path, {"status": "running", "epochs_completed": len(self.history),
                                           "history": self.history})


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their final name and renamed into place: a process killed while saving leaves
    the previous last.ckpt whole (and a temporary the next attempt removes), so resuming never meets half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """auto: bf16 mixed precision on GPUs that have it (fp16 mixed on older ones), fp32 on CPU."""
    if precision != "auto":
        return precision
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_hardware(config: Config) -> dict[str, Any]:
    """Trainer accelerator/devices/num_nodes/strategy/precision from the config and torchrun's environment."""
    train = config.train
    accelerator = train.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    devices: int | str | list[int] = parse_devices(train.devices)
    num_nodes = train.num_nodes
    # Under torchrun every process already exists: the world shape comes from its environment.
    if "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        num_nodes = max(1, int(os.environ.get("WORLD_SIZE", devices)) // devices)
    if devices in ("auto", -1):
        n_devices = torch.cuda.device_count() if on_gpu else 1
    else:
        n_devices = len(devices) if isinstance(devices, list) else int(devices)
    strategy: Any = "auto"
    if n_devices * num_nodes > 1:
        # Parameters frozen for some epochs get no gradient then; DDP must be told to expect that.
        strategy = DDPStrategy(find_unused_parameters=train.freeze_backbone_epochs > 0, gradient_as_bucket_view=True)
    return {
        "accelerator": "gpu" if on_gpu else ("cpu" if accelerator == "auto" else accelerator),
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": strategy,
        "precision": resolve_precision(train.precision, on_gpu),
    }


def _check_same_run(train_dir: TrainDir, config: Config, split_dir: Path) -> None:
    """Resuming with another network or split would mix two runs in one directory."""
    if not (train_dir.config.is_file() and train_dir.run_info.is_file()):
        return
    previous = load_config(train_dir.config, check_environment=False)
    if previous.model != config.model:
        raise TrainError(
            f"{train_dir.dir} holds a run with another model config ({previous.model.model_dump()}); "
            "train into a new run folder or delete this one"
        )
    recorded = Path(read_json(train_dir.run_info)["split_dir"])
    if recorded.resolve() != split_dir.resolve():
        raise TrainError(
            f"{train_dir.dir} was trained on {recorded}, not {split_dir}; "
            "train into a new run folder or delete this one"
        )


def _finished(metrics_path: Path, epochs: int) -> dict[str, Any] | None:
    if not metrics_path.is_file():
        return None
    metrics = read_json(metrics_path)
    if metrics.get("status") != "complete":
        return None
    if metrics.get("stopped_early") or metrics.get("epochs_completed", 0) >= epochs:
        return metrics
    return None


def _result_from_metrics(train_dir: TrainDir, split_dir: Path, metrics: dict[str, Any], **extra: Any) -> TrainResult:
    return TrainResult(
        run_dir=train_dir.dir,
        split_dir=split_dir,
        best_checkpoint=train_dir.best_checkpoint,
        last_checkpoint=train_dir.last_checkpoint,
        epochs_completed=int(metrics["epochs_completed"]),
        best_score=float(metrics["best_score"]),
        best_epoch=int(metrics["best_epoch"]),
        resumed=bool(metrics.get("resumed", False)),
        stopped_early=bool(metrics.get("stopped_early", False)),
        images_per_s=float(metrics.get("images_per_s", 0.0)),
        seconds=float(metrics.get("seconds", 0.0)),
        metrics_path=train_dir.metrics,
        scores=dict(metrics.get("best_scores", {})),
        **extra,
    )


def train_model(
    config: Config,
    *,
    split_dir: str | Path,
    run_dir: str | Path,
    loggers: Sequence[Logger] | None = None,
    callbacks: Sequence[Callback] | None = None,
) -> TrainResult:
    """Train (or resume, or return the finished) run in RUN_DIR on the prepared split in SPLIT_DIR.

    Writes run_dir/config.yaml, run.json (the split), checkpoints/{best,last}.ckpt and metrics.json.
    `loggers`/`callbacks` are added to Lightning's (the MLflow helper passes an MLFlowLogger).
    """
    started = time.perf_counter()
    train_dir = TrainDir(Path(run_dir).expanduser().resolve())
    run_dir = train_dir.dir
    split_dir = Path(split_dir).expanduser().resolve()
    metrics_path = train_dir.metrics
    ckpt_dir = train_dir.checkpoints
    last_ckpt = train_dir.last_checkpoint
    train = config.train

    _check_same_run(train_dir, config, split_dir)
    if removed := remove_stale_temporaries(train_dir.checkpoints):
        log.info("removed %d partial checkpoint file(s) left by an interrupted attempt", removed)
    finished = _finished(metrics_path, train.epochs)
    if finished and last_ckpt.is_file():
        log.info("%s is already trained (%d epochs): nothing to do", run_dir, finished["epochs_completed"])
        return _result_from_metrics(train_dir, split_dir, finished, already_complete=True)

    lightning_logs_once()
    L.seed_everything(train.seed, workers=True)
    hardware = resolve_hardware(config)
    if hardware["accelerator"] == "gpu":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for whatever still runs in fp32
    resume = last_ckpt.is_file()
    prepared = read_prepared(split_dir)
    label_space = LabelSpace.load(split_dir)
    image_size = (int(prepared["width"]), int(prepared["height"]))

    module = TaggerModule(
        config.model_dump(mode="json"), label_space.to_dict(), image_size, load_pretrained=not resume
    )
    datamodule = TaggerDataModule(
        split_dir,
        batch_size=train.batch_size,
        num_workers=train.num_workers,
        pin_memory=hardware["accelerator"] == "gpu",
    )
    if train.channels_last:
        module.model.to(memory_format=torch.channels_last)
    if train.compile:
        # Compiles forward in place: parameter names (and so checkpoints and exports) stay unchanged.
        module.model.compile()

    history = EpochHistory(metrics_path)
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename=CHECKPOINT_BEST,
        monitor=MONITOR,
        mode="max",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    early_stopping = EarlyStopping(monitor=MONITOR, mode="max", patience=train.early_stopping_patience)
    all_callbacks: list[Callback] = [history, checkpoint, early_stopping, LearningRateMonitor("epoch")]
    if train.freeze_backbone_epochs:
        all_callbacks.append(BackboneFreeze(train.freeze_backbone_epochs))
    train_rows = pq.ParquetFile(SplitDir(split_dir).train).metadata.num_rows
    steps_per_epoch = max(1, train_rows // train.batch_size)
    if train.progress_bar:
        # In a task log (no terminal) every refresh is a new line: a few per epoch are enough there.
        refresh = 10 if sys.stderr.isatty() else max(10, steps_per_epoch // 4)
        all_callbacks.append(TQDMProgressBar(refresh_rate=refresh))
    else:  # a task log: one line per epoch instead of a bar
        all_callbacks.append(EpochProgressLog(MONITOR))
    all_callbacks.extend(callbacks or [])
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=train.epochs,
        callbacks=all_callbacks,
        logger=[CSVLogger(train_dir.logs.parent, name=train_dir.logs.name), *(loggers or [])],
        gradient_clip_val=train.gradient_clip_val or None,
        enable_progress_bar=train.progress_bar,
        limit_train_batches=train.limit_train_batches,
        limit_val_batches=train.limit_val_batches,
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        benchmark=hardware["accelerator"] == "gpu",
        num_sanity_val_steps=0 if resume else 2,
        plugins=[AtomicCheckpointIO()],
        **hardware,
    )
    if trainer.is_global_zero:
        save_config(config, run_dir)
        attempts = read_json(train_dir.run_info).get("attempts", 0) if train_dir.run_info.is_file() else 0
        write_json(
            train_dir.run_info,
            {
                "split_dir": str(split_dir),
                "labels_source_hash": label_space.source_hash,
                "image_size": list(image_size),
                "attempts": attempts + 1,
                "precision": hardware["precision"],
                "accelerator": hardware["accelerator"],
            },
        )
    if resume:
        log.info("resuming %s from %s", run_dir, last_ckpt)
    with cpu_threads(train.cpu_threads if hardware["accelerator"] == "cpu" else 0), warnings.catch_warnings():
        # Resuming into the run's own checkpoint directory is the point, not a mistake to warn about.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=datamodule, ckpt_path=last_ckpt if resume else None)

    epochs_completed = len(history.history)
    best_score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
    best_entry = max(history.history, key=lambda h: h.get(MONITOR, -1.0)) if history.history else {}
    rates = [h["train_images_per_s"] for h in history.history if h.get("train_images_per_s")]
    metrics = {
        "status": "complete",
        "monitor": MONITOR,
        "best_score": best_score,
        "best_epoch": int(best_entry.get("epoch", -1)),
        "best_scores": {
            a: best_entry[f"val_f1_{a}"] for a in label_space.attributes if f"val_f1_{a}" in best_entry
        },
        "epochs_completed": epochs_completed,
        "epochs_target": train.epochs,
        "stopped_early": early_stopping.stopped_epoch > 0,
        "resumed": resume,
        "images_per_s": round(float(np.median(rates)), 2) if rates else 0.0,
        "seconds": round(time.perf_counter() - started, 2),
        "world_size": trainer.world_size,
        "precision": hardware["precision"],
        "best_checkpoint": str(train_dir.best_checkpoint),
        "last_checkpoint": str(last_ckpt),
        "history": history.history,
    }
    if trainer.is_global_zero:
        write_json(metrics_path, metrics)
    return _result_from_metrics(train_dir, split_dir, metrics)
