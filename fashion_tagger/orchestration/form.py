"""What an orchestrator needs around the stages: the trigger form generated from the config schema, trigger
parameters -> `Config`, and stages run as child processes whose output streams line by line into the caller's log.

No Airflow import: the DAG in dags/ composes these helpers, and plain unit tests cover them.
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashion_tagger.core.config import Config, load_config, merge_overrides, preset_names
from fashion_tagger.core.errors import BAD_INPUT_EXIT_CODE, TRANSIENT_EXIT_CODE, ConfigError, FashionTaggerError

log = logging.getLogger(__name__)

SOURCE_ENV = "FASHION_TAGGER_SOURCE"
PRESET_ENV = "FASHION_TAGGER_PRESET"
KAGGLE_SMALL = "kaggle:paramaggarwal/fashion-product-images-small"
SYNTHETIC_DEFAULT = "synthetic:3000"
PRESET_PARAM = "preset"
KEEP, YES, NO = "keep", "yes", "no"  # the three answers of a yes/no field whose empty value keeps the preset's

SECTION_DATA = "Data"
SECTION_MODEL = "Model and training"
SECTION_REGISTRY = "Registration"
EMPTY_KEEPS_PRESET = " Leave empty to keep the preset's value."


@dataclass(frozen=True)
class FormField:
    """One field of the trigger form: its parameter name, the config key it sets, and how the form shows it.

    Type, bounds, choices and the description come from the config schema, never from here.
    """

    name: str
    key: str
    title: str
    section: str
    examples: tuple[str, ...] = ()
    pattern: str | None = None  # only what the form can check as text; the stages check the rest
    extra: dict[str, Any] = field(default_factory=dict)


# The one table of the trigger form. `preset` picks the base that the others override.
FORM_FIELDS: tuple[FormField, ...] = (
    FormField("source", "data.source", "Dataset source", SECTION_DATA,
              examples=("kaggle:paramaggarwal/fashion-product-images-dataset", KAGGLE_SMALL,
                        "s3://fashion-data/fashion-dataset", "synthetic:3000"),
              pattern=r"^(kaggle:[\w.-]+/[\w.-]+|s3://[^/\s]+(/\S*)?|synthetic:[1-9][0-9]*|[/~.]\S*)$"),
    FormField("max_rows", "data.max_rows", "Maximum rows", SECTION_DATA),
    FormField("min_class_count", "labels.min_class_count", "Minimum class count", SECTION_DATA),
    FormField("backbone", "model.backbone", "Backbone", SECTION_MODEL,
              examples=("efficientnet_b3", "efficientnet_b0", "tf_efficientnet_lite0", "convnext_tiny", "resnet50"),
              pattern=r"^[a-z0-9_.]+$"),
    FormField("pretrained", "model.pretrained", "Pretrained weights", SECTION_MODEL),
    FormField("image_width", "images.width", "Image width", SECTION_MODEL),
    FormField("image_height", "images.height", "Image height", SECTION_MODEL),
    FormField("epochs", "train.epochs", "Epochs", SECTION_MODEL),
    FormField("batch_size", "train.batch_size", "Batch size", SECTION_MODEL),
    FormField("learning_rate", "train.lr", "Learning rate", SECTION_MODEL),
    FormField("force", "train.force", "Force retraining", SECTION_MODEL),
    FormField("promote", "registry.promote", "Promote", SECTION_REGISTRY),
    FormField("min_delta", "registry.min_delta", "Minimum improvement", SECTION_REGISTRY),
)
PARAM_CONFIG_KEYS: dict[str, str] = {f.name: f.key for f in FORM_FIELDS}


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

    @property
    def bad_input(self) -> bool:
        return not self.retryable


# --- what every DAG of the project shares ---------------------------------------------------------------------------


def default_args(retries: int) -> dict[str, Any]:
    """Airflow `default_args` of the project's DAGs: RETRIES with exponential backoff from 1 to 30 minutes."""
    from datetime import timedelta

    return {
        "owner": "fashion-tagger",
        "retries": retries,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    }


@contextmanager
def final_errors_raise(fail: type[Exception]) -> Iterator[None]:
    """The orchestrator's side of the error contract (errors.py): bad input is re-raised as FAIL (Airflow's
    AirflowFailException: no retry, a retry would meet the same input); transient faults and crashes propagate
    unchanged, so the orchestrator retries them."""
    try:
        yield
    except FashionTaggerError as exc:
        if not exc.retryable:
            raise fail(f"{type(exc).__name__}: {exc}") from exc
        raise


