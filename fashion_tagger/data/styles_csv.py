"""Read styles.csv line by line: each physical line decoded (UTF-8, else cp1252) and split as CSV on its own, then
kept as a record with its line number and raw text, or turned into a reject that names the line and the rule.

Memory follows the records kept, not the file's text held twice: lines are found one at a time, records use slots,
and the few-valued columns (gender, season, ...) share one string per distinct value.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fashion_tagger.core.errors import DataError
from fashion_tagger.core.io import read_bytes
from fashion_tagger.core.schema import STYLE_COLUMNS

log = logging.getLogger(__name__)

_UTF8_BOM = b"\xef\xbb\xbf"
MANY_VALUED = frozenset({"id", "productDisplayName"})  # columns whose values are mostly distinct
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_CP1252_UNDEFINED = frozenset(b"\x81\x8d\x8f\x90\x9d")


@dataclass(slots=True)
class Reject:
    """A data line of styles.csv left out of the clean table, with its reason (a rule's name) and detail."""

    line_number: int
    id: str
    reason: str
    detail: str
    raw_line: str


@dataclass(slots=True)
class StyleRecord:
    """A data line of styles.csv with as many fields as the header: its values by column name."""

    line_number: int
    raw_line: str
    values: dict[str, str]


@dataclass
class ParsedStyles:
    records: list[StyleRecord]
    rejects: list[Reject]
    lines_read: int
    encoding: str = "utf-8"
    cp1252_lines: int = 0  # physical lines (header included) that were not valid UTF-8


def _decode_cp1252(raw: bytes) -> str:
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        # Five bytes have no cp1252 character; Latin-1 keeps them as the control characters they are.
        return "".join(chr(b) if b in _CP1252_UNDEFINED else bytes([b]).decode("cp1252") for b in raw)


# A physical line with its ending (CRLF, LF or CR), or a last line without one; found one at a time, so a file of a
# million lines is never held as a list of lines beside its bytes.
_PHYSICAL_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _decode_line(raw: bytes) -> tuple[str, bool]:
    """RAW as UTF-8, or as cp1252 when it is not (True): deciding per line keeps a file that mixes both (a UTF-8
    export edited in a Latin-1 tool) readable, and no character is ever replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return _decode_cp1252(raw), True


def _physical_lines(path: Path, data: bytes) -> tuple[Iterator[bytes], bool]:
    """The file's physical lines, one at a time, after a UTF-8 byte-order mark (True when there was one)."""
    if data.startswith(_UTF16_BOMS):
        raise DataError(f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark): save it as UTF-8 and rerun")
    bom = data.startswith(_UTF8_BOM)
    lines = (match.group() for match in _PHYSICAL_LINE.finditer(data, len(_UTF8_BOM) if bom else 0))
    return lines, bom


def _split_line(line: str) -> list[str]:
    """The fields of one physical line; csv.Error for an unbalanced quote or a field over csv's size limit.

    The Kaggle file has no quoted line breaks, so a record never spans lines: an unmatched quote rejects its
    own line instead of swallowing every line after it.
    """
    return next(csv.reader([line], strict=True), [])


def _read_header(path: Path, line: str | None) -> list[str]:
    try:
        header = [name.strip() for name in _split_line(line)] if line is not None else []
    except csv.Error as exc:
        raise DataError(f"{path}: the header line cannot be parsed as CSV ({exc})") from None
    if not any(header):
        raise DataError(f"{path} is empty: expected the header {','.join(STYLE_COLUMNS)}")
    repeated = [name for name, n in Counter(header).items() if n > 1]
    if repeated:
        where = "; ".join(
            f"{name!r} in columns {', '.join(str(i + 1) for i, h in enumerate(header) if h == name)}"
            for name in repeated
        )
        raise DataError(
            f"{path.name} names a column more than once: {where} ({path}); keep one column of each name, "
            f"as in the Kaggle header {','.join(STYLE_COLUMNS)}"
        )
    missing = [c for c in STYLE_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path.name} is missing columns: {', '.join(missing)} ({path}; expected the Kaggle header "
            f"{','.join(STYLE_COLUMNS)})"
        )
    return header


def read_styles(path: Path) -> ParsedStyles:
    """Parse styles.csv keeping each record's line number and raw text; bad lines become rejects."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: a raw dataset directory holds styles.csv and images/")
    data = read_bytes(path, DataError)
    lines, bom = _physical_lines(path, data)
    first = next(lines, None)
    header_line, fallback = _decode_line(first) if first is not None else (None, False)
    cp1252_lines = int(fallback)
    header = _read_header(path, header_line)
    records: list[StyleRecord] = []
    rejects: list[Reject] = []
    shared: dict[str, str] = {}  # one string object per distinct value of the few-valued columns
    few_valued = [i for i, name in enumerate(header) if name not in MANY_VALUED]
    line_number = 1
    for line_number, raw_bytes in enumerate(lines, start=2):
        line, fallback = _decode_line(raw_bytes)
        cp1252_lines += fallback
        raw = line.rstrip("\r\n")
        try:
            fields = _split_line(line)
        except csv.Error as exc:
            raw_id = raw.split(",", 1)[0].strip()
            rejects.append(Reject(line_number, raw_id, "malformed_line", f"not parsable as CSV: {exc}", raw))
            continue
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            rejects.append(Reject(line_number, "", "blank_line", "line holds no fields", raw))
        elif len(fields) != len(header):
            raw_id = fields[0].strip()
            detail = f"expected {len(header)} fields, found {len(fields)}"
            if len(fields) > len(header):
                detail += " (an unquoted comma, e.g. in productDisplayName)"
            rejects.append(Reject(line_number, raw_id, "malformed_line", detail, raw))
        elif "\ufffd" in line:
            # U+FFFD in the file itself: the text was already damaged by a wrong decoding before it got here.
            column = next((name for name, value in zip(header, fields, strict=True) if "\ufffd" in value), "a field")
            rejects.append(Reject(line_number, fields[0].strip(), "bad_encoding",
                                   f"{column} holds U+FFFD, a character lost to a wrong decoding upstream", raw))
        else:
            for i in few_valued:
                fields[i] = shared.setdefault(fields[i], fields[i])
            records.append(StyleRecord(line_number, raw, dict(zip(header, fields, strict=True))))
    encoding = "utf-8-sig" if bom else "utf-8"
    if cp1252_lines:
        encoding += " with cp1252 fallback"
        log.warning("%s: %d lines are not valid UTF-8 and were read as cp1252", path, cp1252_lines)
    lines_read = line_number - 1 if first is not None else 0
    return ParsedStyles(records, rejects, lines_read, encoding, cp1252_lines)
