"""Progress where there is no terminal: one log line per training epoch, a line every 30 s on long loops, and
each of Lightning's lines written once."""

from __future__ import annotations

import logging
import re

import pytest
from tagger_helpers import make_split, tiny_config

from fashion_tagger.core import progress
from fashion_tagger.training.epoch_log import LIGHTNING_LOGGERS, lightning_logs_once
from fashion_tagger.training.train import train_model

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+): train loss (\d+\.\d{4}), val_macro_f1 (\d\.\d{4}) \(best (\d\.\d{4})\), (\d+) img/s, "
    r"elapsed (\S+), left ~(\S+)$"
)


def emitting_handlers(name: str) -> list[logging.Handler]:
    """The handlers a record of logger NAME reaches, the way `Logger.callHandlers` walks the hierarchy."""
    handlers: list[logging.Handler] = []
    logger: logging.Logger | None = logging.getLogger(name)
    while logger:
        handlers.extend(logger.handlers)
        logger = logger.parent if logger.propagate else None
    return handlers


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_training_without_progress_bar_logs_one_line_per_epoch_once(tmp_path, caplog):
    split_dir = make_split(tmp_path, rows=48)
    caplog.set_level(logging.INFO)
    result = train_model(tiny_config(epochs=3, progress_bar=False), split_dir=split_dir, run_dir=tmp_path / "run")

    lines = [r.getMessage() for r in caplog.records if r.name == "fashion_tagger.training.epoch_log"]
    assert len(lines) == result.epochs_completed == 3, lines
    matches = [EPOCH_LINE.match(line) for line in lines]
    assert all(matches), lines
    scores = [float(m.group(4)) for m in matches]
    assert [int(m.group(1)) for m in matches] == [1, 2, 3] and {m.group(2) for m in matches} == {"3"}
    assert [float(m.group(5)) for m in matches] == [max(scores[: i + 1]) for i in range(3)]  # best so far
    assert max(scores) == pytest.approx(result.best_score, abs=1e-4)
    assert all(int(m.group(6)) > 0 for m in matches) and matches[-1].group(8) == "0s"
    # Lightning's own lines reach the root's handlers (caplog, a task log) and no console handler of its own.
    assert sum("`Trainer.fit` stopped" in r.getMessage() for r in caplog.records) == 1
    root = logging.getLogger().handlers
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        assert emitting_handlers(name) == root, name


def test_lightning_console_handlers_stay_when_the_root_has_none(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    console = logging.StreamHandler()
    lightning = logging.getLogger("lightning")
    monkeypatch.setattr(lightning, "handlers", [console])
    lightning_logs_once()
    assert lightning.handlers == [console]  # with nobody else to print them, Lightning's lines keep their handler

    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    lightning_logs_once()
    assert lightning.handlers == [] and all(logging.getLogger(n).propagate for n in LIGHTNING_LOGGERS)


def test_long_loops_log_every_30_seconds(monkeypatch, caplog):
    clock = iter(range(0, 1000, 10))  # every call of time.monotonic is 10 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="fashion_tagger.core.progress")
    items = list(progress.log_progress(range(12), total=12, what="prepare", unit="images"))
    assert items == list(range(12))
    lines = [r.getMessage() for r in caplog.records]
    # start at 0 s, item k ends at 10k s: a line at 30, 60, 90 and 120 s, then the closing line.
    assert lines[:4] == [
        "prepare: 3/12 images (25%), 0.1 images/s, elapsed 30s, left ~1m30s",
        "prepare: 6/12 images (50%), 0.1 images/s, elapsed 1m00s, left ~1m00s",
        "prepare: 9/12 images (75%), 0.1 images/s, elapsed 1m30s, left ~30s",
        "prepare: 12/12 images (100%), 0.1 images/s, elapsed 2m00s, left ~0s",
    ]
    assert lines[4].startswith("prepare: done, 12 images in 2m10s") and len(lines) == 5


def test_short_loops_log_nothing(caplog):
    caplog.set_level(logging.INFO, logger="fashion_tagger.core.progress")
    assert sum(progress.log_progress(range(100), total=100, what="evaluate", unit="batches")) == 4950
    assert caplog.records == []
