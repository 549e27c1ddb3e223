"""Named leases in the database: the run lock and the fetch, cache and registration locks, for any machine.

A lease is a row held until `expires_at` by the database's clock. Taking it is one upsert that succeeds only when
the row is absent or expired; a heartbeat thread renews it every ttl/3 while held, and leaving the block deletes
it. The holder is the process that entered the block: a forked child has no heartbeat thread and never renews or
releases it, and a holder killed with SIGKILL stops renewing, so its lease frees itself after ttl seconds; on the
holder's own host it is free at once, since a process there can see that the holder's pid is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from fashion_tagger.coordination.schema import leases as leases_table
from fashion_tagger.coordination.sql import Database
from fashion_tagger.core.errors import RunError

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 30.0
# (database, lease name) -> the lease this process holds: entering it again nests, across its Coordinators.
_held: dict[tuple[str, str], HeldLease] = {}


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease: the holder's name, host and pid, since when, and until when unless renewed."""

    name: str
    holder: str
    host: str
    pid: int
    acquired_at: float  # seconds since the epoch, by the database's clock
    expires_at: float

    @property
    def since(self) -> str:
        return f"{datetime.fromtimestamp(self.acquired_at, UTC):%Y-%m-%d %H:%M:%S} UTC"

    @property
    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == this_host()

    @property
    def died_on_this_host(self) -> bool:
        """Its holder ran on this host and is gone (killed, crashed): nothing renews the lease any more."""
        return self.host == this_host() and self.pid != os.getpid() and not process_is_alive(self.pid)

    def __str__(self) -> str:
        named = "" if self.holder == default_holder(self.host, self.pid) else f"{self.holder}, "
        return f"{named}host {self.host}, pid {self.pid}, since {self.since}"


class LeaseBusyError(RunError):
    """Another live process holds the lease: bad input for this attempt (the run, dataset or model is busy)."""

    def __init__(self, message: str, holder: LeaseInfo) -> None:
        super().__init__(message)
        self.holder = holder


class HeldLease:
    """A lease this process holds, renewed by a daemon heartbeat thread until the block that took it ends.

    `lost` is set when a renewal found the lease taken over (this process stalled past its ttl) or could not
    reach the database until the lease expired; `check()` raises then, for work that must not go on unguarded.
    """

    def __init__(self, db: Leases, info: LeaseInfo, token: str, ttl_s: float) -> None:
        self.info, self.token, self.ttl_s = info, token, ttl_s
        self.pid = os.getpid()
        self.lost = threading.Event()
        self._db, self._stop = db, threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {info.name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.info.name

    def check(self) -> None:
        if self.lost.is_set():
            raise RunError(f"lease {self.name!r} was lost: this process could not renew it within {self.ttl_s:g} s, "
                           "so another may hold it now; run the work again")

    def _heartbeat(self) -> None:
        expires = time.monotonic() + self.ttl_s  # as far as this process knows
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self._db._renew(self.name, self.token, self.ttl_s):
                    return self._lose("another process took it over once it had expired")
                expires = time.monotonic() + self.ttl_s
            except SQLAlchemyError as exc:
                if time.monotonic() >= expires:
                    return self._lose(f"the database did not answer until it expired ({exc})")
                log.warning("could not renew lease %r (%s); retrying", self.name, exc)

    def _lose(self, why: str) -> None:
        log.error("lease %r is lost: %s; the work it guards goes on unguarded", self.name, why)
        self.lost.set()

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl_s)
        try:
            self._db._release(self.name, self.token)
        except SQLAlchemyError as exc:  # it expires by itself within ttl
            log.warning("could not release lease %r (%s); it frees itself within %g s", self.name, exc, self.ttl_s)


