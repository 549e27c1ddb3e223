"""Stages as child processes: `python -m fashion_tagger STAGE RUN` (or torchrun), its output streamed line by line
into the caller's log, its last printed JSON object as the result, and its exit code mapped to the error contract.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion_tagger.core.errors import BAD_INPUT_EXIT_CODE, TRANSIENT_EXIT_CODE, FashionTaggerError

log = logging.getLogger(__name__)


class StageProcessError(FashionTaggerError):
    """A stage run as a child process exited with an error; the message carries the end of its output.

    Its kind follows the child's exit code (the CLI's error contract): bad input is final, anything else is
    worth a retry (a transient fault, a crash, a kill).
    """

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return BAD_INPUT_EXIT_CODE if self.returncode == BAD_INPUT_EXIT_CODE else TRANSIENT_EXIT_CODE


def stage_command(stage: str, run_root: str | Path, *, nproc: int = 1, python: str | None = None) -> list[str]:
    """The one entry point of a stage child process: `python -m fashion_tagger STAGE RUN_ROOT`, or the same under
    torchrun with NPROC processes on this node. Every setting comes from the run's own config.yaml."""
    python = python or sys.executable
    tail = ["-m", "fashion_tagger", stage, str(run_root)]
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *tail]
    return [python, *tail]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A worker killed hard (OOM, SIGKILL) must not leave a trainer holding the GPU.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pump(stream: Any, logger: logging.Logger, keep: deque[str]) -> None:
    for line in stream:
        line = line.rstrip("\n")
        keep.append(line)
        logger.info("%s", line)


def last_json_object(text: str) -> dict[str, Any] | None:
    """The last top-level JSON object printed in `text` (the stage commands end by printing their result)."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"(?m)^\{", text)]
    for start in reversed(starts):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


@dataclass
class CommandOutput:
    returncode: int
    stdout: str
    result: dict[str, Any] | None  # the JSON object the command printed last, if any


def run_logged(
    cmd: Sequence[str],
    *,
    logger: logging.Logger | None = None,
    env: Mapping[str, str] | None = None,
    tail_lines: int = 40,
) -> CommandOutput:
    """Run `cmd`, logging its stdout and stderr line by line as they come; raise `StageProcessError` on failure.

    The child is terminated if this call is interrupted (an orchestrator's timeout or kill raises here) and,
    on Linux, when this process dies.
    """
    logger = logger or log
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    logger.info("running: %s", shlex.join(cmd))
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        bufsize=1,
        env=child_env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    stdout_lines: deque[str] = deque(maxlen=5000)
    stderr_tail: deque[str] = deque(maxlen=tail_lines)
    stderr_thread = threading.Thread(target=_pump, args=(proc.stderr, logger, stderr_tail), daemon=True)
    stderr_thread.start()
    try:
        _pump(proc.stdout, logger, stdout_lines)
        returncode = proc.wait()
    except BaseException:
        _terminate(proc, logger)
        raise
    finally:
        stderr_thread.join(timeout=10)
    stdout = "\n".join(stdout_lines)
    if returncode != 0:
        tail = "\n".join(list(stderr_tail)[-tail_lines:] or list(stdout_lines)[-tail_lines:])
        raise StageProcessError(
            f"`{shlex.join(cmd[:5])} ...` exited with code {returncode}; its last lines:\n{tail}", returncode
        )
    return CommandOutput(returncode=returncode, stdout=stdout, result=last_json_object(stdout))


def _terminate(proc: subprocess.Popen, logger: logging.Logger, grace_s: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    logger.warning("stopping child process %d", proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_stage_process(
    stage: str,
    run_root: str | Path,
    *,
    nproc: int = 1,
    logger: logging.Logger | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run stage STAGE of the run at RUN_ROOT in a child process and return the result it printed.

    Its output is logged as `fashion_tagger.<stage>` unless another logger is given.
    """
    return run_json_command(stage, stage_command(stage, run_root, nproc=nproc), logger=logger, env=env)


def run_json_command(
    stage: str,
    cmd: Sequence[str],
    *,
    logger: logging.Logger | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run CMD (a stage command) and return the JSON object it printed last; an error if it printed none."""
    output = run_logged(cmd, logger=logger or logging.getLogger(f"fashion_tagger.{stage}"), env=env)
    if output.result is None:
        raise StageProcessError(f"`fashion_tagger {stage}` finished but printed no JSON result")
    return output.result
