"""How much of this machine a stage may use: pool workers (validate, prepare), DataLoader workers (train, tag),
torch threads (train, evaluate) and the GPUs of `train.devices`. Every worker count spells "as many as fit" as
`auto`; this module is the one place that turns it into a number.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

log = logging.getLogger(__name__)

AUTO: Literal["auto"] = "auto"
WorkerCount = int | Literal["auto"]
LOADER_WORKERS_CAP = 8  # enough to feed a GPU from small cached JPEGs without oversubscribing the host
TINY_JOB_IMAGES = 16  # a DataLoader worker per this many images at most: starting workers costs more below it


def usable_cpus() -> int:
    """The CPUs this process may run on (a container or taskset can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _in_daemon() -> bool:
    # A daemon process (a Celery task process, a pool worker) may not start processes of its own.
    return multiprocessing.current_process().daemon


def pool_workers(requested: WorkerCount, tasks: int) -> int:
    """Process-pool size: `requested` (`auto`: one per usable CPU), at most one per task, and 1 where no pool
    may start. The stage then runs serially rather than failing; orchestrators get the pool by running the stage
    as a child process."""
    wanted = usable_cpus() if requested == AUTO else int(requested)
    workers = max(1, min(wanted, tasks))
    if workers > 1 and _in_daemon():
        log.warning("running in a daemon process, which may not start a pool: using 1 worker instead of %d", workers)
        return 1
    return workers


def loader_workers(requested: WorkerCount, items: int | None = None) -> int:
    """DataLoader workers: `requested` (`auto`: min(8, usable CPUs); 0: the main process decodes), none inside a
    daemon process, and, when ITEMS is given, none for tiny jobs (one worker per 16 images at most)."""
    workers = min(LOADER_WORKERS_CAP, usable_cpus()) if requested == AUTO else int(requested)
    if _in_daemon():
        return 0
    return workers if items is None else max(0, min(workers, items // TINY_JOB_IMAGES))


def parse_devices(devices: int | str | None) -> int | str | list[int]:
    """`train.devices` as Lightning takes it: `auto`, a count (`2`; -1 for all GPUs) or device ids (`0,1` or
    `[0,1]`). Raises ValueError naming the value for anything else."""
    if devices is None:
        return AUTO
    if isinstance(devices, int):
        return devices
    text = str(devices).strip()
    if text.lower() == AUTO:
        return AUTO
    if text.lstrip("-").isdigit():
        return int(text)
    ids = [part.strip() for part in text.strip("[]").split(",") if part.strip()]
    if ids and all(part.isdigit() for part in ids):
        return [int(part) for part in ids]
    raise ValueError(f"train.devices={devices!r} is not 'auto', a count or a list of GPU ids like '0,1'")


def device_processes(devices: int | str | None) -> int:
    """How many training processes a `train.devices` value asks for: `4` or `0,1,2,3` -> 4; `auto`, `1` or
    `-1` -> 1 (one process is launched directly and Lightning picks the devices itself; several get one
    process per GPU through torchrun, which Lightning detects and joins)."""
    parsed = parse_devices(devices)
    if isinstance(parsed, list):
        return max(len(parsed), 1)
    return parsed if isinstance(parsed, int) and parsed > 1 else 1


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
