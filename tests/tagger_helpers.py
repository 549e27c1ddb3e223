"""Builders shared by the model tests: a tiny hand-made prepared split and a one-step training run on it.

The split is written directly (parquet + cached JPEGs), without the data stages, so evaluation and
prediction tests need only a few seconds to get a real checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fashion_tagger.core.config import Config, load_config
from fashion_tagger.core.io import write_json
from fashion_tagger.core.layout import SplitDir, cached_image_path
from fashion_tagger.data.labels import LabelSpace

COLOURS = {"Black": (20, 20, 20), "Red": (200, 30, 30), "Blue": (30, 60, 200)}
MASTER = ("Apparel", "Footwear")
WIDTH, HEIGHT = 32, 40


def product_image(colour: str, master: str, seed: int) -> Image.Image:
    """A coloured shape on white: a tall block for Apparel, a low wide one for Footwear."""
    rng = np.random.default_rng(seed)
    pixels = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    jitter = rng.integers(-2, 3, size=2)
    if master == "Apparel":
        top, bottom, left, right = 4, 36, 8, 24
    else:
        top, bottom, left, right = 24, 34, 3, 29
    pixels[top + jitter[0] : bottom + jitter[0], left + jitter[1] : right + jitter[1]] = COLOURS[colour]
    return Image.fromarray(pixels)


def make_split(root: Path, rows: int = 48, seed: int = 0) -> Path:
    """root/split (train/val/test parquet, labels.json, prepared.json) and root/cache with every image."""
    rng = np.random.default_rng(seed)
    split_dir, cache_root = root / "split", root / "cache"
    split_dir.mkdir(parents=True)
    records = []
    for i in range(rows):
        colour = list(COLOURS)[i % len(COLOURS)]
        master = MASTER[(i // len(COLOURS)) % len(MASTER)]
        image = product_image(colour, master, seed * 1000 + i)
        raw = root / "raw" / f"{1000 + i}.jpg"
        raw.parent.mkdir(parents=True, exist_ok=True)
        image.save(raw, "JPEG", quality=95)
        sha = hashlib.sha256(raw.read_bytes()).hexdigest()
        cached = cached_image_path(cache_root, sha, WIDTH, HEIGHT)
        cached.parent.mkdir(parents=True, exist_ok=True)
        image.save(cached, "JPEG", quality=95)
        records.append(
            {
                "id": 1000 + i,
                "masterCategory": master,
                # Every fifth colour is missing: it must be masked, never learnt as a class.
                "baseColour": None if i % 5 == 4 else colour,
                "image_path": str(raw),
                "image_sha256": sha,
            }
        )
    frame = pd.DataFrame(records)
    labels = LabelSpace.from_frame(frame, ["masterCategory", "baseColour"], min_class_count=2, source_hash="test")
    labels.save(split_dir)
    frame = pd.concat([frame, labels.encode(frame)], axis=1)
    order = rng.permutation(rows)
    is_val, is_test = order < rows // 4, (order >= rows // 4) & (order < rows // 2)
    frame[~is_val & ~is_test].to_parquet(split_dir / "train.parquet", index=False)
    frame[is_val].to_parquet(split_dir / "val.parquet", index=False)
    frame[is_test].to_parquet(split_dir / "test.parquet", index=False)
    write_json(SplitDir(split_dir).prepared, {"cache_root": str(cache_root), "width": WIDTH, "height": HEIGHT})
    return split_dir


def tiny_config(**train: object) -> Config:
    overrides = {
        "labels": {"attributes": ["masterCategory", "baseColour"], "min_class_count": 2},
        "images": {"width": WIDTH, "height": HEIGHT},
        "model": {"backbone": "test_efficientnet", "pretrained": False, "hidden_dim": 0, "dropout": 0.0,
                  "drop_path_rate": 0.0},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "backbone_lr_scale": 1.0, "warmup_epochs": 0,
                  "num_workers": 0, "progress_bar": False, "seed": 0, **train},
    }
    return load_config(None, overrides)


def train_on_real_small_images(real_small_raw: Path, root: Path, **extra: object) -> Config:
    """The real-data tier's short training: 3,000 real 60x80 images through validate, split and prepare at 48x64,
    three epochs of a tiny backbone into root/run. EXTRA adds config sections; returns the config it trained with."""
    from fashion_tagger.data.prepare import prepare_images
    from fashion_tagger.data.split import split_dataset
    from fashion_tagger.data.validate import validate_dataset
    from fashion_tagger.training.train import train_model

    data = load_config(None, {"data": {"max_rows": 3000}, "labels": {"min_class_count": 100},
                              "images": {"width": 48, "height": 64, "workers": 2}})
    validate_dataset(real_small_raw, root / "clean", data)
    split_dataset(root / "clean", root / "split", data)
    prepare_images(root / "split", root / "cache", data)
    config = load_config("demo", {
        "images": {"width": 48, "height": 64},
        "model": {"backbone": "test_efficientnet", "pretrained": False},
        "train": {"epochs": 3, "batch_size": 64, "num_workers": 0, "progress_bar": False},
        **extra,
    })
    train_model(config, split_dir=root / "split", run_dir=root / "run")
    return config
