"""A corpus of every bad input tried so far, and the good inputs that look like them, written on demand.

`write_corpus(root)` writes one raw dataset (styles.csv + images/) holding one data line per `Case`, in order,
so line `i + 2` of styles.csv is `CASES[i]`; each case says whether its line must end up clean or rejected and
with which reason. `FILE_CASES` are whole styles.csv files that cannot be read at all. Images are generated
into the temporary folder: nothing here is ever committed as a file.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fashion_tagger.core.schema import STYLE_COLUMNS

HEADER = ",".join(STYLE_COLUMNS).encode()
CLEAN = "clean"


def picture(size: tuple[int, int] = (60, 80), mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A distinct small product-like picture (colour from the seed), so that no two cases share bytes."""
    image = Image.new("RGB", size, "white")
    image.paste(((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256),
                (size[0] // 5, size[1] // 6, size[0] - size[0] // 5, size[1] - size[1] // 6))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def truncated_jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def decompression_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG whose header claims 400 M pixels: Pillow refuses it before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def line(style_id: str, *, gender: str = "Men", colour: str = "Blue", year: str = "2012", usage: str = "Casual",
         name: str = "Roadster Men Blue Tshirt") -> str:
    return f"{style_id},{gender},Apparel,Topwear,Tshirts,{colour},Summer,{year},{usage},{name}"


@dataclass(frozen=True)
class Case:
    """One data line of styles.csv and the image beside it; `expected` is CLEAN or a reject reason."""

    name: str
    text: str | bytes  # the line without its ending; bytes for a line that is not UTF-8
    expected: str
    image: bytes | None = None  # images/<id>.jpg; None: no such file
    style_id: int | None = None  # the id of a clean row, to find it in clean.parquet
    ending: bytes = b"\n"
    clean_values: dict[str, object] = field(default_factory=dict)  # what the clean row must hold
    setup: Callable[[Path, Path], None] | None = None  # (images dir, outside dir): symlinks and folders

    def raw(self) -> bytes:
        return self.text if isinstance(self.text, bytes) else self.text.encode("utf-8")


def _symlink_outside(style_id: int, content: bytes) -> Callable[[Path, Path], None]:
    def setup(images: Path, outside: Path) -> None:
        target = outside / f"target-{style_id}"
        target.write_bytes(content)
        (images / f"{style_id}.jpg").symlink_to(target)

    return setup


def _broken_symlink(style_id: int) -> Callable[[Path, Path], None]:
    def setup(images: Path, outside: Path) -> None:
        (images / f"{style_id}.jpg").symlink_to(outside / "does-not-exist.jpg")

    return setup


def _folder_named_like_an_image(style_id: int) -> Callable[[Path, Path], None]:
    def setup(images: Path, outside: Path) -> None:
        (images / f"{style_id}.jpg").mkdir()

    return setup


def _only_png(style_id: int) -> Callable[[Path, Path], None]:
    def setup(images: Path, outside: Path) -> None:
        (images / f"{style_id}.png").write_bytes(picture(fmt="PNG", seed=style_id))

    return setup


def _cases() -> list[Case]:
    def ok(name: str, style_id: int, **kwargs) -> Case:
        text = kwargs.pop("text", None) or line(str(style_id), **kwargs.pop("fields", {}))
        image = kwargs.pop("image", None) or picture(seed=style_id)
        return Case(name, text, CLEAN, image, style_id, **kwargs)

    return [
        # --- accepted, some of them after a repair that the report counts ------------------------------------
        ok("rgb_jpeg", 1),
        ok("grayscale_jpeg", 2, image=picture(mode="L", seed=2), clean_values={"mode": "L"}),
        ok("cmyk_jpeg", 3, image=picture(mode="CMYK", seed=3), clean_values={"mode": "CMYK", "format": "JPEG"}),
        ok("png_named_jpg", 4, image=picture(mode="RGBA", fmt="PNG", seed=4), clean_values={"format": "PNG"}),
        ok("crlf_line_ending", 5, ending=b"\r\n", clean_values={"productDisplayName": "Roadster Men Blue Tshirt"}),
        ok("cr_only_line_ending", 6, ending=b"\r", clean_values={"productDisplayName": "Roadster Men Blue Tshirt"}),
        ok("symlink_to_an_image_outside", 7, image=b"-", setup=_symlink_outside(7, picture(seed=7))),
        ok("lower_case_gender_folded", 8, fields={"gender": "men"}, clean_values={"gender": "Men"}),
        ok("upper_case_colour_folded", 9, fields={"colour": "BLACK"}, clean_values={"baseColour": "Black"}),
        ok("canonical_spelling_kept", 10, fields={"colour": "Black"}, clean_values={"baseColour": "Black"}),
        ok("canonical_spelling_kept_again", 11, fields={"colour": "Black"}, clean_values={"baseColour": "Black"}),
        ok("latin1_line_read_as_cp1252", 12,
           text=line("12", colour="Beigé", name="Café Women Beigé Top").encode("cp1252"),
           clean_values={"baseColour": "Beigé", "productDisplayName": "Café Women Beigé Top"}),
        ok("utf8_accents_kept", 13, fields={"colour": "Beigé", "name": "Café Men Beigé Tee"},
           clean_values={"baseColour": "Beigé", "productDisplayName": "Café Men Beigé Tee"}),
        ok("cp1252_only_bytes", 14, text=line("14", name="Nike “Dri-FIT” Tee – €20").encode("cp1252"),
           clean_values={"productDisplayName": "Nike “Dri-FIT” Tee – €20"}),
        ok("literal_na_and_empty_fields_are_missing", 15, fields={"usage": "NA", "year": ""},
           clean_values={"usage": None, "year": None}),
        ok("unparsable_year_kept_as_null", 16, fields={"year": "20x2"}, clean_values={"year": None}),
        ok("23_digit_year_kept_as_null", 17, fields={"year": "9" * 23}, clean_values={"year": None}),
        ok("year_written_as_float", 18, fields={"year": "2012.0"}, clean_values={"year": 2012}),
        ok("inch_quote_inside_unquoted_field", 19, fields={"name": 'Nike Women EM Tempo 3.5" Pink Short'},
           clean_values={"productDisplayName": 'Nike Women EM Tempo 3.5" Pink Short'}),
        ok("quoted_field_with_comma", 20, text=line("20", name='"Boss Men Perfume, After Shave Set"'),
           clean_values={"productDisplayName": "Boss Men Perfume, After Shave Set"}),
        ok("smallest_allowed_image", 21, image=picture((32, 32), seed=21), clean_values={"width": 32}),
        ok("most_elongated_allowed_image", 22, image=picture((32, 128), seed=22), clean_values={"height": 128}),
        ok("largest_id", 2**63 - 1, clean_values={"id": 2**63 - 1}),
        ok("id_with_leading_zeros", 23, text=line("0023"), image=b"-",
           setup=lambda images, _: (images / "0023.jpg").write_bytes(picture(seed=23))),
        # --- rejected -------------------------------------------------------------------------------------------
        Case("id_of_23_digits", line("1" * 23), "bad_id"),
        Case("id_zero", line("0"), "bad_id"),
        Case("negative_id", line("-5"), "bad_id"),
        Case("id_one_above_int64", line(str(2**63)), "bad_id"),
        Case("non_numeric_id", line("abc"), "non_integer_id"),
        Case("decimal_id", line("4.5"), "non_integer_id"),
        Case("repeated_id", line("1"), "duplicate_id"),
        Case("unquoted_comma", line("30", name="Boss Men Perfume, After Shave Set"), "malformed_line",
             picture(seed=30)),
        Case("too_few_fields", "31,Men,Apparel", "malformed_line", picture(seed=31)),
        Case("unbalanced_quote", line("32", name='"Roadster Men Blue Tshirt'), "malformed_line", picture(seed=32)),
        Case("blank_line", "", "blank_line"),
        Case("whitespace_line", "   ", "blank_line"),
        Case("replacement_character", line("33", colour="Beig\ufffd"), "bad_encoding", picture(seed=33)),
        Case("missing_image", line("34"), "missing_image"),
        Case("image_only_as_png", line("35"), "wrong_extension", setup=_only_png(35)),
        Case("zero_byte_image", line("36"), "empty_image", b""),
        Case("truncated_jpeg", line("37"), "truncated_image", truncated_jpeg(37)),
        Case("text_file_named_jpg", line("38"), "not_an_image", b"id,gender\n1,Men\n"),
        Case("symlink_to_a_non_image_outside", line("39"), "not_an_image",
             setup=_symlink_outside(39, b"not an image at all\n")),
        Case("broken_symlink", line("40"), "unreadable_image", setup=_broken_symlink(40)),
        Case("folder_named_like_an_image", line("41"), "unreadable_image", setup=_folder_named_like_an_image(41)),
        Case("decompression_bomb", line("42"), "corrupt_image", decompression_bomb()),
        Case("one_pixel_image", line("43"), "too_small", picture((1, 1), seed=43)),
        Case("thin_image", line("44"), "too_small", picture((31, 80), seed=44)),
        Case("strip_20000x20", line("45"), "too_small", picture((20_000, 20), fmt="PNG", seed=45)),
        Case("strip_2000x100", line("46"), "bad_aspect", picture((2000, 100), seed=46)),
        Case("tower_40x161", line("47"), "bad_aspect", picture((40, 161), seed=47)),
    ]


CASES: list[Case] = _cases()


def write_corpus(root: Path, *, bom: bool = True) -> Path:
    """ROOT/raw/{styles.csv,images/} holding every case (line i+2 is CASES[i]) and ROOT/outside/ for link targets."""
    root = root.resolve()  # symlink targets are absolute, wherever the corpus is read from
    raw, outside = root / "raw", root / "outside"
    images = raw / "images"
    images.mkdir(parents=True)
    outside.mkdir()
    body = b"".join(case.raw() + case.ending for case in CASES)
    (raw / "styles.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + HEADER + b"\n" + body)
    for case in CASES:
        if case.setup is not None:
            case.setup(images, outside)
        elif case.image is not None:
            (images / f"{case.raw().split(b',', 1)[0].decode()}.jpg").write_bytes(case.image)
    return raw


# Whole styles.csv files that cannot be validated at all: the error must say which rule and where.
FILE_CASES: dict[str, tuple[bytes | None, str]] = {
    "column_named_twice": (HEADER + b",baseColour\n" + line("1").encode() + b",Blue\n",
                           r"names a column more than once: 'baseColour' in columns 6, 11"),
    "missing_columns": (b"id,gender,masterCategory,subCategory,articleType,baseColour,year,productDisplayName\n"
                        b"1,Men,Apparel,Topwear,Tshirts,Blue,2012,Shirt\n", "missing columns: season, usage"),
    "empty_file": (b"", "is empty"),
    "bom_only": (b"\xef\xbb\xbf", "is empty"),
    "utf16_file": (("\ufeff" + HEADER.decode() + "\n").encode("utf-16-le"), "UTF-16"),
    "header_only": (HEADER + b"\n", "only 0 clean rows"),
    "missing_styles_csv": (None, "does not exist"),
}
