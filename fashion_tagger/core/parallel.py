"""How much of this machine a stage may use: pool workers (validate, prepare) and torch threads (train, evaluate)."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Limit torch's intra-op threads for the duration (0: leave them). On a small shared CPU, two OpenMP
    threads wait at every barrier for a core the loader workers or other processes hold; one does not."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
