"""A generated dataset in the exact Kaggle layout (styles.csv + images/<id>.jpg) with the real file's quirks.

The writer: it places every quirk at its real rate, asks `styles` for the rows and `render` for the pictures,
and publishes the folder only once complete; everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import io
import random
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fashion_tagger.core.errors import DataError
from fashion_tagger.core.io import StageResult
from fashion_tagger.core.schema import STYLE_COLUMNS
from fashion_tagger.data.synthetic.render import render_image
from fashion_tagger.data.synthetic.styles import display_name, sample_ids, sample_labels

SIZES: dict[str, int] = {"small": 1, "full": 30}  # scale over the 60x80 base: full is 1800x2400
JPEG_QUALITY = 90

# Real rates per data line (44,446 lines): quirks are placed at exactly these shares, and at least once each
# from MIN_ROWS_FOR_QUIRKS rows on, so a test-sized dataset still shows every one of them.
MIN_ROWS_FOR_QUIRKS = 200
MALFORMED_RATE = 22 / 44446
NA_RATES = {"usage": 316 / 44446, "baseColour": 15 / 44446, "productDisplayName": 7 / 44446}
EMPTY_RATES = {"season": 21 / 44446, "usage": 1 / 44446, "year": 1 / 44446}
MISSING_IMAGE_RATE = 5 / 44446
GRAYSCALE_RATE = 50 / 6000  # measured on the real images-small sample
ODD_SIZE_RATE = 2 / 6000
DUPLICATE_GROUP_RATE = 652 / 44446
ODD_SIZES = ((60, 79), (60, 60), (60, 72), (55, 80))


@dataclasses.dataclass
class SynthResult(StageResult):
    out_dir: Path
    rows: int
    images: int
    malformed_lines: int
    missing_images: int
    duplicate_groups: int
    duplicate_files: int
    grayscale: int
    odd_size: int
    literal_na_lines: int
    size: str
    seed: int
    seconds: float


def _quirk_count(rows: int, rate: float) -> int:
    floor = 1 if rows >= MIN_ROWS_FOR_QUIRKS else 0
    return max(round(rows * rate), floor)


def _encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


@dataclasses.dataclass
class _Plan:
    malformed: dict[int, int]  # row -> commas in its name
    literal_na: dict[int, list[str]]  # row -> columns written as NA
    empty: dict[int, list[str]]  # row -> columns written empty
    missing_image: set[int]
    grayscale: set[int]
    odd_size: dict[int, tuple[int, int]]
    duplicate_of: dict[int, int]  # member row -> source row whose image (and visual labels) it shares
    duplicate_groups: int


def _plan_quirks(rows: int, rng: np.random.Generator) -> _Plan:
    """Place every quirk on its own rows (disjoint sets), in exact counts derived from the real rates."""
    order = iter(rng.permutation(rows).tolist())

    def take(n: int) -> list[int]:
        return [next(order) for _ in range(n)]

    def columns_on_rows(counts: dict[str, int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for col, n in counts.items():
            for r in take(n):
                out.setdefault(r, []).append(col)
        return out

    counts = {
        "malformed": _quirk_count(rows, MALFORMED_RATE),
        "missing_image": _quirk_count(rows, MISSING_IMAGE_RATE),
        "grayscale": _quirk_count(rows, GRAYSCALE_RATE),
        "odd_size": _quirk_count(rows, ODD_SIZE_RATE),
        "groups": _quirk_count(rows, DUPLICATE_GROUP_RATE),
    }
    na_counts = {col: _quirk_count(rows, r) for col, r in NA_RATES.items()}
    empty_counts = {col: _quirk_count(rows, r) for col, r in EMPTY_RATES.items()}
    group_sizes = [2 + int(rng.geometric(0.75)) - 1 for _ in range(counts["groups"])]
    needed = sum(counts.values()) - counts["groups"] + sum(na_counts.values()) + sum(empty_counts.values())
    if needed + sum(group_sizes) > rows:  # tiny datasets: drop the duplicates before anything else
        group_sizes = []

    malformed = {r: (2 if rng.random() < 0.1 else 1) for r in take(counts["malformed"])}
    literal_na = columns_on_rows(na_counts)
    empty = columns_on_rows(empty_counts)
    missing_image = set(take(counts["missing_image"]))
    grayscale = set(take(counts["grayscale"]))
    odd_size = {r: ODD_SIZES[int(rng.integers(len(ODD_SIZES)))] for r in take(counts["odd_size"])}
    duplicate_of = {}
    for size in group_sizes:
        source, *members = take(size)
        duplicate_of.update({m: source for m in members})
    return _Plan(malformed, literal_na, empty, missing_image, grayscale, odd_size, duplicate_of, len(group_sizes))


def _prepare_target(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} already exists and is not empty: remove it or choose another output folder")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():  # left by an interrupted run of ours
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    return tmp


def generate_dataset(out_dir: str | Path, *, rows: int, size: str = "small", seed: int = 0) -> SynthResult:
    """Write out_dir/styles.csv and out_dir/images/<id>.jpg; the folder appears only once complete."""
    started = time.perf_counter()
    if not isinstance(rows, int) or rows < 1:
        raise DataError(f"rows must be an integer >= 1, got {rows!r}")
    if size not in SIZES:
        raise DataError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    out_dir = Path(out_dir)
    scale = SIZES[size]
    rng = np.random.default_rng(seed)
    ids = sample_ids(rows, rng)
    labels = sample_labels(rows, rng)
    plan = _plan_quirks(rows, rng)
    visual = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")
    for member, source in plan.duplicate_of.items():
        labels[member].update({k: labels[source][k] for k in visual})

    tmp = _prepare_target(out_dir)
    name_rng = random.Random(seed)
    names = [display_name(name_rng, labels[i], plan.malformed.get(i, 0)) for i in range(rows)]
    for member, source in plan.duplicate_of.items():
        names[member] = names[source]
    sources = set(plan.duplicate_of.values())
    lines = [",".join(STYLE_COLUMNS)]
    encoded: dict[int, bytes] = {}
    images = 0
    for i in tqdm(range(rows), desc="synth", unit="img", disable=True if rows < 5000 else None):
        values = {"id": str(ids[i]), **labels[i], "productDisplayName": names[i]}
        for col in plan.literal_na.get(i, ()):
            values[col] = "NA"
        for col in plan.empty.get(i, ()):
            values[col] = ""
        lines.append(",".join(values[c] for c in STYLE_COLUMNS))

        if i in plan.missing_image:
            continue
        source = plan.duplicate_of.get(i, i)
        data = encoded.get(source)
        if data is None:
            image = render_image(labels[source], seed * 1_000_003 + source, scale)
            if source in plan.odd_size:
                w, h = plan.odd_size[source]
                image = image.resize((w * scale, h * scale), Image.Resampling.BILINEAR)
            if source in plan.grayscale:
                image = image.convert("L")
            data = _encode(image)
            if source in sources:
                encoded[source] = data
        (tmp / "images" / f"{ids[i]}.jpg").write_bytes(data)
        images += 1

    (tmp / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return SynthResult(
        out_dir=out_dir,
        rows=rows,
        images=images,
        malformed_lines=len(plan.malformed),
        missing_images=len(plan.missing_image),
        duplicate_groups=plan.duplicate_groups,
        duplicate_files=plan.duplicate_groups + len(plan.duplicate_of),
        grayscale=len(plan.grayscale),
        odd_size=len(plan.odd_size),
        literal_na_lines=len(plan.literal_na),
        size=size,
        seed=seed,
        seconds=round(time.perf_counter() - started, 3),
    )
