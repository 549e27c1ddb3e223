"""The production recipe on a GPU through the project's own training: images/s, peak memory, GPU utilisation, loader.

Trains `efficientnet_b3` with `train.train_model` (Lightning, the DataModule with its workers, bf16 autocast,
channels_last, with and without torch.compile) on real product images prepared at 240x320 (the 60x80 images of
images-small upsampled: the speed is the same as for full-size sources once prepared), for a few epochs per
setting, and reports per setting:

- training images/s: the median over the epochs after the first (the first pays for cuDNN autotuning and
  compilation), as EpochHistory measures it (the training part of each epoch, loader included);
- peak GPU memory (torch.cuda.max_memory_allocated) and GPU utilisation sampled by `nvidia-smi` every 250 ms
  during those epochs (mean and 10th percentile);
- the loader alone, with the same workers: images/s of an epoch of the train loader without the model, so
  "loader keeps up" means it delivers at least 1.1x what training consumes.

    python benchmarks/gpu_train.py --data ../shared/data/fashion-real            # on the GPU (benchmarks/gpu.sh)
    python benchmarks/gpu_train.py --dry-run                                       # the same code paths on a CPU

Without network: pretrained=false (weights do not change the speed); no hub is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import real_raw_dir  # noqa: E402  (benchmarks/ is the script's folder)

from fashion_tagger.core.config import load_config  # noqa: E402
from fashion_tagger.data.prepare import prepare_images  # noqa: E402
from fashion_tagger.data.sources import fetch_dataset  # noqa: E402
from fashion_tagger.data.split import split_dataset  # noqa: E402
from fashion_tagger.data.validate import validate_dataset  # noqa: E402

KEEPS_UP = 1.1  # the loader must deliver this multiple of the training rate


class GpuSampler:
    """`nvidia-smi` utilisation and memory every 250 ms in the background, as (time, util %, MiB) samples."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "250", "-i", os.environ.get("GPU_INDEX", "0")],
                stdout=subprocess.PIPE, text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def __exit__(self, *exc: Any) -> None:
        if self._proc:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def utilisation(self, windows: list[tuple[float, float]]) -> dict[str, float | None]:
        values = sorted(u for t, u, _ in self.samples if any(a <= t <= b for a, b in windows))
        if not values:
            return {"gpu_util_mean": None, "gpu_util_p10": None}
        return {"gpu_util_mean": round(statistics.fmean(values), 1),
                "gpu_util_p10": values[max(0, int(len(values) * 0.1) - 1)]}


