"""Where a configuration comes from before it is validated: the bundled presets, a YAML file, and
`section.field=value` overrides merged over them. `core/config.py` turns the result into a `Config`."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fashion_tagger.core.errors import ConfigError
from fashion_tagger.core.io import read_bytes


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("fashion_tagger.presets").iterdir()
                  if p.name.endswith(".yaml"))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line 3, column 7: mapping values are not allowed here` from PyYAML's multi-line message."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _read_yaml(source: str | Path) -> dict[str, Any]:
    path = Path(source).expanduser()
    if not path.exists() and str(source) in preset_names():
        text = resources.files("fashion_tagger.presets").joinpath(f"{source}.yaml").read_text()
        origin = f"preset {source!r}"
    elif path.is_dir():
        raise ConfigError(f"config {path} is a directory: give a YAML file or a preset ({', '.join(preset_names())})")
    elif path.exists():
        origin = str(path)
        raw = read_bytes(path, ConfigError, "config")
        offset = raw.find(b"\0")  # a NUL byte is binary even where the rest decodes
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            text, offset = "", exc.start if offset < 0 else min(offset, exc.start)
        if offset >= 0:
            raise ConfigError(f"config {path} is not a text file (byte {offset} is not UTF-8 text): give a YAML file")
    else:
        raise ConfigError(f"config {source!r} is neither a file nor a preset ({', '.join(preset_names())})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {origin} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {origin} must hold a mapping of sections, not {type(data).__name__}")
    return data


def read_config_source(source: str | Path) -> dict[str, Any]:
    """The mapping a YAML file or preset holds, before defaults, overrides and validation."""
    return _read_yaml(source)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (['train', 'epochs'], 3); the value is parsed as YAML (numbers, bools, null)."""
    key, sep, raw = item.partition("=")
    keys = [part.strip() for part in key.split(".")]
    if not sep or not all(keys):
        raise ConfigError(f"override {item!r} must look like section.field=value, e.g. train.epochs=3")
    try:
        return keys, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {item!r}: the value {raw!r} is not valid YAML ({_yaml_problem(exc)}); "
            "write a number, true/false, null, [a, b] or quoted text"
        ) from None


def merge_overrides(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts merged key by key; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out
