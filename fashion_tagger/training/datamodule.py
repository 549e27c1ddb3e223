"""Training data: the split tables joined with the prepared image cache, as a Dataset and a LightningDataModule.

Images are read from the content-addressed cache that `prepare` filled (split_dir/prepared.json says where
and at which size), so an epoch decodes small JPEGs instead of full-size photos.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, RandomResizedCrop

from fashion_tagger.core.errors import DataError
from fashion_tagger.core.layout import SplitDir
from fashion_tagger.core.parallel import WorkerCount, loader_workers
from fashion_tagger.data.cache import cached_image_path, read_prepared
from fashion_tagger.data.imaging import ImageReadError, decode_image, to_uint8_tensor
from fashion_tagger.data.labels import LabelSpace, label_column

CROP_SCALE = (0.8, 1.0)  # mild: a product must stay whole enough to keep its silhouette and colour


def read_split(split_dir: str | Path, part: str, attributes: Sequence[str]) -> pd.DataFrame:
    """One part (`train`, `val`) of a split with its image hashes and the encoded columns of ATTRIBUTES."""
    path = SplitDir(Path(split_dir)).part(part)
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the split stage first (`fashion-tagger split RUN`)")
    frame = pd.read_parquet(path)
    needed = ["image_sha256", *(label_column(a) for a in attributes)]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{path} is missing columns: {', '.join(missing)}; rebuild it with `fashion-tagger split`")
    return frame


def load_rgb(path: str | Path) -> Image.Image:
    """A prepared image as RGB (`data.imaging.decode_image`: a file's OSError is retried a bounded number of times),
    else an error that says how to repair the cache."""
    try:
        return decode_image(path, name=f"prepared image {path}")
    except ImageReadError as exc:
        raise DataError(f"{exc}; delete it and rerun `fashion-tagger prepare`") from exc


class TrainAugment:
    """Mild random resized crop at the portrait aspect, then a horizontal flip; no colour jitter: colour is a label.

    Crop and resize are one Pillow resample (`resize(box=...)`), which is cheaper than cropping first.
    """

    def __init__(self, width: int, height: int, scale: tuple[float, float] = CROP_SCALE) -> None:
        self.width, self.height = width, height
        self.scale = scale
        aspect = width / height
        self.ratio = (aspect * 0.9, aspect / 0.9)

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, h, w = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        image = image.resize((self.width, self.height), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if torch.rand(1).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def train_transform(width: int, height: int) -> Callable[[Image.Image], torch.Tensor]:
    # Compose of picklable parts, so loader workers also start under spawn/forkserver.
    return Compose([TrainAugment(width, height), to_uint8_tensor])


def eval_transform() -> Callable[[Image.Image], torch.Tensor]:
    """Cached images already have the training size (`data.imaging.resize_image` fitted them): nothing but the
    tensor conversion serving uses too; the normalisation runs on the device (`data.imaging.normalize`)."""
    return to_uint8_tensor


class TaggerDataset(Dataset):
    """(image tensor, labels int64[attributes]) per row; -1 (IGNORE_INDEX) where the label is 'None'."""

    def __init__(
        self,
        frame: pd.DataFrame,
        attributes: Sequence[str],
        cache_root: str | Path,
        width: int,
        height: int,
        transform: Callable,
    ) -> None:
        self.paths = [str(cached_image_path(cache_root, sha, width, height)) for sha in frame["image_sha256"]]
        self.labels = torch.from_numpy(
            np.stack([frame[label_column(a)].to_numpy(dtype=np.int64) for a in attributes], axis=1)
        )
        self.attributes = list(attributes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(load_rgb(self.paths[index])), self.labels[index]


class TaggerDataModule(L.LightningDataModule):
    """Train/val loaders of uint8 image batches and int64 labels over a prepared split directory."""

    def __init__(
        self,
        split_dir: str | Path,
        *,
        batch_size: int,
        num_workers: WorkerCount = "auto",
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.split_dir = Path(split_dir)
        self.prepared = read_prepared(self.split_dir)
        self.label_space = LabelSpace.load(self.split_dir)
        self.batch_size = batch_size
        self.num_workers = loader_workers(num_workers)
        self.pin_memory = pin_memory
        self.train_set: TaggerDataset | None = None
        self.val_set: TaggerDataset | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the cached images, which is the model's input size."""
        return int(self.prepared["width"]), int(self.prepared["height"])

    def _dataset(self, filename: str, transform: Callable) -> TaggerDataset:
        attributes = self.label_space.attributes
        frame = read_split(self.split_dir, filename, attributes)
        width, height = self.image_size
        return TaggerDataset(frame, attributes, self.prepared["cache_root"], width, height, transform)

    def setup(self, stage: str | None = None) -> None:
        width, height = self.image_size
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train", train_transform(width, height))
        if self.val_set is None:
            self.val_set = self._dataset("val", eval_transform())

    def _loader(self, dataset: TaggerDataset, *, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            # BatchNorm cannot train on a final batch of one image; dropping a partial batch costs nothing.
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set, train=False)