class Leases(Database):
    """`lease`, `run_lease`, `lease_holder`, `run_holder` (mixed into `Coordinator`)."""

    @contextmanager
    def lease(self, name: str, *, holder: str | None = None, ttl_s: float = DEFAULT_TTL_S,
              wait_s: float | None = 0.0, busy: str | None = None) -> Iterator[HeldLease]:
        """Hold lease NAME for the block, renewed every ttl/3 seconds.

        Held by another live process: raise `LeaseBusyError` at once (WAIT_S 0), or wait up to WAIT_S seconds
        (None: as long as it takes), saying so in the log. BUSY is the error's subject ("run X is being run by
        another process"). Entering it again in the process that holds it nests, and releases at the outer end.
        """
        if ttl_s <= 0:
            raise ValueError(f"a lease needs a positive ttl_s, got {ttl_s}")
        key = (str(self.engine.url), name)
        held = _held.get(key)
        if held is not None and held.pid == os.getpid():  # the outer block releases it
            yield held
            return
        lease = self._acquire(name, holder or default_holder(socket.gethostname(), os.getpid()), ttl_s, wait_s,
                              busy or f"lease {name!r} is held by another process")
        _held[key] = lease
        try:
            yield lease
        finally:
            if os.getpid() == lease.pid:  # a forked child leaving the block leaves its parent's lease alone
                del _held[key]
                lease.release()

    def run_lease(self, run_id: str, *, ttl_s: float = DEFAULT_TTL_S,
                  wait_s: float | None = 0.0) -> AbstractContextManager[HeldLease]:
        """The run lock: held by the process executing a stage of RUN_ID."""
        return self.lease(run_lease_name(run_id), ttl_s=ttl_s, wait_s=wait_s,
                          busy=f"run {run_id} is being run by another process")

    def lease_holder(self, name: str) -> LeaseInfo | None:
        """Who holds lease NAME now (None when nobody does, or the holder's lease has expired)."""
        with self.engine.connect() as conn:
            holder = self._live_holder(conn, name, self.clock(conn))
        return None if holder is not None and holder.died_on_this_host else holder  # the next taker frees it

    def run_holder(self, run_id: str) -> LeaseInfo | None:
        """Who is running RUN_ID now: what `fashion-tagger runs` calls running."""
        return self.lease_holder(run_lease_name(run_id))

    # --- the statements ----------------------------------------------------------------------------------------

    def _live_holder(self, conn: sa.Connection, name: str, now: float) -> LeaseInfo | None:
        row = conn.execute(sa.select(leases_table).where(leases_table.c.name == name)).mappings().first()
        if row is None or row["expires_at"] <= now:
            return None
        return LeaseInfo(row["name"], row["holder"], row["host"], row["pid"], row["acquired_at"], row["expires_at"])

    def _try_acquire(self, name: str, holder: str, ttl_s: float) -> tuple[str | None, LeaseInfo | None, float]:
        """Take NAME if it is free or expired, in one conditional upsert: (token, mine, now), else (None, theirs, now)
        (theirs None when it was released between the two statements)."""
        token = uuid.uuid4().hex
        with self.engine.begin() as conn:
            now = self.clock(conn)
            self._free_if_holder_died(conn, name, now)
            values: dict[str, Any] = {"token": token, "holder": holder[:255], "host": this_host(),
                                      "pid": os.getpid(), "acquired_at": now, "expires_at": now + ttl_s}
            taken = conn.execute(
                self.insert(leases_table).values(name=name, **values)
                .on_conflict_do_update(index_elements=["name"], set_=values, where=leases_table.c.expires_at <= now)
                .returning(leases_table.c.token)
            ).scalar_one_or_none()
            if taken == token:
                return token, LeaseInfo(name, values["holder"], values["host"], values["pid"], now, now + ttl_s), now
            return None, self._live_holder(conn, name, now), now

    def _acquire(self, name: str, holder: str, ttl_s: float, wait_s: float | None, busy: str) -> HeldLease:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        waiting = False
        while True:
            token, current, now = self._try_acquire(name, holder, ttl_s)
            if token is not None and current is not None:
                if waiting:
                    log.info("lease %r: acquired after waiting", name)
                return HeldLease(self, current, token, ttl_s)  # committed: only now does the heartbeat start
            if current is None:  # released between the upsert and the look: try again at once
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise LeaseBusyError(
                    f"{busy} ({current}); wait for it to finish, or retry in {max(0.0, current.expires_at - now):.0f}"
                    " s if that process died (its lease expires then)", current)
            if not waiting:
                log.info("waiting for lease %r, held by another process (%s)%s", name, current,
                         "" if left is None else f", for up to {left:.0f} s")
                waiting = True
            time.sleep(min(0.5, ttl_s / 4, *(() if left is None else (left,))))

    def _free_if_holder_died(self, conn: sa.Connection, name: str, now: float) -> None:
        """Delete NAME's lease when its holder ran on this host and is gone (killed, crashed): nothing renews it,
        and waiting out its ttl would only delay `run --resume` after a `kill -9`."""
        row = conn.execute(sa.select(leases_table).where(leases_table.c.name == name)).mappings().first()
        holder = self._live_holder(conn, name, now)
        if row is None or holder is None or not holder.died_on_this_host:
            return
        conn.execute(sa.delete(leases_table).where((leases_table.c.name == name)
                                                   & (leases_table.c.token == row["token"])))
        log.info("lease %r: its holder (pid %d on this host) is gone; freed it", name, holder.pid)

    def _renew(self, name: str, token: str, ttl_s: float) -> bool:
        with self.engine.begin() as conn:
            now = self.clock(conn)
            renewed = conn.execute(sa.update(leases_table)
                                   .where((leases_table.c.name == name) & (leases_table.c.token == token))
                                   .values(expires_at=now + ttl_s))
            return bool(renewed.rowcount)

    def _release(self, name: str, token: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(leases_table).where((leases_table.c.name == name) & (leases_table.c.token == token)))


def this_host() -> str:
    """This host's name as a lease records it (the column holds 255 characters)."""
    return socket.gethostname()[:255]


def process_is_alive(pid: int) -> bool:
    """Whether process PID of this host runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def default_holder(host: str, pid: int) -> str:
    return f"{host}:{pid}"


def run_lease_name(run_id: str) -> str:
    return f"run:{run_id}"
