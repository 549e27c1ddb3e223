"""How many worker processes a stage's pool may use here, shared by validate and prepare."""

from __future__ import annotations

import logging
import multiprocessing
import os

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container or taskset can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(requested: int, tasks: int) -> int:
    """`requested` workers (0: one per usable CPU), at most one per task, and 1 where no pool may start.

    A daemon process (a Celery task process, a pool worker) may not start processes of its own; the stage
    then runs serially rather than failing. Orchestrators get the pool by running the stage as a child process.
    """
    workers = max(1, min(requested or usable_cpus(), tasks))
    if workers > 1 and multiprocessing.current_process().daemon:
        log.warning("running in a daemon process, which may not start a pool: using 1 worker instead of %d", workers)
        return 1
    return workers
