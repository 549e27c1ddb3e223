"""What a trained model depends on, as one hash: the clean data, the label space, which rows train and validate,
and the training configuration. A run whose fingerprint equals the champion's would repeat the champion's
training, so it is skipped unless `train.force` is set.

Left out on purpose: where things live (home, source, endpoints, MLflow), how fast they run (workers, threads,
progress bars), the gate's settings (registry.*) and `train.force` itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from fashion_tagger.core.config import Config, config_to_flat_dict
from fashion_tagger.core.io import read_json, write_json
from fashion_tagger.core.layout import SplitDir
from fashion_tagger.data.labels import LabelSpace

# Config keys (or section prefixes) that do not change what training produces.
NOT_TRAINING = ("home", "data.", "registry.", "images.workers", "train.num_workers", "train.cpu_threads",
                "train.progress_bar", "train.force")
TRAINING_DATA = ("data.max_rows",)  # the rest of data.* is summed up by the clean table's hash


def training_config(config: Config) -> dict[str, Any]:
    """The flat config keys that decide what training produces."""
    flat = config_to_flat_dict(config)
    return {key: value for key, value in sorted(flat.items())
            if key in TRAINING_DATA or not any(key == p or (p.endswith(".") and key.startswith(p))
                                               for p in NOT_TRAINING)}


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _part_hash(split: SplitDir, part: str) -> str:
    frame = pd.read_parquet(split.part(part), columns=["id"])
    return _sha256(sorted(int(i) for i in frame["id"]))


def compute_fingerprint(config: Config, split_dir: str | Path) -> dict[str, Any]:
    """{fingerprint, clean_sha256, labels, parts, config}: the hash and what went into it."""
    split = SplitDir(Path(split_dir))
    labels = LabelSpace.load(split.labels)
    parts = {part: _part_hash(split, part) for part in ("train", "val")}
    content = {
        "clean_sha256": labels.source_hash,
        "labels": {attribute: list(names) for attribute, names in labels.classes.items()},
        "parts": parts,
        "config": training_config(config),
    }
    return {"fingerprint": _sha256(content), **content}


def write_fingerprint(config: Config, split_dir: str | Path) -> dict[str, Any]:
    fingerprint = compute_fingerprint(config, split_dir)
    write_json(SplitDir(Path(split_dir)).fingerprint, fingerprint)
    return fingerprint


def read_fingerprint(split_dir: str | Path) -> str:
    """The split's recorded fingerprint, or "" for a split written before fingerprints existed."""
    path = SplitDir(Path(split_dir)).fingerprint
    return str(read_json(path).get("fingerprint", "")) if path.is_file() else ""
