"""Time and peak memory against the size of the work (issue 20): `validate` (metadata only) of a styles.csv of the
real file's 44,446 lines and of 1,000,000 lines (the real lines repeated with fresh ids), each in a fresh process.

With --bootstrap N [N ...]: the gate's paired bootstrap (1,000 resamples, the seven attributes with the full
dataset's class counts, random predictions) on test parts of N images, each in a fresh process, instead.

With --tag N [N ...]: `fashion-tagger tag` (the CLI, in a fresh process) of catalogs of N distinct generated 60x80
JPEGs with one exported model, then of the largest again after 1 % of its images changed (the incremental rerun).

Run: .venv/bin/python benchmarks/scale.py [--lines 44446 1000000] [--styles PATH]
     .venv/bin/python benchmarks/scale.py --bootstrap 5000 50000
     .venv/bin/python benchmarks/scale.py --tag 10000 100000 [--backbone test_efficientnet --size 64x80]
PATH defaults to $FASHION_TAGGER_REAL_DATA/styles.csv, else ../shared/data/fashion-real/styles.csv, else a generated
styles.csv (data.synthetic). Prints a markdown table: seconds, peak resident memory, and time per line against the
smallest size (1.0 = linear; the target is within 1.3x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VALIDATE = """
import sys
from fashion_tagger.core.config import load_config
from fashion_tagger.data.validate import validate_dataset
config = load_config(None, ["data.metadata_only=true", "data.max_reject_fraction=1.0"])
result = validate_dataset(sys.argv[1], sys.argv[2], config)
print(result.lines_read, result.rows_clean, result.rows_rejected)
"""

BOOTSTRAP = """
import resource, sys, time
import numpy as np
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.evaluation.bootstrap import paired_bootstrap
classes = {"gender": 5, "masterCategory": 4, "subCategory": 15, "articleType": 23, "baseColour": 16, "season": 4,
           "usage": 4}
labels = LabelSpace(classes={a: tuple(f"c{i}" for i in range(k)) for a, k in classes.items()}, min_class_count=500)
n, rng = int(sys.argv[1]), np.random.default_rng(0)
truth = {a: rng.integers(0, k, n) for a, k in classes.items()}
champion = {a: np.where(rng.random(n) < 0.8, t, rng.integers(0, classes[a], n)) for a, t in truth.items()}
challenger = {a: np.where(rng.random(n) < 0.82, t, rng.integers(0, classes[a], n)) for a, t in truth.items()}
started = time.perf_counter()
result = paired_bootstrap(truth, challenger, champion, labels, resamples=1000, seed=0)
print(f"{time.perf_counter() - started:.2f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
      f"{result['headline_gain']['low']:.4f} {result['headline_gain']['high']:.4f}")
