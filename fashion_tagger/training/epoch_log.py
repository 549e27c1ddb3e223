"""Training progress in logs, for runs without a progress bar (every Airflow task): one line per epoch, and each
of Lightning's own lines once instead of twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fashion_tagger.core.progress import duration
from fashion_tagger.training.callbacks import EpochMeter

log = logging.getLogger(__name__)

# Lightning's loggers: `lightning` gets a console handler on import and still propagates to the root logger,
# `lightning.pytorch`/`lightning.fabric` get one when the root had none at that moment.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def lightning_logs_once() -> None:
    """Drop the console handlers Lightning adds on import when the root logger has its own, so that each Lightning
    line is written once, by the root's handler (with its format and timestamps), and reaches caplog and task logs."""
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # exactly Lightning's; subclasses belong to someone else
                logger.removeHandler(handler)
        logger.propagate = True


class EpochProgressLog(EpochMeter):
    """One INFO line per training epoch, for runs without a progress bar:

    `epoch 3/30: train loss 0.8123, val_macro_f1 0.7012 (best 0.7012), 152 img/s, elapsed 4m10s, left ~37m30s`

    Train loss is this rank's mean over the epoch's batches; images/s counts every rank's images over the training
    part of the epoch; elapsed and left are wall-clock since this process started training (a resumed run counts
    from its resume), left extrapolating the mean epoch time to the epochs still to go.
    """

    def __init__(self, monitor: str, logger: logging.Logger | None = None) -> None:
        super().__init__()
        self.monitor = monitor
        self.logger = logger or log
        self.best: float | None = None
        self._fit_start = 0.0
        self._first_epoch = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_start = time.perf_counter()
        self._first_epoch = trainer.current_epoch
        previous = getattr(trainer.checkpoint_callback, "best_model_score", None)
        self.best = float(previous) if previous is not None else None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # Lightning runs the epoch's validation before this hook, so its score is in callback_metrics here.
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        epoch, epochs = trainer.current_epoch + 1, trainer.max_epochs
        parts = [f"train loss {self.train_loss:.4f}"]
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None:
            score = float(score)
            self.best = score if self.best is None else max(self.best, score)
            parts.append(f"{self.monitor} {score:.4f} (best {self.best:.4f})")
        train_s = self.train_seconds
        parts.append(f"{self.images / train_s:.0f} img/s" if train_s > 0 else "0 img/s")
        elapsed = now - self._fit_start
        done_here = epoch - self._first_epoch
        left = elapsed / max(1, done_here) * max(0, (epochs or epoch) - epoch)
        parts.append(f"elapsed {duration(elapsed)}, left ~{duration(left)}")
        self.logger.info("epoch %d/%d: %s", epoch, epochs, ", ".join(parts))
