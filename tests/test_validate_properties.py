"""Property-based tests of validate on styles.csv lines (random quotes, commas, bytes, line endings, lengths):
it never raises on a cell's content, every physical line ends up clean or rejected exactly once, and no clean
label holds U+FFFD or two spellings that differ only in case."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fashion_tagger.core.config import load_config
from fashion_tagger.core.errors import QualityGateError
from fashion_tagger.core.layout import ValidateDir
from fashion_tagger.core.schema import ATTRIBUTES, STYLE_COLUMNS
from fashion_tagger.data.validate import CLEAN_COLUMNS, MAX_ID, validate_dataset

HEADER = ",".join(STYLE_COLUMNS).encode()
ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])
# Metadata only and no limit on rejects: every line is judged, and only a file without one clean row fails the gate.
LENIENT = load_config(None, ["data.metadata_only=true", "data.max_reject_fraction=1", "data.min_rows=1",
                             "images.workers=1"])

# Cells that stress the parser: quotes, commas, the missing-value tokens, case variants, non-ASCII, control bytes.
cell_text = st.one_of(
    st.sampled_from(["", "NA", "na", " Men ", "men", "MEN", "Black", "BLACK", "Beigé", '3.5"', '"quoted, comma"',
                     '"unbalanced', "a,b", "\ufffd", "\x00", "2012", "2012.0", "9" * 25, "-1", "0"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12),
)
ids = st.one_of(st.integers(min_value=-5, max_value=60).map(str), st.sampled_from(["1" * 23, str(MAX_ID),
                                                                                   str(MAX_ID + 1), "abc", "4.5",
                                                                                   " 7 ", "+3", "007", ""]))


@st.composite
def styles_line(draw) -> bytes:
    """A data line: mostly ten fields (sometimes nine or eleven), or raw bytes in UTF-8, cp1252 or neither."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "bytes", "cp1252"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80)).replace(b"\n", b" ").replace(b"\r", b" ")
    count = draw(st.sampled_from([len(STYLE_COLUMNS)] * 6 + [len(STYLE_COLUMNS) - 1, len(STYLE_COLUMNS) + 1]))
    fields = [draw(ids)] + [draw(cell_text) for _ in range(count - 1)]
    text = ",".join(fields)
    if kind == "cp1252":
        return text.encode("cp1252", errors="replace")
    return text.encode("utf-8", errors="surrogatepass")


@st.composite
def styles_file(draw) -> tuple[bytes, int]:
    """The bytes of a styles.csv (sometimes with a BOM) and its number of physical data lines."""
    lines = draw(st.lists(styles_line(), min_size=0, max_size=25))
    body = b"".join(line + draw(ENDINGS) for line in lines)
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + HEADER + b"\n" + body, len(body.splitlines())


def _validate(data: bytes) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    with tempfile.TemporaryDirectory(prefix="validate-property-") as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        (raw / "styles.csv").write_bytes(data)
        out = ValidateDir(Path(tmp) / "out")
        try:
            validate_dataset(raw, out.dir, LENIENT)
            clean = pd.read_parquet(out.clean)
        except QualityGateError:  # no clean row at all (data.min_rows is at least 1); the rest is still written
            clean = pd.DataFrame(columns=list(CLEAN_COLUMNS))
        report = json.loads(out.report.read_text())
        rejects = pd.read_csv(out.rejects, keep_default_na=False, dtype={"line_number": int})
    return report, clean, rejects


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(styles_file())
def test_validate_never_raises_and_every_line_is_clean_or_rejected_once(sample):
    data, physical_lines = sample
    report, clean, rejects = _validate(data)

    assert report["lines_read"] == physical_lines == report["rows_clean"] + report["rows_rejected"]
    assert (len(clean), len(rejects)) == (report["rows_clean"], report["rows_rejected"])
    assert rejects["line_number"].is_unique
    assert rejects["line_number"].between(2, physical_lines + 1).all()
    assert report["rejected_by_reason"] == rejects["reason"].value_counts().sort_index().to_dict()

    assert clean["id"].is_unique and clean["id"].between(1, MAX_ID).all()
    for column in STYLE_COLUMNS[1:]:
        values = clean[column].dropna().astype(str)
        assert not values.str.contains("\ufffd").any(), column
    for attribute in ATTRIBUTES:
        labels = clean[attribute].dropna().unique()
        assert len({label.casefold() for label in labels}) == len(labels), (attribute, labels)


plain_cell = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters=',"\ufffd'), max_size=15
).filter(lambda text: text.strip() not in ("", "NA"))


@settings(max_examples=40, deadline=None)
@given(style_id=st.integers(min_value=1, max_value=MAX_ID), cells=st.lists(plain_cell, min_size=9, max_size=9),
       ending=ENDINGS)
def test_a_well_formed_line_is_clean_and_keeps_its_text(style_id, cells, ending):
    data = HEADER + b"\n" + ",".join([str(style_id), *cells]).encode() + ending
    report, clean, rejects = _validate(data)
    assert (report["rows_clean"], report["rows_rejected"]) == (1, 0), rejects.to_dict("records")
    row = clean.iloc[0]
    assert row["id"] == style_id
    for column, cell in zip(STYLE_COLUMNS[1:], cells, strict=True):
        if column != "year":
            assert row[column] == cell.strip(), column
