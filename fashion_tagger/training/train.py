"""The train stage: `train_model` puts the module, the data, the callbacks and the hardware into one Lightning
Trainer. Training a run directory again resumes from its last checkpoint at the next epoch (a retried Airflow task
continues instead of restarting); a run that already finished is returned as it is.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, Logger

from fashion_tagger.core import tracking
from fashion_tagger.core.config import Config, load_config, save_config
from fashion_tagger.core.errors import RunError
from fashion_tagger.core.io import StageResult, read_json, remove_stale_temporaries, write_json
from fashion_tagger.core.layout import CHECKPOINT_BEST, SplitDir, TrainDir, localize_like
from fashion_tagger.core.parallel import cpu_threads
from fashion_tagger.data.cache import read_prepared
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.training.calibrate import calibrate
from fashion_tagger.training.callbacks import AtomicCheckpointIO, BackboneFreeze, EpochHistory
from fashion_tagger.training.datamodule import TaggerDataModule
from fashion_tagger.training.epoch_log import EpochProgressLog, lightning_logs_once
from fashion_tagger.training.hardware import resolve_hardware
from fashion_tagger.training.module import MONITOR, TaggerModule

log = logging.getLogger(__name__)


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


def _publisher(config: Config, train_dir: TrainDir) -> Callable[[Path], None] | None:
    """For an object-store home: publish the training folder each time last.ckpt is saved (every epoch), so a
    retry on any machine resumes from the last completed epoch. None for a local home."""
    from fashion_tagger.workspace.workspace import open_workspace

    workspace = open_workspace(config.layout)
    if not workspace.is_remote or not train_dir.dir.is_relative_to(config.layout.root):
        return None

    def publish(saved: Path) -> None:
        if saved.name == train_dir.last_checkpoint.name:
            workspace.push(train_dir.dir)

    return publish


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
    recorded = localize_like(read_json(train_dir.run_info)["split_dir"], train_dir.dir)
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
        if not train_dir.calibration.is_file():  # trained before calibration existed, or killed before it
            calibrate(train_dir, split_dir, config)
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
        plugins=[AtomicCheckpointIO(on_saved=_publisher(config, train_dir))],
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
    # System metrics into the run's MLflow run while it trains (rank zero only; training goes on without a store).
    monitored = (tracking.system_metrics_while(config, run_dir, dataset_hash=label_space.source_hash)
                 if trainer.is_global_zero else contextlib.nullcontext())
    with cpu_threads(train.cpu_threads if hardware["accelerator"] == "cpu" else 0), warnings.catch_warnings(), \
            monitored:
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
        # Calibrated before metrics.json marks the run complete: a run killed in between calibrates on its retry.
        calibrate(train_dir, split_dir, config, "cuda" if hardware["accelerator"] == "gpu" else "cpu")
        write_json(metrics_path, metrics)
    return _result_from_metrics(train_dir, split_dir, metrics)
