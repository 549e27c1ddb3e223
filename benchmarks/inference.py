"""Images per second of the served pyfunc model against the bare network forward on the same batch.

The difference is what serving adds around the network: reading the DataFrame, decoding JPEG bytes, fitting and
padding to the input size, normalising, and turning probabilities into class names.

Run: .venv/bin/python benchmarks/inference.py [--backbone efficientnet_b3] [--batch 32] [--devices auto]
     [--append docs/performance.md]
Reads ../shared/data/fashion-real/images-{small,full} when present (--real DIR elsewhere), else generated JPEGs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_tagger.core.config import load_config  # noqa: E402
from fashion_tagger.data.labels import LabelSpace  # noqa: E402
from fashion_tagger.model.network import (
    NETWORK_FIELDS,  # noqa: E402
    FashionTagger,  # noqa: E402
)
from fashion_tagger.serving.predictor import DEVICE_ENV, Predictor  # noqa: E402
from fashion_tagger.serving.pyfunc_model import images_from_frame  # noqa: E402

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-real"
SECTION = "## inference (issue 4)"
# Classes per attribute of the full dataset with min_class_count 500 (shared/README.md): realistic head sizes.
NUM_CLASSES = {"gender": 5, "masterCategory": 4, "subCategory": 15, "articleType": 23, "baseColour": 16,
               "season": 4, "usage": 4}


def export_model(backbone: str, width: int, height: int, out: Path) -> Path:
    """A randomly initialised tagger with the production head sizes, exported the way `register` does."""
    labels = LabelSpace(classes={a: tuple(f"c{i}" for i in range(n)) for a, n in NUM_CLASSES.items()},
                        min_class_count=500)
    model = FashionTagger(backbone, labels.num_classes)
    config = {"backbone": backbone, "hidden_dim": 0, "dropout": 0.0, "drop_path_rate": 0.0}
    predictor = Predictor(model, labels, (width, height), mean=model.data_config["mean"], std=model.data_config["std"],
                          model_config={k: config[k] for k in NETWORK_FIELDS}, device="cpu")
    return predictor.export(out)


def load_pyfunc(export_dir: Path, work: Path, device: str):
    """Log the export as our pyfunc model into a throwaway store and load it back, as serving would."""
    import mlflow

    from fashion_tagger.core import tracking
    from fashion_tagger.serving.pyfunc_model import log_tagger_model

    config = load_config(overrides={"home": str(work / "home")})
    os.environ[DEVICE_ENV] = device
    with tracking.tracking_session(config) as client:
        with mlflow.start_run(experiment_id=tracking.ensure_experiment(client, config)):
            info = log_tagger_model(export_dir, name="model")
        return mlflow.pyfunc.load_model(info.model_uri)


def best_rates(funcs: dict[str, Callable[[], object]], images: int, rounds: int, sync: bool) -> dict[str, float]:
    """Images/s of each way's fastest call. The ways run back to back within each round, so load from other
    processes on a shared machine hits them alike, and the per-way minimum drops the rounds it hit."""
    for func in funcs.values():
        func()  # warm-up: lazy initialisation, allocator, cuDNN autotuning
    best = dict.fromkeys(funcs, float("inf"))
    for _ in range(rounds):
        for name, func in funcs.items():
            if sync:
                torch.cuda.synchronize()
            started = time.perf_counter()
            func()
            if sync:
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: images / seconds for name, seconds in best.items()}


def measure(label: str, files: list[Path], model, device: str, rounds: int) -> dict:
    predictor = model.unwrap_python_model().predictor
    frame = pd.DataFrame({"image": [path.read_bytes() for path in files]})
    batch = predictor.preprocess(images_from_frame(frame)).to(predictor.device)
    sync = predictor.device.type == "cuda"

    @torch.inference_mode()
    def forward() -> object:
        return predictor.model(batch)

    def prepare_only() -> object:
        return predictor.preprocess(images_from_frame(frame))

    n = len(files)
    rates = best_rates({"pyfunc": lambda: model.predict(frame), "forward": forward, "prepare": prepare_only}, n,
                       rounds, sync)
    pyfunc_rate, forward_rate, prepare_rate = rates["pyfunc"], rates["forward"], rates["prepare"]
    sizes = sorted({f"{w}x{h}" for w, h in (Image.open(p).size for p in files)})
    return {
        "device": device,
        "images": label,
        "batch": n,
        "source sizes": ", ".join(sizes[:2]) + (" ..." if len(sizes) > 2 else ""),
        "forward img/s": round(forward_rate, 1),
        "pyfunc img/s": round(pyfunc_rate, 1),
        "decode+preprocess img/s": round(prepare_rate, 1),
        "forward / pyfunc": round(forward_rate / pyfunc_rate, 2),
        "overhead share": f"{1 - pyfunc_rate / forward_rate:.0%}",
    }


def image_sets(real: Path, batch: int, work: Path) -> list[tuple[str, list[Path]]]:
    sets = []
    for name in ("images-small", "images-full"):
        files = sorted((real / name).glob("*.jpg"))[:batch] if (real / name).is_dir() else []
        if files:
            sets.append((f"real {name.removeprefix('images-')}", files))
    if not sets:
        from fashion_tagger.data.synthetic.generator import generate_dataset

        for size in ("small", "full"):
            generate_dataset(work / size, rows=batch, size=size, seed=3)
            sets.append((f"generated {size}", sorted((work / size / "images").glob("*.jpg"))[:batch]))
    return sets


def to_markdown(frame: pd.DataFrame) -> str:
    try:
        return frame.to_markdown(index=False)
    except ImportError:  # tabulate is optional
        return frame.to_string(index=False)


def write_section(path: Path, section: str, text: str) -> None:
    """Replace SECTION of PATH (or append it), leaving the other sections as they are."""
    current = path.read_text() if path.is_file() else ""
    start = current.find(section)
    if start < 0:
        updated = current.rstrip() + ("\n\n" if current.strip() else "") + text
    else:
        end = current.find("\n## ", start + len(section))
        updated = current[:start] + text + (current[end:] if end >= 0 else "")
    path.write_text(updated.rstrip() + "\n")


def publish(section: str, description: str, script: str, rows: list[dict], append: Path | None) -> str:
    """The benchmark's markdown section: what was measured, how to reproduce it, where, and the table; printed,
    and written into APPEND's SECTION when given."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    command = " ".join([script, *sys.argv[1:]])
    text = "\n".join([
        section,
        "",
        description,
        "",
        f"Reproduce: `.venv/bin/python {command}`",
        "",
        f"Measured in one run on {platform.node() or 'this machine'}: {os.cpu_count()} CPUs "
        f"(torch threads {torch.get_num_threads()}), GPU {gpu}.",
        "",
        to_markdown(pd.DataFrame(rows)),
        "",
    ])
    print("\n" + text)
    if append:
        write_section(append, section, text)
        print(f"wrote {section!r} into {append}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_b3")
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", default="auto", help="auto (cpu, and cuda when present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 gives steadier numbers on a busy machine")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--append", type=Path, help=f"write the table into this file's '{SECTION}' section")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.devices == "auto" else [args.devices]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        export_dir = export_model(args.backbone, args.width, args.height, work / "export")
        sets = image_sets(args.real, args.batch, work)
        for device in devices:
            model = load_pyfunc(export_dir, work / device, device)
            for label, files in sets:
                rows.append(measure(label, files, model, device, args.rounds))
                print(rows[-1], flush=True)

    publish(
        SECTION,
        "Served pyfunc model (`fashion_tagger.serving.pyfunc_model`, JPEG bytes in a DataFrame -> tags) against the "
        f"bare network forward on the same, already preprocessed batch: {args.backbone}, "
        f"{args.width}x{args.height} input, batch {args.batch}, fp32, best of {args.rounds}. The gap is decoding, "
        "fitting/padding, normalising and "
        "decoding labels.",
        "benchmarks/inference.py",
        rows,
        args.append,
    )

if __name__ == "__main__":
    main()
