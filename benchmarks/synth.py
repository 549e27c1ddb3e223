"""Images per second of the dataset generator on one core: small (60x80) and a few full (1800x2400) images.

Reproduce: `taskset -c 0 .venv/bin/python benchmarks/synth.py --rows 2000 --full-rows 3`
(`taskset` pins one core; the generator is single-threaded anyway). Target: >= 500 small images/s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from fashion_tagger.data.synthetic.generator import generate_dataset


def measure(rows: int, size: str, seed: int) -> float:
    """Whole-dataset throughput (labels, rendering, JPEG encoding, writing) in images per second."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synth"
        started = time.perf_counter()
        result = generate_dataset(out, rows=rows, size=size, seed=seed)
        seconds = time.perf_counter() - started
        shutil.rmtree(out)
    return result.images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="small images to generate")
    parser.add_argument("--full-rows", type=int, default=3, help="full-size images to generate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    measure(50, "small", args.seed)  # warm caches (texture masks, tables) outside the timing
    small = measure(args.rows, "small", args.seed)
    full = measure(args.full_rows, "full", args.seed)
    print(f"small 60x80:     {small:8.1f} images/s ({args.rows} rows)")
    print(f"full 1800x2400:  {full:8.2f} images/s ({args.full_rows} rows)")
    print(f"target >= 500 small images/s: {'met' if small >= 500 else 'NOT met'}")


if __name__ == "__main__":
    main()