"""


def bootstrap_table(sizes: list[int]) -> None:
    rows = []
    for n in sorted(sizes):
        _, _, out = run_child(BOOTSTRAP, str(n))
        seconds, peak, low, high = out.split()
        rows.append((n, float(seconds), float(peak), low, high))
        print(f"bootstrap over {n:,} images: {seconds} s, peak {peak} MB, gain in [{low}, {high}]", flush=True)
    base_n, base_s = rows[0][0], rows[0][1]
    print(f"\nthe gate's paired bootstrap, 1,000 resamples, 7 attributes; {os.cpu_count()} CPUs\n")
    print("| test images | seconds (the bootstrap) | peak memory of its process (MB) | time per image vs smallest |")
    print("| ---: | ---: | ---: | ---: |")
    for n, seconds, peak, _, _ in rows:
        print(f"| {n:,} | {seconds:.2f} | {peak:,.0f} | {(seconds / n) / (base_s / base_n):.2f} |")


POOL = 2_000  # distinct generated images; the catalogs repeat them, each copy made unique (`unique_jpeg`)


def unique_jpeg(data: bytes, tag: str) -> bytes:
    """DATA (a JPEG) with a comment segment holding TAG right after its start marker: other bytes, so another
    content hash, and the same pixels, so the same work to decode."""
    comment = tag.encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def write_catalog(pool: list[bytes], count: int, folder: Path, version: str = "0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i + 1}.jpg").write_bytes(unique_jpeg(pool[i % len(pool)], f"{i + 1}:{version}"))
    return folder


# `fashion-tagger tag` as the CLI runs it, printing its own peak resident memory and its DataLoader workers' largest
# on the way out (the workers are its children): PEAK_MB <the larger>.
TAG_CLI = """
import atexit, resource, runpy, sys
def peak():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"PEAK_MB {max(own, workers) / 1024:.0f}", file=sys.stderr)
atexit.register(peak)
sys.argv = ["fashion-tagger", *sys.argv[1:]]
runpy.run_module("fashion_tagger", run_name="__main__")
"""


def tag_table(sizes: list[int], backbone: str, width: int, height: int) -> None:
    from inference import export_model

    from fashion_tagger.data.synthetic.generator import generate_dataset

    with tempfile.TemporaryDirectory(prefix="bench-scale-tag-") as tmp:
        work = Path(tmp)
        export = export_model(backbone, width, height, work / "export")
        generate_dataset(work / "pool", rows=POOL, size="small", seed=5)
        pool = [p.read_bytes() for p in sorted((work / "pool" / "images").glob("*.jpg"))]
        rows = []

        def tag(catalog: Path, out: Path) -> tuple[float, float, dict]:
            started = time.perf_counter()
            child = subprocess.run([sys.executable, "-c", TAG_CLI, "tag", str(catalog), "--out", str(out),
                                    "--model", str(export), "--set", f"home={work / 'home'}"],
                                   capture_output=True, text=True, cwd=REPO)
            seconds = time.perf_counter() - started
            if child.returncode:
                raise SystemExit(f"tag {catalog} failed:\n{child.stderr[-3000:]}")
            peak = max(float(v) for v in re.findall(r"^PEAK_MB (\S+)", child.stderr, re.M))
            return seconds, peak, json.loads(child.stdout)

        # The fixed cost of a `tag` process (imports, the model, the loader's workers): a catalog of 10 images.
        fixed_s, fixed_peak, _ = tag(write_catalog(pool, 10, work / "catalog-10"), work / "tags-10")
        print(f"tag 10 images (the fixed cost of a process): {fixed_s:.1f} s, peak {fixed_peak:,.0f} MB", flush=True)

        for n in sorted(sizes):
            catalog = write_catalog(pool, n, work / f"catalog-{n}")
            seconds, peak, result = tag(catalog, work / f"tags-{n}")
            rows.append((f"{n:,} images, new", n, seconds, peak, result))
            print(f"tag {n:,} images: {seconds:.1f} s, peak {peak:,.0f} MB ({_counts(result)})", flush=True)
        n = max(sizes)
        changed = max(1, n // 100)
        for i in range(0, n, n // changed)[:changed]:  # 1 % of the images, spread over the catalog
            (catalog / f"{i + 1}.jpg").write_bytes(unique_jpeg(pool[i % len(pool)], f"{i + 1}:changed"))
        seconds, peak, result = tag(catalog, work / f"tags-{n}")
        rows.append((f"{n:,} images, {changed:,} changed (rerun)", changed, seconds, peak, result))
        print(f"rerun after {changed:,} of {n:,} changed: {seconds:.1f} s, peak {peak:,.0f} MB ({_counts(result)})")
    base_n, base_s = rows[0][1], rows[0][2]
    full_s = rows[-2][2]
    print(f"\n`fashion-tagger tag`, {backbone} at {width}x{height} (random weights, production heads), CPU, each run "
          f"a fresh process (model loading included; a 10-image catalog takes {fixed_s:.1f} s and {fixed_peak:,.0f} "
          f"MB); {os.cpu_count()} CPUs; peak = the process's own peak resident memory or its largest worker's\n")
    print("| catalog | seconds | peak memory (MB) | time per image vs smallest | tagged / reused |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, n, seconds, peak, result in rows:
        rerun = "rerun" in label
        ratio = f"{seconds / full_s:.1%} of full" if rerun else f"{(seconds / n) / (base_s / base_n):.2f}"
        print(f"| {label} | {seconds:.1f} | {peak:,.0f} | {ratio} | {result.get('tagged')} / {result.get('reused')} |")


def _counts(result: dict) -> str:
    return ", ".join(f"{key} {result[key]}" for key in ("tagged", "reused", "rejected") if key in result)


def real_styles() -> Path | None:
    for folder in (os.environ.get("FASHION_TAGGER_REAL_DATA"), REPO.parent / "shared" / "data" / "fashion-real"):
        if folder and (Path(folder) / "styles.csv").is_file():
            return Path(folder) / "styles.csv"
    return None


def generated_styles(work: Path) -> Path:
    from fashion_tagger.data.synthetic.generator import generate_dataset

    return generate_dataset(work / "generated", rows=2_000, seed=0).out_dir / "styles.csv"  # its lines, repeated


def repeat_lines(source: Path, lines: int, out: Path) -> Path:
    """LINES data lines: SOURCE's, repeated as often as needed, each with a fresh id (1, 2, ...)."""
    header, *body = source.read_bytes().splitlines(keepends=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:
        fh.write(header)
        written = 0
        while written < lines:
            for line in body[: lines - written]:
                _, comma, rest = line.partition(b",")
                written += 1
                fh.write(str(written).encode() + comma + rest if comma else line)
    return out


def run_child(code: str, *args: str) -> tuple[float, float, str]:
    """Seconds and peak resident memory (MB) of `python -c CODE ARGS` in a fresh process, and its output."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
    out, err = child.communicate()
    seconds = time.perf_counter() - started
    if child.returncode:
        raise SystemExit(f"{args} failed:\n{err[-3000:]}")
    # ru_maxrss of the children waited for so far: the largest, so measure sizes from small to large.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, peak_mb, out.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[44_446, 1_000_000])
    parser.add_argument("--styles", type=Path, help="the styles.csv whose lines are repeated (default: the real one)")
    parser.add_argument("--bootstrap", type=int, nargs="+", metavar="N", help="measure the gate's bootstrap instead")
    parser.add_argument("--tag", type=int, nargs="+", metavar="N", help="measure `tag` of N-image catalogs instead")
    parser.add_argument("--backbone", default="test_efficientnet", help="the exported model's backbone (--tag)")
    parser.add_argument("--size", default="64x80", help="the exported model's input, WIDTHxHEIGHT (--tag)")
    args = parser.parse_args()
    if args.bootstrap:
        bootstrap_table(args.bootstrap)
        return
    if args.tag:
        width, height = (int(v) for v in args.size.split("x"))
        tag_table(args.tag, args.backbone, width, height)
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        source = args.styles or real_styles() or generated_styles(work)
        rows = []
        for lines in sorted(args.lines):
            raw = repeat_lines(source, lines, work / f"raw-{lines}" / "styles.csv").parent
            seconds, peak, out = run_child(VALIDATE, str(raw), str(work / f"out-{lines}"))
            rows.append((lines, seconds, peak, out))
            print(f"validate {lines:,} lines: {seconds:.1f} s, peak {peak:,.0f} MB ({out})", flush=True)
    base_lines, base_seconds = rows[0][0], rows[0][1]
    print(f"\nvalidate, metadata only, lines of {source.name} ({source}); {os.cpu_count()} CPUs\n")
    print("| lines | seconds | peak memory (MB) | time per line vs the smallest |")
    print("| ---: | ---: | ---: | ---: |")
    for lines, seconds, peak, _ in rows:
        print(f"| {lines:,} | {seconds:.1f} | {peak:,.0f} | {(seconds / lines) / (base_seconds / base_lines):.2f} |")


if __name__ == "__main__":
    main()
