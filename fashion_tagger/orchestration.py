"""What an orchestrator needs around the stages: trigger parameters -> `Config`, run-scoped output paths, and
stage commands run as child processes whose output streams line by line into the caller's log.

No Airflow import: the DAG in dags/ composes these helpers, and plain unit tests cover them.
"""

from __future__ import annotations

import hashlib
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

from fashion_tagger.config import CONFIG_FILENAME, Config, ConfigError, load_config, merge_overrides, save_config
from fashion_tagger.errors import FashionTaggerError

log = logging.getLogger(__name__)

SOURCE_ENV = "FASHION_TAGGER_SOURCE"
PRESET_ENV = "FASHION_TAGGER_PRESET"
KAGGLE_SMALL = "kaggle:paramaggarwal/fashion-product-images-small"
SYNTHETIC_DEFAULT = "synthetic:3000"

# Trigger parameter -> configuration key. `preset` picks the base the others override; a parameter left
# empty (None) keeps the preset's value.
PARAM_CONFIG_KEYS: dict[str, str] = {
    "source": "data.source",
    "max_rows": "data.max_rows",
    "backbone": "model.backbone",
    "pretrained": "model.pretrained",
    "image_width": "images.width",
    "image_height": "images.height",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "learning_rate": "train.lr",
    "min_class_count": "labels.min_class_count",
    "promote": "registry.promote",
    "min_delta": "registry.min_delta",
}
PRESET_PARAM = "preset"
BAD_INPUT_EXIT_CODE = 2  # what `fashion-tagger` exits with on a FashionTaggerError


class StageProcessError(FashionTaggerError):
    """A stage run as a child process exited with an error; the message carries the end of its output."""

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode

    @property
    def bad_input(self) -> bool:
        """The CLI exits with BAD_INPUT_EXIT_CODE for bad data or configuration: a retry cannot fix those."""
        return self.returncode == BAD_INPUT_EXIT_CODE


# --- where a run's outputs go ----------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def run_dir_name(run_id: str) -> str:
    """A folder name for an orchestrator's run id, unique per run id.

    Airflow run ids hold ':' and '+' (`manual__2025-01-01T00:00:00+00:00`); those become '-', and a short hash
    of the original id is appended whenever anything changed, so two ids never share a folder.
    """
    if not run_id or not run_id.strip():
        raise ConfigError("a run needs a non-empty run id to name its output folder")
    safe = _UNSAFE.sub("-", run_id).strip(".-")[:180] or "run"
    if safe != run_id:
        safe = f"{safe}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"
    return safe


@dataclass(frozen=True)
class RunPaths:
    """The folders one run writes; dataset-level caches (raw downloads, prepared images) live outside it."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILENAME

    @property
    def validate(self) -> Path:
        return self.root / "validate"

    @property
    def split(self) -> Path:
        return self.root / "split"

    @property
    def train(self) -> Path:
        """The training run dir: config.yaml, checkpoints/, metrics.json and, after evaluation, eval/."""
        return self.root / "train"

    def to_dict(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in ("root", "config", "validate", "split", "train")}


def run_paths(config: Config, run_id: str) -> RunPaths:
    return RunPaths(config.runs_root / run_dir_name(run_id))


# --- trigger parameters -> Config ------------------------------------------------------------------------------------


def kaggle_credentials_available() -> bool:
    """True when the kaggle client would find credentials (environment or kaggle.json)."""
    from fashion_tagger.errors import SourceError
    from fashion_tagger.sources import check_kaggle_credentials

    try:
        check_kaggle_credentials()
    except SourceError:
        return False
    return True


def default_source(preset: str | None = None) -> str:
    """$FASHION_TAGGER_SOURCE, else Kaggle when credentials exist, else the generated dataset.

    The demo preset takes the 60x80 Kaggle variant (about 0.6 GB); every other preset the full dataset.
    """
    if value := os.environ.get(SOURCE_ENV, "").strip():
        return value
    if kaggle_credentials_available():
        from fashion_tagger.config import KAGGLE_FULL

        return KAGGLE_SMALL if preset == "demo" else KAGGLE_FULL
    return SYNTHETIC_DEFAULT


def default_preset() -> str:
    return os.environ.get(PRESET_ENV, "").strip() or "default"


def param_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested config overrides from trigger parameters; unknown names are an error, empty values are skipped."""
    unknown = sorted(set(params) - set(PARAM_CONFIG_KEYS) - {PRESET_PARAM})
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)}: the DAG accepts {PRESET_PARAM}, "
            f"{', '.join(PARAM_CONFIG_KEYS)}"
        )
    nested: dict[str, Any] = {}
    for name, key in PARAM_CONFIG_KEYS.items():
        value = params.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        section, field = key.split(".")
        nested.setdefault(section, {})[field] = value
    return nested