def epoch_windows_callback():
    """A Lightning callback that records each training epoch's wall-clock window and the peak GPU memory."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class EpochWindows(Callback):
        def __init__(self) -> None:
            self.windows: list[tuple[float, float]] = []
            self.peak_bytes = 0
            self._start = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.time()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.windows.append((self._start, time.time()))
            if torch.cuda.is_available():
                self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())

    return EpochWindows()


def loader_rate(split_dir: Path, batch_size: int, workers: int, batches: int) -> float:
    """Images/s of the train loader alone (augmentation, decode, collate, pinned memory), after one warm-up batch."""
    import torch

    from fashion_tagger.training.datamodule import TaggerDataModule

    datamodule = TaggerDataModule(split_dir, batch_size=batch_size, num_workers=workers,
                                  pin_memory=torch.cuda.is_available())
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    next(iterator)
    images, started = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(datamodule.train_dataloader())
            batch = next(iterator)
        images += len(batch[0])
    return images / (time.perf_counter() - started)


def parse_settings(text: str) -> list[tuple[bool, int]]:
    """`eager:64,compile:128` -> [(False, 64), (True, 128)]."""
    settings = []
    for item in text.split(","):
        mode, _, batch = item.partition(":")
        if mode not in ("eager", "compile") or not batch.isdigit():
            sys.exit(f"--settings item {item!r} must look like eager:128 or compile:256")
        settings.append((mode == "compile", int(batch)))
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=os.environ.get("FASHION_TAGGER_REAL_DATA"),
                        help="folder with styles.csv and images-small/ (default $FASHION_TAGGER_REAL_DATA); "
                        "without it a generated dataset of --rows rows")
    parser.add_argument("--rows", type=int, default=6000, help="rows of the generated dataset without --data")
    parser.add_argument("--backbone", default="efficientnet_b3")
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--settings", default="eager:64,eager:128,eager:256,compile:128,compile:256")
    parser.add_argument("--epochs", type=int, default=4, help="per setting; the first is not counted")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--workers", type=int, default=16, help="DataLoader workers")
    parser.add_argument("--home", type=Path, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--dry-run", action="store_true",
                        help="every code path on a CPU in a few minutes: test_efficientnet, 300 rows, 64x80, "
                        "2 batches per epoch")
    args = parser.parse_args()

    import torch

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    limit_batches: int | None = None
    min_class_count = 60
    if args.dry_run:
        min_class_count = 20
        # timm's test_efficientnet: the same code paths (compile included) without minutes of CPU compilation.
        accelerator, args.rows, args.width, args.height, args.epochs = "cpu", 300, 64, 80, 2
        args.backbone = "test_efficientnet"
        args.workers, args.data, limit_batches = min(args.workers, 2), None, 2
        args.settings = "eager:8,compile:8"
    elif accelerator != "gpu":
        sys.exit("torch sees no CUDA device: run this on a GPU machine, or --dry-run to check it on a CPU")
    settings = parse_settings(args.settings)

    home = args.home or Path(tempfile.mkdtemp(prefix="fashion-tagger-gpu-"))
    os.environ["FASHION_TAGGER_HOME"] = str(home)
    base = [f"home={home}", f"images.width={args.width}", f"images.height={args.height}",
            f"labels.min_class_count={min_class_count}", "data.min_rows=100"]
    config = load_config("default", base)
    try:
        if args.data:
            raw = real_raw_dir(Path(args.data), home / "raw" / "real-small")
            origin = f"real images-small of {args.data}, upsampled"
        else:
            raw = fetch_dataset(f"synthetic:{args.rows}", config.raw_root, synthetic_size=config.data.synthetic_size,
                                synthetic_seed=config.data.synthetic_seed).raw_dir
            origin = f"{args.rows} generated images"
        validate_dataset(raw, home / "clean", config)
        split_dataset(home / "clean", home / "split", config)
        prepared = prepare_images(home / "split", config.cache_root, config)
        print(f"prepared {prepared.images} images at {args.width}x{args.height} in {prepared.seconds:.0f} s "
              f"({origin})", flush=True)
        if torch.cuda.is_available():
            print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
        results = []
        for compiled, batch in settings:
            results.append(run_setting(args, home, compiled, batch, accelerator, limit_batches))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    print()
    print("| backbone | input | precision | compile | batch | train img/s | peak GPU GiB | GPU util mean / p10 % "
          "| loader img/s (workers) | loader keeps up |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- |")
    for r in results:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        util = f"{r['gpu_util_mean']} / {r['gpu_util_p10']}" if r["gpu_util_mean"] is not None else "-"
        print(f"| {r['backbone']} | {r['input']} | {r['precision']} | {r['compile']} | {r['batch']} | "
              f"{r['train_images_per_s']:.0f} | {peak} | {util} | {r['loader_images_per_s']:.0f} ({r['workers']}) "
              f"| {'yes' if r['loader_keeps_up'] else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run_setting(args: argparse.Namespace, home: Path, compiled: bool, batch: int, accelerator: str,
                limit_batches: int | None) -> dict[str, Any]:
    from fashion_tagger.training.train import train_model

    name = f"{'compile' if compiled else 'eager'}-{batch}"
    config = load_config("default", [
        f"home={home}", f"images.width={args.width}", f"images.height={args.height}",
        f"model.backbone={args.backbone}", "model.pretrained=false",
        f"train.epochs={args.epochs}", f"train.batch_size={batch}", f"train.precision={args.precision}",
        "train.channels_last=true", f"train.compile={str(compiled).lower()}", f"train.num_workers={args.workers}",
        f"train.accelerator={accelerator}", "train.devices=1", "train.progress_bar=false",
        "train.early_stopping_patience=100", "train.limit_val_batches=2",
        *([f"train.limit_train_batches={limit_batches}"] if limit_batches else []),
    ])
    windows = epoch_windows_callback()
    with GpuSampler() as sampler:
        result = train_model(config, split_dir=home / "split", run_dir=home / "runs" / name, callbacks=[windows])
    history = json.loads(Path(result.metrics_path).read_text())["history"]
    rates = [h["train_images_per_s"] for h in history[1:]] or [h["train_images_per_s"] for h in history]
    train_rate = statistics.median(rates)
    loader = loader_rate(home / "split", batch, args.workers, batches=limit_batches or 20)
    return {
        "backbone": args.backbone,
        "input": f"{args.width}x{args.height}",
        "precision": args.precision,
        "compile": compiled,
        "batch": batch,
        "epochs": len(history),
        "train_images_per_s": round(train_rate, 1),
        "peak_gib": round(windows.peak_bytes / 2**30, 2) if windows.peak_bytes else None,
        **sampler.utilisation(windows.windows[1:] or windows.windows),
        "workers": args.workers,
        "loader_images_per_s": round(loader, 1),
        "loader_keeps_up": loader >= KEEPS_UP * train_rate,
    }


if __name__ == "__main__":
    main()
