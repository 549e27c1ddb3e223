"""Which processes a test started: a command run with `start_new_session=True` leads a session that every process
it spawns joins (servers, their workers), so the session id finds them all, for clean-up and leak checks."""

from __future__ import annotations

import os
from contextlib import suppress


def session_members(session_id: int) -> list[int]:
    """Pids of the live processes in session SESSION_ID (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError):
                if os.getsid(int(entry)) == session_id:
                    members.append(int(entry))
    return members
