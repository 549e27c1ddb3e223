"""Progress of long loops in logs, for runs without a terminal (every Airflow task): a line every 30 s.

Light on purpose (no torch or Lightning import): prepare's pool workers and the gate import it too.
`training_log` has the per-epoch line of training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
EVERY_S = 30.0


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def log_progress(items: Iterable[T], *, total: int | None, what: str, unit: str = "items", every_s: float = EVERY_S,
                 logger: logging.Logger | None = None) -> Iterator[T]:
    """Yield ITEMS, logging `what: k/N unit (p%), r unit/s, elapsed, left` every EVERY_S seconds, and a closing line
    when the loop took that long; a short loop logs nothing."""
    logger = logger or log
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            logger.info("%s", progress_line(what, done, total, unit, now - started))
    elapsed = time.monotonic() - started
    if elapsed >= every_s:
        logger.info("%s: done, %d %s in %s (%.1f %s/s)", what, done, unit, duration(elapsed), done / elapsed, unit)


def progress_line(what: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if not total:
        return f"{what}: {done} {unit}, {rate:.1f} {unit}/s, elapsed {duration(elapsed)}"
    left = (total - done) / rate if rate > 0 else math.inf
    left_text = duration(left) if math.isfinite(left) else "?"
    return (f"{what}: {done}/{total} {unit} ({100 * done / total:.0f}%), {rate:.1f} {unit}/s, "
            f"elapsed {duration(elapsed)}, left ~{left_text}")
