"""prepare: exact size, aspect kept on white, colour modes to RGB, content-addressed cache hits, atomic writes."""

from __future__ import annotations

import hashlib
import io as stdio
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fashion_tagger.core import io
from fashion_tagger.core.config import Config, load_config
from fashion_tagger.core.errors import DataError
from fashion_tagger.core.layout import cached_image_path
from fashion_tagger.data.imaging import fitted_size
from fashion_tagger.data.prepare import prepare_image, prepare_images

PREPARED_FILENAME, FAILURES_FILENAME = "prepared.json", "prepare_failures.json"  # as layout.SplitDir names them

W, H = 60, 80


def images(**settings: object) -> Config:
    """The default configuration with these `images.*` settings."""
    return load_config(None, {"images": settings})


def _save(image: Image.Image, path: Path, fmt: str = "JPEG") -> tuple[str, str]:
    buffer = stdio.BytesIO()
    image.save(buffer, fmt)
    path.write_bytes(buffer.getvalue())
    return str(path), hashlib.sha256(buffer.getvalue()).hexdigest()


def _product(size: tuple[int, int], colour=(200, 30, 30), mode="RGB") -> Image.Image:
    """A white photo with a coloured product filling the middle half, like the real catalogue shots."""
    image = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    image.paste(Image.new("RGB", (w // 2, h // 2), colour), (w // 4, h // 4))
    return image if mode == "RGB" else image.convert(mode)


def _split_dir(tmp_path: Path, rows: list[tuple[str, str]], name: str = "split") -> Path:
    split = tmp_path / name
    split.mkdir()
    frame = pd.DataFrame(rows, columns=["image_path", "image_sha256"])
    half = len(frame) // 2
    frame.iloc[:half].to_parquet(split / "train.parquet")
    frame.iloc[half:].to_parquet(split / "val.parquet")
    frame.iloc[len(frame):].to_parquet(split / "test.parquet")  # an empty test part
    return split


@pytest.fixture
def images_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def test_fitted_size_keeps_aspect():
    assert fitted_size((1800, 2400), 240, 320) == (240, 320)
    assert fitted_size((2400, 2400), 240, 320) == (240, 240)
    assert fitted_size((600, 200), 240, 320) == (240, 80)
    assert fitted_size((45, 80), 60, 80) == (45, 80)


def test_wide_image_is_centred_on_white_at_the_exact_size(images_dir, tmp_path):
    source, _ = _save(_product((400, 200), colour=(0, 0, 200)), images_dir / "wide.png", "PNG")
    dest = tmp_path / "out.jpg"
    prepare_image(source, dest, W, H)
    with Image.open(dest) as out:
        assert out.size == (W, H) and out.mode == "RGB" and out.format == "JPEG"
        for corner in [(0, 0), (W - 1, 0), (0, H - 1), (W - 1, H - 1)]:
            assert min(out.getpixel(corner)) >= 245, corner
        # 400x200 fits as 60x30, centred vertically: rows 25..54; the product is its middle half.
        r, g, b = out.getpixel((W // 2, H // 2))
        assert b > 150 and r < 60 and g < 60
        assert min(out.getpixel((W // 2, 20))) >= 245  # padding above the picture
        assert min(out.getpixel((W // 2, 60))) >= 245  # padding below


def test_full_size_jpeg_uses_draft_and_keeps_the_product(images_dir, tmp_path):
    source, _ = _save(_product((1800, 2400)), images_dir / "full.jpg")
    dest = tmp_path / "out.jpg"
    prepare_image(source, dest, 240, 320)
    with Image.open(dest) as out:
        assert out.size == (240, 320)
        r, g, b = out.getpixel((120, 160))
        assert r > 170 and g < 70 and b < 70
        assert min(out.getpixel((5, 5))) >= 245


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "1"])
def test_colour_modes_become_rgb(images_dir, tmp_path, mode):
    image = _product((90, 120), colour=(30, 160, 30), mode=mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    source, _ = _save(image, images_dir / f"img-{mode}.{fmt.lower()}", fmt)
    dest = tmp_path / f"{mode}.jpg"
    prepare_image(source, dest, W, H)
    with Image.open(dest) as out:
        assert out.mode == "RGB" and out.size == (W, H)
        assert min(out.getpixel((2, 2))) >= 240  # background stays white
        if mode in ("CMYK", "RGBA", "P"):
            r, g, b = out.getpixel((W // 2, H // 2))
            assert g > r + 60 and g > b + 60


def test_transparent_pixels_are_composited_on_white(images_dir, tmp_path):
    image = Image.new("RGBA", (60, 80), (0, 0, 0, 0))  # fully transparent black
    image.paste(Image.new("RGBA", (20, 20), (200, 0, 0, 255)), (20, 30))
    source, _ = _save(image, images_dir / "alpha.png", "PNG")
    prepare_image(source, tmp_path / "out.jpg", W, H)
    with Image.open(tmp_path / "out.jpg") as out:
        assert min(out.getpixel((3, 3))) >= 245
        assert out.getpixel((30, 40))[0] > 170


def test_prepare_images_writes_each_distinct_image_once_and_hits_the_cache(images_dir, tmp_path):
    rows = []
    for i in range(6):
        path, sha = _save(_product((60 + 10 * i, 80), colour=(20 * i, 100, 200)), images_dir / f"{i}.jpg")
        rows.append((path, sha))
    rows.append((str(images_dir / "copy-of-0.jpg"), rows[0][1]))  # byte-identical duplicate: same sha
    Path(rows[-1][0]).write_bytes(Path(rows[0][0]).read_bytes())
    split = _split_dir(tmp_path, rows)
    cache = tmp_path / "cache"

    first = prepare_images(split, cache, images(width=W, height=H, workers=2))
    assert (first.images, first.written, first.cached, first.failed) == (6, 6, 0, 0)
    for _, sha in rows:
        with Image.open(cached_image_path(cache, sha, W, H)) as out:
            assert out.size == (W, H) and out.mode == "RGB"
    written = sorted(p for p in (cache / "images").rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert len(written) == 6 and not [p for p in written if p.name.endswith(".tmp")]

    prepared = io.read_json(split / PREPARED_FILENAME)
    assert prepared["cache_root"] == str(cache.resolve())
    assert (prepared["width"], prepared["height"], prepared["images"]) == (W, H, 6)
    assert (prepared["written"], prepared["cached"], prepared["failed"]) == (6, 0, 0)
    assert prepared["seconds"] >= 0

    mtimes = {p: p.stat().st_mtime_ns for p in written}
    second = prepare_images(split, cache, images(width=W, height=H, workers=1))
    assert (second.images, second.written, second.cached) == (6, 0, 6)
    assert {p: p.stat().st_mtime_ns for p in written} == mtimes
    assert io.read_json(split / PREPARED_FILENAME)["cached"] == 6

    # Another size is another cache entry; the same content never is.
    other = prepare_images(split, cache, images(width=30, height=40, workers=1))
    assert (other.written, other.cached) == (6, 0)


def test_a_broken_image_is_reported_by_name_and_sha(images_dir, tmp_path):
    good, good_sha = _save(_product((60, 80)), images_dir / "good.jpg")
    bad = images_dir / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    split = _split_dir(tmp_path, [(good, good_sha), (str(bad), "ab" * 32)])
    io.write_json(split / PREPARED_FILENAME, {"stale": True})
    with pytest.raises(DataError, match=r"1 of 2 images could not be prepared.*bad\.jpg.*abab"):
        prepare_images(split, tmp_path / "cache", images(width=W, height=H, workers=1))
    failures = io.read_json(split / FAILURES_FILENAME)
    assert [f["image_path"] for f in failures] == [str(bad)] and "UnidentifiedImageError" in failures[0]["error"]
    assert not (split / PREPARED_FILENAME).exists()  # never claims a cache it does not have
    assert cached_image_path(tmp_path / "cache", good_sha, W, H).is_file()
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_split_without_hashes_or_columns_is_a_clear_error(tmp_path):
    split = _split_dir(tmp_path, [("a.jpg", None), ("b.jpg", None)])
    with pytest.raises(DataError, match="metadata-only"):
        prepare_images(split, tmp_path / "cache", load_config())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="train.parquet does not exist"):
        prepare_images(empty, tmp_path / "cache", load_config())
    pd.DataFrame({"image_path": ["a.jpg"]}).to_parquet(empty / "train.parquet")
    pd.DataFrame({"image_path": ["a.jpg"]}).to_parquet(empty / "val.parquet")
    pd.DataFrame({"image_path": ["a.jpg"]}).to_parquet(empty / "test.parquet")
    with pytest.raises(DataError, match="missing columns: image_sha256"):
        prepare_images(empty, tmp_path / "cache", load_config())


def test_real_full_size_images_keep_their_aspect(real_data, tmp_path):
    full = sorted((real_data / "images-full").glob("*.jpg"))[:4]
    if not full:
        pytest.skip("no images-full/ in the real data folder")
    for source in full:
        dest = tmp_path / f"{source.stem}.jpg"
        prepare_image(source, dest, 240, 320)
        with Image.open(source) as original, Image.open(dest) as out:
            assert out.size == (240, 320) and out.mode == "RGB"
            fw, fh = fitted_size(original.size, 240, 320)
            assert abs(fw / fh - original.width / original.height) < 0.02
