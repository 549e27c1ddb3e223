"""Quality of training recipes on real images at an equal wall-clock budget: accuracy and macro-F1 per attribute.

Every recipe trains through the project's own stages (validate, split, prepare, `train.train_model`,
`evaluate.evaluate_run`) on the same real images and is scored on the same held-back validation split; a recipe
is nothing but configuration overrides. The number of epochs of each recipe is sized to the budget from a short
timed calibration run, so the learning-rate schedule runs its whole course, and a Timer stops any recipe that
still runs past 1.3x the budget.

    python benchmarks/quality.py --data ../shared/data/fashion-real --budget-s 150   # the 6,000 real 60x80 images

Recipes (see RECIPES): the project's fine-tuning recipe from the converted ImageNet weights (`demo` preset),
a variant of it, the reference notebook's recipe on the same weights, and the project's recipe from random
initialisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_tagger.core.config import Config, load_config  # noqa: E402
from fashion_tagger.data.prepare import prepare_images  # noqa: E402
from fashion_tagger.data.split import split_dataset  # noqa: E402
from fashion_tagger.data.validate import validate_dataset  # noqa: E402

log = logging.getLogger("quality")
MAX_OVERRUN = 1.3  # the Timer's hard stop, as a multiple of the budget
CALIBRATION_BATCHES = 12


@dataclass(frozen=True)
class Recipe:
    name: str
    what: str
    overrides: dict[str, Any]
    augment: bool = True
    square: bool = False  # the reference resizes to a square (256x256 there; the same pixel count here)
    extra: dict[str, Any] = field(default_factory=dict)


# Shared by every recipe: the demo preset's hardware settings (one compute thread and one loader worker on
# two cores), and a validation split fixed by its seed.
COMMON = [
    "train.cpu_threads=1", "train.num_workers=1", "train.progress_bar=false", "train.early_stopping_patience=100",
    "split.seed=42", "split.val_fraction=0.2", "labels.min_class_count=60",
]
LITE0 = ["model.backbone=tf_efficientnet_lite0", "model.pretrained=true", "model.pretrained_path=imagenet-lite0"]
RECIPES = {
    r.name: r
    for r in (
        Recipe("project", "the demo preset: ImageNet lite0, masked CE, AdamW warmup + cosine, augmentation", {}),
        Recipe("project-lr1e-3", "the same, lr 1e-3 (heads) and 1e-4 (backbone)",
               {"train.lr": 1e-3, "train.backbone_lr_scale": 0.1}),
        Recipe(
            "reference",
            "the notebook: ImageNet lite0 frozen, one-hot BCE x None mask, AdamW 5e-5, StepLR, no augmentation, "
            "square input",
            {"train.loss": "bce", "train.lr": 5e-5, "train.backbone_lr_scale": 1.0, "train.schedule": "step",
             "train.step_size": 1, "train.step_gamma": 0.9, "train.warmup_epochs": 0,
             "train.freeze_backbone_epochs": 1000, "train.precision": "32-true"},
            augment=False,
            square=True,
        ),
        Recipe("project-scratch", "the project's recipe from random initialisation (no ImageNet weights)",
               {"model.pretrained": False, "model.pretrained_path": None, "train.lr": 3e-3,
                "train.backbone_lr_scale": 1.0}),
    )
}


def real_raw_dir(data: Path, out: Path) -> Path:
    """The styles.csv lines whose image is in DATA/images-small, as a raw dir of symlinks (nothing copied)."""
    images = data / "images-small"
    if not images.is_dir():
        sys.exit(f"{images} does not exist: --data must name a folder with styles.csv and images-small/")
    (out / "images").mkdir(parents=True, exist_ok=True)
    ids = set()
    for image in images.iterdir():
        link = out / "images" / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
        ids.add(image.stem)
    lines = (data / "styles.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "styles.csv").write_text(lines[0] + "".join(line for line in lines[1:] if line.split(",", 1)[0] in ids))
    return out


@contextmanager
def augmentation(enabled: bool) -> Iterator[None]:
    """The project always augments its training images; the reference recipe does not, so for it the training
    transform is the evaluation one (the cached image as it is)."""
    import fashion_tagger.training.datamodule as data

    original = data.train_transform
    if not enabled:
        data.train_transform = lambda width, height: data.eval_transform()
    try:
        yield
    finally:
        data.train_transform = original


def recipe_config(recipe: Recipe, width: int, height: int, home: Path, extra: list[str]) -> Config:
    overrides = [f"home={home}", *COMMON, *LITE0, f"images.width={width}", f"images.height={height}", *extra]
    overrides += [f"{k}={json.dumps(v) if v is not None else 'null'}" for k, v in recipe.overrides.items()]
    return load_config("demo", overrides)


def square_size(width: int, height: int) -> int:
    """The side of the square with the same number of pixels (rounded to a multiple of 8)."""
    return max(16, int(round(math.sqrt(width * height) / 8)) * 8)


def prepared_split(config: Config, split_dir: Path, cache: dict[tuple[int, int], Path]) -> Path:
    """SPLIT_DIR prepared at the config's size; another size gets its own copy of the split (prepared.json
    belongs to the split directory)."""
    size = (config.images.width, config.images.height)
    if size not in cache:
        target = split_dir if not cache else split_dir.with_name(f"{split_dir.name}-{size[0]}x{size[1]}")
        if target != split_dir and not target.exists():
            shutil.copytree(split_dir, target)
        prepare_images(target, config.cache_root, config)
        cache[size] = target
    return cache[size]


def epochs_for_budget(config: Config, recipe: Recipe, split_dir: Path, run_root: Path, budget_s: float) -> dict:
    """Seconds per epoch of RECIPE from a short timed run, and the number of epochs that fits the budget."""
    import pyarrow.parquet as pq

    from fashion_tagger.training.train import train_model

    calibration = config.model_copy(deep=True)
    calibration.train.epochs = 1
    calibration.train.limit_train_batches = CALIBRATION_BATCHES
    calibration.train.limit_val_batches = CALIBRATION_BATCHES
    with augmentation(recipe.augment):
        result = train_model(calibration, split_dir=split_dir, run_dir=run_root / f"calibrate-{recipe.name}")
    entry = json.loads(Path(result.metrics_path).read_text())["history"][-1]
    train_rows = pq.ParquetFile(split_dir / "train.parquet").metadata.num_rows
    val_rows = pq.ParquetFile(split_dir / "val.parquet").metadata.num_rows
    batch = config.train.batch_size
    train_s = entry["train_seconds"] / CALIBRATION_BATCHES * (train_rows // batch)
    val_s = (entry["epoch_seconds"] - entry["train_seconds"]) / CALIBRATION_BATCHES * math.ceil(val_rows / batch)
    epoch_s = train_s + max(0.0, val_s)
    return {"epoch_s": round(epoch_s, 1), "epochs": max(1, int(budget_s // epoch_s))}


def run_recipe(recipe: Recipe, args: argparse.Namespace, home: Path, split_dir: Path,
               prepared: dict[tuple[int, int], Path]) -> dict[str, Any]:
    from lightning.pytorch.callbacks import Timer

    from fashion_tagger.evaluation.evaluate import evaluate_run
    from fashion_tagger.training.train import train_model

    width, height = (square_size(args.width, args.height),) * 2 if recipe.square else (args.width, args.height)
    config = recipe_config(recipe, width, height, home, args.set or [])
    split = prepared_split(config, split_dir, prepared)
    run_root = home / "quality-runs"
    plan = epochs_for_budget(config, recipe, split, run_root, args.budget_s)
    config.train.epochs = plan["epochs"]
    log.info("%s: %d epochs of about %.0f s in a budget of %.0f s", recipe.name, plan["epochs"], plan["epoch_s"],
             args.budget_s)
    started = time.perf_counter()
    with augmentation(recipe.augment):
        trained = train_model(config, split_dir=split, run_dir=run_root / recipe.name,
                              callbacks=[Timer(duration={"seconds": args.budget_s * MAX_OVERRUN})])
    train_seconds = time.perf_counter() - started
    evaluated = evaluate_run(run_root / recipe.name, config)
    metrics = json.loads(evaluated.metrics_path.read_text())
    return {
        "calibration": metrics.get("calibration", {}).get("attributes", {}),
        "coverage": metrics.get("coverage", {}),
        "recipe": recipe.name,
        "what": recipe.what,
        "input": f"{width}x{height}",
        "epochs": trained.epochs_completed,
        "train_s": round(train_seconds, 1),
        "images_per_s": trained.images_per_s,
        "headline_macro_f1": evaluated.headline_macro_f1,
        "exact_match": evaluated.exact_match,
        "attributes": evaluated.attributes,
        "rows": evaluated.rows,
    }


def tables(results: list[dict[str, Any]]) -> str:
    """Markdown: one summary row per recipe, then macro-F1 and accuracy per attribute and recipe."""
    lines = ["| recipe | input | epochs | train s | train img/s | headline macro-F1 | exact match |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['recipe']} | {r['input']} | {r['epochs']} | {r['train_s']:.0f} | "
                     f"{r['images_per_s']:.0f} | {r['headline_macro_f1']:.3f} | {r['exact_match']:.3f} |")
    attributes = list(results[0]["attributes"]) if results else []
    for metric, title in (("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        lines += ["", f"{title} per attribute on the held-back split:", "",
                  "| attribute | " + " | ".join(r["recipe"] for r in results) + " | majority |",
                  "| --- | " + " | ".join("---:" for _ in results) + " | ---: |"]
        for a in attributes:
            baseline = results[0]["attributes"][a][f"majority_baseline_{metric}"]
            cells = " | ".join(f"{r['attributes'][a][metric]:.3f}" for r in results)
            lines.append(f"| {a} | {cells} | {baseline:.3f} |")
    for r in results:
        if not r.get("calibration"):
            continue
        lines += ["", f"{r['recipe']}: calibration (temperatures fitted on validation) and the review thresholds for "
                  "the precision target, on test:", "",
                  "| attribute | T | ECE before | ECE after | NLL before | NLL after | threshold "
                  "| precision of accepted (95% interval) | coverage (95% interval) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for a, c in r["calibration"].items():
            at = r["coverage"].get(a, {})
            threshold = f"{at['threshold']:.3f}" if at.get("threshold") is not None else "none"
            precision = (f"{at['precision']:.3f} [{at['precision_interval'][0]:.3f}, {at['precision_interval'][1]:.3f}]"
                         if at.get("precision") is not None and at.get("precision_interval") else "-")
            coverage = (f"{at['coverage']:.1%} [{at['coverage_interval'][0]:.1%}, {at['coverage_interval'][1]:.1%}]"
                        if at.get("coverage_interval") else "-")
            lines.append(f"| {a} | {c['temperature']:.2f} | {c['ece_before']:.4f} | {c['ece_after']:.4f} | "
                         f"{c['nll_before']:.3f} | {c['nll_after']:.3f} | {threshold} | {precision} | {coverage} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=os.environ.get("FASHION_TAGGER_REAL_DATA"),
                        help="folder with styles.csv and images-small/ (default $FASHION_TAGGER_REAL_DATA)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="training seconds per recipe")
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--home", type=Path, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--set", action="append", help="an override for every recipe, e.g. data.max_rows=2000")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if not args.data:
        sys.exit("give --data or set FASHION_TAGGER_REAL_DATA (a folder like ../shared/data/fashion-real)")
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    home = args.home or Path(tempfile.mkdtemp(prefix="fashion-tagger-quality-"))
    started = time.perf_counter()
    try:
        base = recipe_config(RECIPES["project"], args.width, args.height, home, args.set or [])
        raw = real_raw_dir(Path(args.data), home / "raw" / "real-small")
        clean, split_dir = home / "clean", home / "split"
        validated = validate_dataset(raw, clean, base)
        split = split_dataset(clean, split_dir, base)
        log.info("%d clean rows: %d train, %d held back", validated.rows_clean, split.train_rows, split.val_rows)
        prepared: dict[tuple[int, int], Path] = {}
        results = []
        for name in args.recipes.split(","):
            results.append(run_recipe(RECIPES[name], args, home, split_dir, prepared))
            log.info("%s: headline macro-F1 %.3f", name, results[-1]["headline_macro_f1"])
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    print(f"\n{validated.rows_clean} real images ({split.train_rows} train, {split.val_rows} held back), "
          f"budget {args.budget_s:.0f} s of training per recipe, whole run {time.perf_counter() - started:.0f} s\n")
    for r in results:
        print(f"- {r['recipe']}: {r['what']}")
    print()
    print(tables(results))
    if args.json:
        args.json.write_text(json.dumps({"budget_s": args.budget_s, "results": results}, indent=2))


if __name__ == "__main__":
    main()
