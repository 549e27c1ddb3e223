"""What one request to the served model may hold, so that no client can make the server decode its way out of
memory: rows, image bytes and pixels per image. Read from the environment when the model loads; they apply to
requests `mlflow models serve` answers (this process's own callers, evaluation, the gate and tagging, batch
their work themselves). Each limit broken is an HTTP 400 that names it and what to do.

MLflow's scoring server reads a request's whole body before the model sees it: cap the body in front of it too
(for example nginx's `client_max_body_size`), see docs/stages.md.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from fashion_tagger.core.errors import FashionTaggerError

MAX_ROWS_ENV = "FASHION_TAGGER_SERVING_MAX_ROWS"
MAX_REQUEST_MB_ENV = "FASHION_TAGGER_SERVING_MAX_REQUEST_MB"
MAX_MEGAPIXELS_ENV = "FASHION_TAGGER_SERVING_MAX_MEGAPIXELS"
DEFAULT_MAX_ROWS = 256
DEFAULT_MAX_REQUEST_MB = 32.0  # of image bytes, decoded from base64: a JSON body about 4/3 of it
DEFAULT_MAX_MEGAPIXELS = 40.0  # the catalog's photos are 1800 x 2400 = 4.3 MP; 40 MP decode to 120 MB of RGB
# Images are decoded and tagged this many at a time, so a request's memory is bounded by a chunk, not its rows.
DECODE_CHUNK = 16


class RequestTooLarge(FashionTaggerError):
    """A request over one of the limits; the pyfunc model answers it with HTTP 400."""


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise FashionTaggerError(f"${name}={value!r}: give a positive number (default {default:g})")
    return number


@dataclass(frozen=True)
class ServingLimits:
    max_rows: int = DEFAULT_MAX_ROWS
    max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2**20)
    max_pixels: int = int(DEFAULT_MAX_MEGAPIXELS * 1e6)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingLimits:
        env = os.environ if env is None else env
        return cls(max_rows=int(_positive(env, MAX_ROWS_ENV, DEFAULT_MAX_ROWS)),
                   max_request_bytes=int(_positive(env, MAX_REQUEST_MB_ENV, DEFAULT_MAX_REQUEST_MB) * 2**20),
                   max_pixels=int(_positive(env, MAX_MEGAPIXELS_ENV, DEFAULT_MAX_MEGAPIXELS) * 1e6))

    def check_rows(self, rows: int) -> None:
        if rows > self.max_rows:
            raise RequestTooLarge(f"the request has {rows:,} rows; this server tags at most {self.max_rows:,} per "
                                  f"request (${MAX_ROWS_ENV}): send them in several requests")

    def check_bytes(self, values: Any) -> None:
        """VALUES: the `image` column (bytes, or base64 text counted as the bytes it decodes to)."""
        total = sum(_encoded_size(value) for value in values)
        if total > self.max_request_bytes:
            raise RequestTooLarge(f"the request holds {total / 2**20:,.1f} MB of images; this server takes at most "
                                  f"{self.max_request_bytes / 2**20:,.1f} MB per request (${MAX_REQUEST_MB_ENV}): "
                                  "send fewer images per request, or smaller ones")

    def check_pixels(self, source: bytes | str | Path, where: str) -> None:
        """SOURCE's size read from its header (nothing is decoded); over max_pixels is RequestTooLarge."""
        opened = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            with Image.open(opened) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:  # Pillow's own refusal, past twice its MAX_IMAGE_PIXELS
            raise RequestTooLarge(f"{where}: the image is too large to decode ({exc})") from None
        except (OSError, ValueError, SyntaxError):
            return  # not an image: decoding reports it as this row's error
        if width * height > self.max_pixels:
            raise RequestTooLarge(f"{where}: the image is {width:,} x {height:,} = {width * height / 1e6:,.0f} "
                                  f"megapixels; this server decodes at most {self.max_pixels / 1e6:,.0f} "
                                  f"(${MAX_MEGAPIXELS_ENV}): send it scaled down")


def _encoded_size(value: Any) -> int:
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    if isinstance(value, str):
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        return len(payload) * 3 // 4
    return 0