# --- the trigger form, generated from the config schema -------------------------------------------------------------


def _field_schema(schema: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The JSON schema of config field KEY (`train.epochs`), with `Optional[...]` unwrapped."""
    section, name = key.split(".")
    ref = schema["properties"][section].get("$ref") or schema["properties"][section]["anyOf"][0]["$ref"]
    section_schema = schema["$defs"][ref.rsplit("/", 1)[-1]]
    prop = dict(section_schema["properties"][name])
    for option in prop.pop("anyOf", []):
        if option.get("type") != "null":
            prop = {**option, **prop}
    return prop


def preset_display(name: str) -> str:
    """`demo: tinynet_e, 4 epochs, 48x64, synthetic:3000`: what a preset sets, read from the preset itself.

    The preset's YAML over the schema's defaults, unvalidated: this runs when the DAG file is parsed, where
    validation (which may look up the backbone in timm) would be too heavy.
    """
    from fashion_tagger.core.config import read_config_source

    data = read_config_source(name)
    defaults = Config.model_construct()

    def value(section: str, key: str) -> Any:
        return (data.get(section) or {}).get(key, getattr(getattr(defaults, section), key))

    return (f"{name}: {value('model', 'backbone')}, {value('train', 'epochs')} epochs, "
            f"{value('images', 'width')}x{value('images', 'height')}, {value('data', 'source')}")


def form_params(config_cls: type[Config] = Config) -> dict[str, dict[str, Any]]:
    """The trigger form as keyword arguments of Airflow `Param`s, generated from CONFIG_CLS's schema and the presets.

    Every field may be left empty (null), which keeps the preset's value; yes/no fields offer a three-way choice
    (keep the preset's value / yes / no) so that "empty" is never shown as "no".
    """
    schema = config_cls.model_json_schema()
    presets = preset_names()
    params: dict[str, dict[str, Any]] = {
        PRESET_PARAM: {
            "default": default_preset(),
            "type": "string",
            "enum": presets,
            "values_display": {name: preset_display(name) for name in presets},
            "title": "Preset",
            "description": "Base configuration the other fields override.",
            "section": SECTION_DATA,
        }
    }
    for form_field in FORM_FIELDS:
        prop = _field_schema(schema, form_field.key)
        description = (prop.get("description") or prop.get("title") or form_field.title).rstrip(".") + "."
        spec: dict[str, Any] = {"title": form_field.title, "section": form_field.section}
        if prop.get("type") == "boolean":
            spec |= {
                "default": KEEP,
                "type": "string",
                "enum": [KEEP, YES, NO],
                "values_display": {KEEP: "keep the preset's value", YES: "yes", NO: "no"},
                "description": description,
            }
        else:
            spec |= {
                "default": None,
                "type": ["null", prop["type"]],
                "description": description + EMPTY_KEEPS_PRESET,
            }
            for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength"):
                if bound in prop:
                    spec[bound] = prop[bound]
            if "enum" in prop:
                spec["enum"] = [None, *prop["enum"]]
        if form_field.examples:
            spec["examples"] = list(form_field.examples)
        if form_field.pattern:
            spec["pattern"] = form_field.pattern
        params[form_field.name] = spec | form_field.extra
    params["source"]["default"] = default_source(default_preset())
    return params


# --- trigger parameters -> Config ------------------------------------------------------------------------------------


def kaggle_credentials_available() -> bool:
    """True when the kaggle client would find credentials (environment or kaggle.json)."""
    from fashion_tagger.core.errors import SourceError
    from fashion_tagger.data.sources import check_kaggle_credentials

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
        from fashion_tagger.core.config import KAGGLE_FULL

        return KAGGLE_SMALL if preset == "demo" else KAGGLE_FULL
    return SYNTHETIC_DEFAULT


def default_preset() -> str:
    return os.environ.get(PRESET_ENV, "").strip() or "default"


def _param_value(name: str, value: Any) -> Any:
    """A form value as the config wants it: yes/no -> True/False; None, blank and `keep` mean "keep the preset"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().lower() in (KEEP, YES, NO):
        answer = value.strip().lower()
        return None if answer == KEEP else answer == YES
    return value


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
        value = _param_value(name, params.get(name))
        if value is None:
            continue
        section, field_name = key.split(".")
        nested.setdefault(section, {})[field_name] = value
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


# --- stages as child processes ---------------------------------------------------------------------------------------


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
