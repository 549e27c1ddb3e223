"""Images per second of `fashion-tagger tag` against calling the served pyfunc model one image at a time.

Same exported model, same image files, one run. `tag` is measured end to end (listing, hashing, DataLoader decoding,
batched forward, writing the table, rejects, review queue and summary, model loading included) into a fresh folder;
then once more into the same folder, where every image is already tagged by this version (hashing only). The
pyfunc way reads each file and calls `model.predict` on a one-row DataFrame, as a client of `mlflow models serve`
would, without the HTTP hop.

Run: .venv/bin/python benchmarks/tagging.py [--backbone efficientnet_b0] [--images 256] [--append docs/performance.md]
Reads ../shared/data/fashion-real/images-small when present (--real DIR elsewhere), else generated JPEGs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import export_model, load_pyfunc, publish  # noqa: E402

from fashion_tagger.core.config import load_config  # noqa: E402
from fashion_tagger.core.parallel import loader_workers  # noqa: E402
from fashion_tagger.tagging import jobs, outputs  # noqa: E402

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-real"
SECTION = "## catalog tagging (issue 14)"


def catalog_images(real: Path, count: int, work: Path) -> tuple[str, Path]:
    """A folder of COUNT images: real small ones when available, else generated ones."""
    folder = work / "catalog"
    folder.mkdir(parents=True)
    files = sorted((real / "images-small").glob("*.jpg"))[:count] if (real / "images-small").is_dir() else []
    label = "real 60x80"
    if not files:
        from fashion_tagger.data.synthetic.generator import generate_dataset

        generate_dataset(work / "generated", rows=count, size="small", seed=3)
        files, label = sorted((work / "generated" / "images").glob("*.jpg"))[:count], "generated 60x80"
    for path in files:
        shutil.copyfile(path, folder / path.name)
    return label, folder


def time_tag(folder: Path, export_dir: Path, out: Path, config) -> tuple[float, outputs.TaggingResult]:
    started = time.perf_counter()
    result = jobs.tag_catalog(folder, str(export_dir), out, config=config)
    return time.perf_counter() - started, result


def time_pyfunc(model, files: list[Path]) -> tuple[float, pd.DataFrame]:
    started = time.perf_counter()
    rows = [model.predict(pd.DataFrame({"image": [path.read_bytes()]})) for path in files]
    return time.perf_counter() - started, pd.concat(rows, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="DataLoader workers of `tag` (auto: min(8, CPUs))")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both ways run on it)")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--append", type=Path, help=f"write the table into this file's '{SECTION}' section")
    args = parser.parse_args()

    os.environ["FASHION_TAGGER_DEVICE"] = args.device  # read by the pyfunc model and by `tag` alike
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-tagging-") as tmp:
        work = Path(tmp)
        config = load_config(overrides={"home": str(work / "home"),
                                        "tagging": {"batch_size": args.batch, "workers": args.workers}})
        export_dir = export_model(args.backbone, args.width, args.height, work / "export")
        label, folder = catalog_images(args.real, args.images, work)
        files = sorted(folder.iterdir())
        model = load_pyfunc(export_dir, work / "pyfunc", args.device)
        model.predict(pd.DataFrame({"image": [files[0].read_bytes()]}))  # warm-up

        # The ways alternate within each round and each keeps its fastest round, so load from other processes
        # on a shared machine hits both alike.
        pyfunc_s = tag_s = float("inf")
        for round_ in range(args.rounds):
            seconds, served = time_pyfunc(model, files)
            pyfunc_s = min(pyfunc_s, seconds)
            seconds, result = time_tag(folder, export_dir, work / f"tags-{round_}", config)
            tag_s = min(tag_s, seconds)
        rerun_s, rerun = time_tag(folder, export_dir, work / f"tags-{args.rounds - 1}", config)
        assert result.tagged == len(files) and rerun.tagged == 0 and rerun.reused == len(files)
        table = pd.read_parquet(result.table).set_index("image_path").loc[[str(p) for p in files]]
        agree = float((table["masterCategory"].to_numpy() == served["masterCategory"].to_numpy()).mean())

    n = len(files)
    rows = [
        {"way": "pyfunc, one image per call", "seconds": round(pyfunc_s, 2), "img/s": round(n / pyfunc_s, 1),
         "vs pyfunc": 1.0},
        {"way": "tag, new catalog (end to end)", "seconds": round(tag_s, 2), "img/s": round(n / tag_s, 1),
         "vs pyfunc": round(pyfunc_s / tag_s, 2)},
        {"way": "tag, rerun (all already tagged)", "seconds": round(rerun_s, 2), "img/s": round(n / rerun_s, 1),
         "vs pyfunc": round(pyfunc_s / rerun_s, 2)},
    ]
    for row in rows:
        print(row, flush=True)
    publish(
        SECTION,
        f"`fashion-tagger tag` against the served pyfunc model called once per image, same export and files: "
        f"{args.backbone} (random weights, production head sizes), {args.width}x{args.height} input, {n} {label} "
        f"JPEGs, batch {args.batch}, device {args.device}, `tag` with {loader_workers(args.workers, n)} "
        f"DataLoader workers; best of {args.rounds} alternating rounds. `tag` times include loading the model and "
        f"writing every output; the served model was loaded before timing. masterCategory tags agree on "
        f"{agree:.0%} of the images.",
        "benchmarks/tagging.py",
        rows,
        args.append,
    )


if __name__ == "__main__":
    main()
