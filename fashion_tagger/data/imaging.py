"""One way to read a product photo: bytes or a file decoded to RGB, fitted into the model's size on white as the
prepared cache is, and turned into the tensor the network takes. Prepare, training, scoring, `predict`, the served
model and catalog tagging all call these, so a photo is read the same way wherever it is tagged.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from PIL import Image

from fashion_tagger.core.errors import DataError, first_line

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BACKGROUND = (255, 255, 255)  # the product photos are shot on white, so padding on white adds no edge
READ_RETRIES = 2  # transient errors on network file systems; a truly broken file fails loudly after these
# What Pillow raises for a file it cannot decode (UnidentifiedImageError is an OSError; some plugins raise
# SyntaxError or ValueError for a damaged header).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

ImageSource = bytes | str | Path


class ImageReadError(DataError):
    """An image that cannot be read; the message names the input and says why."""


def _describe(source: ImageSource, name: str | None) -> str:
    return name or ("image bytes" if isinstance(source, bytes) else str(source))


def _read(source: ImageSource, name: str | None, retries: int, finish: Callable[[Image.Image], T]) -> T:
    """FINISH applied to SOURCE opened by Pillow; a file's OSError is retried RETRIES times (a missing file is not)."""
    if isinstance(source, bytes) and not source:
        raise ImageReadError(f"cannot read {_describe(source, name)} as an image: empty (0 bytes)")
    attempts = 1 if isinstance(source, bytes) else retries + 1
    for attempt in range(attempts):
        opened = io.BytesIO(source) if isinstance(source, bytes) else Path(source).expanduser()
        try:
            with Image.open(opened) as image:
                return finish(image)
        except DECODE_ERRORS as exc:
            if attempt + 1 < attempts and isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                time.sleep(0.05 * (attempt + 1))
                continue
            # Pillow names an in-memory file by its object's repr, which says nothing to a reader.
            reason = first_line(exc).replace(f" {opened!r}", "")
            raise ImageReadError(f"cannot read {_describe(source, name)} as an image: {reason}") from exc
    raise AssertionError("unreachable")


def decode_image(source: ImageSource, *, name: str | None = None, retries: int = READ_RETRIES) -> Image.Image:
    """SOURCE (encoded bytes, or a file) fully decoded to RGB; NAME says what it is in the error message."""
    return _read(source, name, retries, lambda image: to_rgb(_loaded(image)))


def read_fitted(source: ImageSource, width: int, height: int, *, name: str | None = None,
                retries: int = READ_RETRIES) -> Image.Image:
    """SOURCE fitted into width x height as `prepare` writes its cache (JPEGs decoded at a reduced DCT scale)."""
    return _read(source, name, retries, lambda image: resize_image(image, width, height))


def _loaded(image: Image.Image) -> Image.Image:
    image.load()
    return image


def fitted_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The largest size with the image's aspect that fits inside width x height."""
    src_w, src_h = size
    scale = min(width / src_w, height / src_h)
    return min(width, max(1, round(src_w * scale))), min(height, max(1, round(src_h * scale)))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (a plain convert would turn transparent pixels black)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale would clip to white under a plain convert; scale it to 8 bits first.
        return image.point(lambda v: v / 256).convert("L").convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside width x height keeping the aspect, centred on a white canvas of exactly width x height."""
    target = fitted_size(image.size, width, height)
    # draft() picks the smallest DCT scale (1/2, 1/4, 1/8) whose output is still >= target: quality holds.
    # An image that is already decoded keeps its pixels (draft does nothing then).
    image.draft("RGB", target)
    image.load()  # decode now: the result may be this very image, used after its file is closed
    image = to_rgb(image)
    if image.size != target:
        # After the DCT scaling the remaining reduction is under 2x, where an antialiased bilinear filter is as
        # sharp as Lanczos at half its cost; enlarging a small image needs bicubic to stay crisp.
        shrinking = image.width >= target[0]
        method = Image.Resampling.BILINEAR if shrinking else Image.Resampling.BICUBIC
        image = image.resize(target, method, reducing_gap=2.0 if shrinking else None)
    if target == (width, height):
        return image
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(image, ((width - target[0]) // 2, (height - target[1]) // 2))
    return canvas


# --- pixels for the network -----------------------------------------------------------------------------------------


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """3 x H x W uint8. Training batches stay uint8 until the device (4x less to copy) and are normalised there."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def pixel_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0-255 scale, shaped 1 x 3 x 1 x 1 to broadcast over a uint8 batch."""
    import torch

    return (
        torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255,
        torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255,
    )


def normalize(images: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float normalised with the backbone's statistics (from `pixel_stats`)."""
    return (images.float() - pixel_mean) / pixel_std


class ImageTransform:
    """The one serving preprocessing: PIL image -> fit into width x height on white -> float tensor
    (3 x height x width) normalised exactly as training normalises its uint8 batches on the device."""

    def __init__(self, width: int, height: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.width, self.height = int(width), int(height)
        self.pixel_mean, self.pixel_std = pixel_stats(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = to_uint8_tensor(resize_image(image, self.width, self.height))
        return normalize(pixels[None], self.pixel_mean, self.pixel_std)[0]
