"""The callbacks and checkpoint IO of a training run: the backbone freeze of the first epochs, the per-epoch
history kept in checkpoints and metrics.json, and checkpoints written atomically so a resume never meets half a file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fashion_tagger.core.io import atomic_path, write_json

if TYPE_CHECKING:
    from fashion_tagger.training.module import TaggerModule

log = logging.getLogger(__name__)


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
        backbone = cast("TaggerModule", pl_module).model.backbone
        if epoch < self.epochs:
            self.freeze(backbone, train_bn=True)
        elif any(not p.requires_grad for p in backbone.parameters()):
            log.info("epoch %d: unfreezing the backbone", epoch)
            self.make_trainable(backbone)


class EpochMeter(Callback):
    """The training part of the current epoch: when it started, when its last batch ended, the images of every
    rank and the mean of this rank's batch losses (Lightning reduces its own epoch mean only after validation)."""

    def __init__(self) -> None:
        self.epoch_start = self.train_end = 0.0
        self.images = 0
        self._loss_sum, self._loss_batches = 0.0, 0

    @property
    def train_seconds(self) -> float:
        return self.train_end - self.epoch_start

    @property
    def train_loss(self) -> float:
        return self._loss_sum / self._loss_batches if self._loss_batches else float("nan")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = self.train_end = time.perf_counter()
        self.images = 0
        self._loss_sum, self._loss_batches = 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.images += len(batch[0]) * trainer.world_size
        self.train_end = time.perf_counter()
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum += float(loss)
            self._loss_batches += 1


class EpochHistory(EpochMeter):
    """Per-epoch metrics, time and train images/s, kept in the checkpoint and mirrored to metrics.json.

    It records at validation end, before ModelCheckpoint saves (Lightning runs checkpoint callbacks last),
    so last.ckpt always holds the history up to and including its own epoch.
    """

    def __init__(self, metrics_path: Path) -> None:
        super().__init__()
        self.metrics_path = metrics_path
        self.history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return "EpochHistory"

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        val_metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.history = [h for h in self.history if h["epoch"] != trainer.current_epoch]
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "train_loss": round(self.train_loss, 6) if self._loss_batches else 0.0,
                **dict(sorted(val_metrics.items())),
                "lr": trainer.optimizers[0].param_groups[-1]["lr"] if trainer.optimizers else None,
                "train_seconds": round(self.train_seconds, 3),
                "epoch_seconds": round(time.perf_counter() - self.epoch_start, 3),
                "train_images_per_s": round(self.images / max(self.train_seconds, 1e-9), 2),
            }
        )
        if trainer.is_global_zero:
            write_json(self.metrics_path, {"status": "running", "epochs_completed": len(self.history),
                                           "history": self.history})


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their final name and renamed into place: a process killed while saving leaves
    the previous last.ckpt whole (and a temporary the next attempt removes), so resuming never meets half a file."""

    def __init__(self, on_saved: Callable[[Path], None] | None = None) -> None:
        super().__init__()
        self.on_saved = on_saved  # called with each checkpoint's final path once it is in place

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        if self.on_saved is not None:
            self.on_saved(Path(path))
