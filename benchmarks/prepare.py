"""Images per second of the reference way (open, full decode, resize) against `prepare` (DCT draft + resize + save).

Run: .venv/bin/python benchmarks/prepare.py [--generated 24] [--real ../shared/data/fashion-real/images-full]
Prints one table per image set with the ratio measured in this run, then prepare's process pool against one worker.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_tagger.core.config import load_config  # noqa: E402
from fashion_tagger.data.prepare import prepare_image, prepare_images  # noqa: E402

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-real" / "images-full"


def reference(path: Path, width: int, height: int) -> Image.Image:
    """What the reference notebook does for every image in every epoch."""
    with Image.open(path) as image:
        return image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


def cached_read(path: Path) -> Image.Image:
    """What a training epoch pays per image once prepare has run."""
    with Image.open(path) as image:
        return image.convert("RGB")


def images_per_second(funcs: dict[str, Callable[[Path], object]], paths: list[Path], rounds: int) -> dict[str, float]:
    """Each image timed by every way back to back, keeping each image's best of `rounds`.

    Interleaving per image means a noisy neighbour on a shared machine slows both ways alike, and the per-image
    minimum drops the passes it hit.
    """
    best = {name: [float("inf")] * len(paths) for name in funcs}
    for _ in range(rounds):
        for i, path in enumerate(paths):
            for name, func in funcs.items():
                started = time.perf_counter()
                func(path)
                best[name][i] = min(best[name][i], time.perf_counter() - started)
    return {name: len(paths) / sum(seconds) for name, seconds in best.items()}


def generated_images(out: Path, count: int) -> list[Path]:
    from fashion_tagger.data.synthetic.generator import generate_dataset

    generate_dataset(out, rows=count, size="full", seed=1)
    return sorted((out / "images").glob("*.jpg"))


def measure(label: str, paths: list[Path], width: int, height: int, rounds: int, work: Path) -> dict:
    sizes = sorted({Image.open(p).size for p in paths}, key=lambda s: -s[0] * s[1])
    for path in paths:  # warm the page cache: both ways then read from memory
        path.read_bytes()
    out = work / f"bench-{label}"
    out.mkdir()
    speed = images_per_second(
        {
            "reference": lambda p: reference(p, width, height),
            "prepare": lambda p: prepare_image(p, out / p.name, width, height, 95),
        },
        paths,
        rounds,
    )
    ref, ours = speed["reference"], speed["prepare"]
    cached = images_per_second({"cached": cached_read}, sorted(out.glob("*.jpg")), rounds)["cached"]
    return {
        "set": label,
        "images": len(paths),
        "sizes": ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else ""),
        "reference img/s": round(ref, 1),
        "prepare img/s": round(ours, 1),
        "ratio": round(ours / ref, 2),
        "cached read img/s": round(cached, 1),
    }


def pool_scaling(paths: list[Path], width: int, height: int, work: Path, workers: int) -> list[dict]:
    split = work / "split"
    split.mkdir()
    frame = pd.DataFrame(
        {
            "image_path": [str(p) for p in paths],
            "image_sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths],
        }
    )
    frame.to_parquet(split / "train.parquet")
    frame.iloc[:0].to_parquet(split / "val.parquet")
    rows = []
    for n in sorted({1, workers}):
        config = load_config(None, {"images": {"width": width, "height": height, "workers": n}})
        result = prepare_images(split, work / f"cache-{n}", config)
        rows.append(
            {"workers": n, "images": result.images, "seconds": result.seconds, "img/s": result.images / result.seconds}
        )
    for row in rows:
        row["speedup"] = round(row["img/s"] / rows[0]["img/s"], 2)
        row["img/s"] = round(row["img/s"], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=int, default=24, help="generated 1800x2400 JPEGs (0: skip)")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL, help="folder of real full-size JPEGs")
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size for the scaling run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        sets: list[tuple[str, list[Path]]] = []
        if args.generated:
            sets.append(("generated", generated_images(work / "generated", args.generated)))
        if args.real.is_dir() and (real := sorted(args.real.glob("*.jpg"))):
            sets.append(("real", real))
            # The gain depends on the source size: DCT scaling saves most on the largest photos.
            by_size: dict[str, list[Path]] = {}
            for path in real:
                with Image.open(path) as image:
                    by_size.setdefault(f"real {image.width}x{image.height}", []).append(path)
            sets.extend((label, paths) for label, paths in sorted(by_size.items(), key=lambda kv: -len(kv[1])))
        print(f"target {args.width}x{args.height}, single process, best of {args.rounds}; {os.cpu_count()} CPUs")
        rows = [measure(label, paths, args.width, args.height, args.rounds, work) for label, paths in sets]
        print(pd.DataFrame(rows).to_markdown(index=False) if _has_tabulate() else pd.DataFrame(rows).to_string())
        pool_paths = sorted({p for _, paths in sets for p in paths})
        print(f"\nprepare_images, {len(pool_paths)} images, process pool vs 1 worker:")
        scaling = pool_scaling(pool_paths, args.width, args.height, work, args.workers)
        print(pd.DataFrame(scaling).to_markdown(index=False) if _has_tabulate() else pd.DataFrame(scaling).to_string())


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
