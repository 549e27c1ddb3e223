"""Images/s of one epoch of training data loading: the reference way against our prepared cache, in one run.

reference: open the full-size JPEG, decode it completely and resize it to 256x256 in every epoch.
ours:      read the 240x320 JPEG that `prepare` wrote once into the cache, random resized crop + flip.
Both come out of the same DataLoader settings (persistent workers, one untimed epoch first). The one-off cost of
filling the cache is printed too, with the number of epochs after which it has paid for itself.
Inputs: generated 1800x2400 JPEGs (fashion_tagger.data.synthetic.generator, size='full') and, when present, the real
full-size sample in ../shared/data/fashion-real/images-full.

    python benchmarks/loader.py --images 48 --workers 0
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_tagger.data.cache import cached_image_path  # noqa: E402
from fashion_tagger.data.prepare import prepare_image  # noqa: E402
from fashion_tagger.training.datamodule import load_rgb, train_transform  # noqa: E402

REAL_FULL = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-real" / "images-full"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as EfficientNet's pretrained config
REFERENCE_SIZE = 256


class ReferenceDataset(Dataset):
    """The notebook's way: full decode of the original JPEG and a resize to 256x256, every epoch."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB").resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.Resampling.BILINEAR)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(REFERENCE_SIZE, REFERENCE_SIZE, 3).permute(2, 0, 1)
        return (pixels.float() / 255 - self.mean) / self.std


class CachedDataset(Dataset):
    """Ours: the prepared cache image plus the training augmentation of fashion_tagger.training.datamodule.

    It hands uint8 tensors to the model, which normalises the batch on its device (see TaggerModule).
    """

    def __init__(self, paths: list[Path], width: int, height: int) -> None:
        self.paths = paths
        self.transform = train_transform(width, height)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[index]))


def epoch_rate(loader: DataLoader) -> float:
    """Images/s of one pass over the loader's dataset."""
    started = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch)
    return count / (time.perf_counter() - started)


def fill_cache(paths: list[Path], cache_root: Path, width: int, height: int) -> tuple[list[Path], float]:
    started = time.perf_counter()
    cached = []
    for path in paths:
        dest = cached_image_path(cache_root, hashlib.sha256(path.read_bytes()).hexdigest(), width, height)
        prepare_image(path, dest, width, height)
        cached.append(dest)
    return cached, time.perf_counter() - started


def compare(label: str, paths: list[Path], work: Path, args: argparse.Namespace) -> None:
    cached, prepare_seconds = fill_cache(paths, work / "cache", args.width, args.height)
    loaders = [
        # Persistent workers, as in training: worker start-up is paid once, not per epoch.
        DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
                   persistent_workers=args.workers > 0)
        for dataset in (ReferenceDataset(paths), CachedDataset(cached, args.width, args.height))
    ]
    for loader in loaders:
        epoch_rate(loader)  # untimed first epoch: starts the workers and warms the page cache for both
    ref_rates, our_rates = [], []
    for _ in range(args.rounds):  # interleaved, so a busy machine slows both alike
        ref_rates.append(epoch_rate(loaders[0]))
        our_rates.append(epoch_rate(loaders[1]))
    ref, our = statistics.median(ref_rates), statistics.median(our_rates)
    with Image.open(paths[0]) as first:
        size = f"{first.width}x{first.height}"
    prepare_rate = len(paths) / prepare_seconds
    # Epochs after which prepare-once + cached epochs cost less than decoding the originals every epoch.
    break_even = (len(paths) / prepare_rate) / max(len(paths) / ref - len(paths) / our, 1e-9)
    print(f"\n{label}: {len(paths)} JPEGs (first {size}), batch {args.batch_size}, workers {args.workers}, "
          f"median of {args.rounds} epochs")
    print(f"  reference (full decode + resize to 256x256): {ref:8.1f} images/s")
    print(f"  ours (prepared {args.width}x{args.height} cache + augmentation):  {our:8.1f} images/s")
    print(f"  ratio: {our / ref:.1f}x   (one-off prepare: {prepare_rate:.1f} images/s on one core, "
          f"paid back after {break_even:.1f} epochs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="generated full-size images (0: none)")
    parser.add_argument("--real", type=Path, default=REAL_FULL, help="folder of real full-size JPEGs, if present")
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        work = Path(tmp)
        if args.images:
            from fashion_tagger.data.synthetic.generator import generate_dataset

            started = time.perf_counter()
            generate_dataset(work / "synthetic", rows=args.images, size="full", seed=0)
            print(f"generated {args.images} full-size JPEGs in {time.perf_counter() - started:.1f}s")
            paths = sorted((work / "synthetic" / "images").glob("*.jpg"))
            compare("generated", paths, work / "generated", args)
        if args.real.is_dir():
            compare(f"real ({args.real})", sorted(args.real.glob("*.jpg")), work / "real", args)
        else:
            print(f"\n{args.real} not present: real full-size images skipped")


if __name__ == "__main__":
    main()
