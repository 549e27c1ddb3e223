"""The LightningModule of the tagger: the network built from the config, the masked multi-head loss, validation
macro-F1 (the monitored metric) and AdamW with warmup then cosine or step decay over two parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

from fashion_tagger.core.config import CHECK_ENVIRONMENT, Config
from fashion_tagger.data.imaging import normalize, pixel_stats
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.evaluation.metrics import macro_f1
from fashion_tagger.model.network import FashionTagger, build_network
from fashion_tagger.model.weights import resolve_pretrained_path
from fashion_tagger.training.losses import build_loss

MONITOR = "val_macro_f1"  # mean over attributes of validation macro-F1: the headline metric
MIN_LR_RATIO = 0.01  # cosine ends at 1% of the peak, not 0, so the last epoch still learns


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
        images = normalize(images, self.get_buffer("pixel_mean"), self.get_buffer("pixel_std"))
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
            preds = cast(torch.Tensor, self.all_gather(preds)).flatten(0, 1)
            labels = cast(torch.Tensor, self.all_gather(labels)).flatten(0, 1)
        predicted, true = preds.cpu().numpy(), labels.cpu().numpy()
        scores = {
            a: macro_f1(true[:, i], predicted[:, i], self.label_space.num_classes[a])
            for i, a in enumerate(self.attributes)
        }
        # Every rank computed the same numbers from the gathered tensors; sync_dist only averages equal values.
        self.log_dict({f"val_f1_{a}": s for a, s in scores.items()}, sync_dist=True)
        self.log(MONITOR, sum(scores.values()) / len(scores), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
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
        pretrained_path=resolve_pretrained_path(m.pretrained_path, m.backbone, config.layout) if load else None,
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