def config_from_params(params: Mapping[str, Any], *, fixed: Mapping[str, Any] | None = None) -> Config:
    """Validate trigger parameters into a `Config`: the preset, then the parameters, then `fixed` overrides.

    Errors name the parameter as the user typed it, e.g. `epochs (train.epochs): Input should be ...`.
    """
    params = {name: params[name] for name in params}
    preset = params.get(PRESET_PARAM) or default_preset()
    overrides = merge_overrides(param_overrides(params), fixed or {})
    try:
        return load_config(preset, overrides)
    except ConfigError as exc:
        message = str(exc)
        for name, key in PARAM_CONFIG_KEYS.items():
            message = message.replace(f"{key}:", f"{name} ({key}):")
        raise ConfigError(f"bad parameters: {message}") from None


def start_run(
    params: Mapping[str, Any], run_id: str, *, fixed: Mapping[str, Any] | None = None
) -> tuple[Config, RunPaths]:
    """Validate the parameters and write the run's config.yaml, which every later step reads back."""
    config = config_from_params(params, fixed=fixed)
    paths = run_paths(config, run_id)
    save_config(config, paths.root)
    return config, paths


def resume_run(run_root: str | Path) -> tuple[Config, RunPaths]:
    """The config and paths of a run that `start_run` began."""
    paths = RunPaths(Path(run_root))
    if not paths.config.is_file():
        raise ConfigError(f"{paths.config} does not exist: the run's first step (fetch_dataset) did not finish")
    return load_config(paths.config), paths


# --- stages as child processes ---------------------------------------------------------------------------------------


def gpu_processes(devices: str | int | None) -> int:
    """How many training processes a `train.devices` value asks for: `4` or `0,1,2,3` -> 4; `auto`/`1` -> 1.

    One process is launched directly; Lightning picks the devices itself. Several get one process per GPU
    through torchrun, which Lightning detects and joins.
    """
    if devices is None:
        return 1
    text = str(devices).strip()
    if text.isdigit():
        return max(int(text), 1)
    ids = [part for part in text.strip("[]").split(",") if part.strip()]
    if len(ids) > 1 and all(part.strip().isdigit() for part in ids):
        return len(ids)
    return 1


def stage_command(stage: str, args: Sequence[str | Path], *, nproc: int = 1, python: str | None = None) -> list[str]:
    """`python -m fashion_tagger STAGE ARGS`, or the same under torchrun with NPROC processes on this node."""
    python = python or sys.executable
    tail = ["-m", "fashion_tagger", stage, *(str(a) for a in args)]
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *tail]
    return [python, *tail]


def train_command(config_path: Path, run_dir: Path, split_dir: Path, *, nproc: int = 1) -> list[str]:
    return stage_command(
        "train",
        ["--config", config_path, "--run-dir", run_dir, "--split-dir", split_dir],
        nproc=nproc,
    )


def validate_command(config_path: Path, raw_dir: Path, out_dir: Path) -> list[str]:
    return stage_command("validate", [raw_dir, out_dir, "--config", config_path])


def prepare_command(config_path: Path, split_dir: Path, cache_root: Path) -> list[str]:
    return stage_command("prepare", [split_dir, "--cache-dir", cache_root, "--config", config_path])


def evaluate_command(run_dir: Path, split_dir: Path | None = None) -> list[str]:
    args: list[str | Path] = ["--run-dir", run_dir]
    if split_dir is not None:
        args += ["--split-dir", split_dir]
    return stage_command("evaluate", args)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A worker killed hard (OOM, SIGKILL) must not leave a trainer holding the GPU.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pump(stream: Any, logger: logging.Logger, keep: deque[str], prefix: str) -> None:
    for line in stream:
        line = line.rstrip("\n")
        keep.append(line)
        logger.info("%s%s", prefix, line)


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
    cwd: str | Path | None = None,
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
        cwd=cwd,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    stdout_lines: deque[str] = deque(maxlen=5000)
    stderr_tail: deque[str] = deque(maxlen=tail_lines)
    stderr_thread = threading.Thread(target=_pump, args=(proc.stderr, logger, stderr_tail, ""), daemon=True)
    stderr_thread.start()
    try:
        _pump(proc.stdout, logger, stdout_lines, "")
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


def run_stage(
    stage: str,
    cmd: Sequence[str],
    *,
    logger: logging.Logger | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run a stage command and return the result it printed; an error if it printed none.

    Its output is logged as `fashion_tagger.<stage>` unless another logger is given.
    """
    output = run_logged(cmd, logger=logger or logging.getLogger(f"fashion_tagger.{stage}"), env=env)
    if output.result is None:
        raise StageProcessError(f"`fashion_tagger {stage}` finished but printed no JSON result")
    return output.result
