"""Tiny, deterministic split and run directories for the MLflow tests (no training loop needed).

Images are 32x40 drawings whose block shape encodes masterCategory and whose colour encodes baseColour.
A "probe" model is a random `test_efficientnet` with least-squares heads on its features (nearly perfect);
a "constant" model always answers the same classes. Their checkpoints have the layout `train` writes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fashion_tagger.core.config import Config, load_config, save_config
from fashion_tagger.core.io import sha256_bytes, write_json
from fashion_tagger.data.imaging import ImageTransform
from fashion_tagger.data.labels import LabelSpace, label_column
from fashion_tagger.model.network import FashionTagger

WIDTH, HEIGHT = 32, 40
CLASSES = {"masterCategory": ("Apparel", "Footwear"), "baseColour": ("Blue", "Red")}
RGB = {"Blue": (40, 40, 200), "Red": (200, 40, 40), "Green": (40, 170, 40)}
BACKBONE = "test_efficientnet"


def tiny_config(home: Path | None = None, **registry) -> Config:
    return load_config(overrides={
        "home": str(home) if home else None,
        "labels": {"attributes": list(CLASSES), "min_class_count": 1},
        "images": {"width": WIDTH, "height": HEIGHT},
        "model": {"backbone": BACKBONE, "pretrained": False, "hidden_dim": 0, "dropout": 0.0,
                  "drop_path_rate": 0.0},
        "registry": {"gate_batch_size": 32, **registry},
    })


def draw(master: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """A tall block for Apparel, a low wide one for Footwear, in the colour's RGB (jittered)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    rgb = np.array(RGB[colour]) + rng.integers(-25, 25, 3)
    dx, dy = (int(v) for v in rng.integers(-2, 3, 2))
    box = (4 + dx, 4 + dy, 28 + dx, 30 + dy) if master == "Apparel" else (3 + dx, 24 + dy, 29 + dx, 36 + dy)
    image.paste(tuple(int(c) for c in rgb), box)
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_split(out_dir: Path, *, rows: int = 24, footwear_share: float = 0.5,
               colours: tuple[str, ...] = ("Blue", "Red"), seed: int = 0, membership: str | None = None) -> Path:
    """A split dir (labels.json, train/val/test.parquet, split_report.json) whose images are JPEG files.
    The first `footwear_share` of the rows are Footwear; colours cycle through COLOURS. MEMBERSHIP names the test
    membership record the split report cites (None: a split from before test membership was recorded)."""
    rng = np.random.default_rng(seed)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    n_footwear = round(rows * footwear_share)
    for i in range(rows):
        master, colour = ("Footwear" if i < n_footwear else "Apparel"), colours[i % len(colours)]
        data = jpeg_bytes(draw(master, colour, rng))
        path = images_dir / f"{seed}_{i}.jpg"
        path.write_bytes(data)
        records.append({"id": seed * 10_000 + i, "masterCategory": master, "baseColour": colour,
                        "image_path": str(path), "image_sha256": sha256_bytes(data)})
    frame = pd.DataFrame(records)
    labels = LabelSpace.from_frame(frame, list(CLASSES), 1, source_hash=f"tiny-{seed}")
    frame = pd.concat([frame, labels.encode(frame)], axis=1)
    labels.save(out_dir)
    for part in ("train", "val", "test"):  # every part holds every row: these models are built, not trained
        frame.to_parquet(out_dir / f"{part}.parquet", index=False)
    write_json(out_dir / "split_report.json", {"clean_dir": None, "seed": seed, "val_fraction": 0.5,
                                              "test_fraction": 0.5, "train_rows": rows, "val_rows": rows,
                                              "test_rows": rows, "test_membership": {"membership": membership}})
    return out_dir


def build_network(kind: str, labels: LabelSpace, *, strength: float = 4.0) -> FashionTagger:
    """'probe': least-squares heads on random features (nearly perfect), 'probe:noisy' the same with noisy
    weights (often wrong); 'constant:<name>,<name>': always
    those class names (one per attribute), with logit margin STRENGTH."""
    torch.manual_seed(0)
    model = FashionTagger(BACKBONE, labels.num_classes).eval()
    with torch.no_grad():
        if kind in ("probe", "probe:noisy"):
            rng = np.random.default_rng(123)
            pairs = [(m, c) for m in labels.classes["masterCategory"] for c in labels.classes["baseColour"]
                     for _ in range(40)]
            transform = ImageTransform(WIDTH, HEIGHT, model.data_config["mean"], model.data_config["std"])
            batch = torch.stack([transform(Image.open(io.BytesIO(jpeg_bytes(draw(m, c, rng))))) for m, c in pairs])
            design = np.c_[model.forward_features(batch).numpy(), np.ones(len(pairs))]
            for j, attribute in enumerate(labels.attributes):
                names = labels.classes[attribute]
                target = np.eye(len(names))[[names.index(pair[j]) for pair in pairs]] * 8.0  # confident logits
                solution, *_ = np.linalg.lstsq(design, target, rcond=None)
                linear = model.heads[attribute][-1]
                linear.weight.copy_(torch.from_numpy(solution[:-1].T).float())
                linear.bias.copy_(torch.from_numpy(solution[-1]).float())
                if kind == "probe:noisy":  # answers that hang on the pixels and are often wrong
                    noise = torch.from_numpy(np.random.default_rng(j).normal(size=linear.weight.shape)).float()
                    linear.weight.add_(noise * linear.weight.std() * 0.05)
        elif kind.startswith("constant:"):
            for attribute, name in zip(labels.attributes, kind.removeprefix("constant:").split(","), strict=True):
                linear = model.heads[attribute][-1]
                linear.weight.zero_()
                linear.bias.zero_()
                linear.bias[labels.classes[attribute].index(name)] = strength
        else:
            raise ValueError(kind)
    return model


def make_run(run_dir: Path, split_dir: Path, kind: str, config: Config | None = None, strength: float = 4.0) -> Path:
    """A run dir as `train` leaves it: config.yaml, run.json, checkpoints/best.ckpt, metrics.json."""
    config = config or tiny_config()
    labels = LabelSpace.load(split_dir)
    model = build_network(kind, labels, strength=strength)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    write_json(run_dir / "run.json", {"split_dir": str(split_dir), "labels_source_hash": labels.source_hash,
                                      "image_size": [WIDTH, HEIGHT]})
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": config.model_dump(mode="json"), "labels": labels.to_dict(),
                             "image_size": [WIDTH, HEIGHT]},
    }
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    torch.save(checkpoint, run_dir / "checkpoints" / "best.ckpt")
    write_json(run_dir / "metrics.json", {
        "status": "complete", "best_checkpoint": str(run_dir / "checkpoints" / "best.ckpt"),
        "history": [{"epoch": 0, "step": 3, "val_macro_f1": 0.5, "train_loss": 0.7}],
    })
    return run_dir


def true_labels(split_dir: Path) -> dict[str, np.ndarray]:
    test = pd.read_parquet(split_dir / "test.parquet")
    return {a: test[label_column(a)].to_numpy() for a in CLASSES}
