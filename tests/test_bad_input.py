"""Every bad input tried so far ends as a counted reject or a one-line error, never a traceback or a silent change.

The generated corpus (tests/bad_input_corpus.py) holds each case next to the good inputs that look like it; the
named tests below cover the nine failures of issue 10 one by one, through the library and through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from bad_input_corpus import (
    CASES,
    CLEAN,
    FILE_CASES,
    HEADER,
    decompression_bomb,
    line,
    picture,
    truncated_jpeg,
    write_corpus,
)
from PIL import Image

from fashion_tagger.core.config import ConfigError, load_config
from fashion_tagger.core.errors import DataError, SourceError
from fashion_tagger.core.schema import ATTRIBUTES, STYLE_COLUMNS
from fashion_tagger.data.labels import LabelSpace, fold_case_variants
from fashion_tagger.data.sources import fetch_dataset
from fashion_tagger.data.validate import validate_dataset
from fashion_tagger.runs import stages
from fashion_tagger.runs.run import create_run

# Overrides that let every line be judged without the quality gate stopping the run.
LENIENT = ["data.max_reject_fraction=1", "data.min_rows=1", "images.workers=1"]


def run_cli(monkeypatch, capsys, *args: str | Path) -> tuple[int, str, str]:
    """`fashion-tagger ARGS` in this process, through the console entry point: (exit code, stdout, stderr)."""
    from fashion_tagger.cli import main

    monkeypatch.setattr(sys, "argv", ["fashion-tagger", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    message = [text for text in err.splitlines() if text.startswith("error:")]
    assert len(message) == 1, err
    for fragment in fragments:
        assert fragment in message[0], message[0]


def write_raw(root: Path, lines: list[str | bytes], images: dict[str, bytes], *, header: bytes = HEADER) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    body = b"".join((text if isinstance(text, bytes) else text.encode()) + b"\n" for text in lines)
    (root / "styles.csv").write_bytes(header + b"\n" + body)
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    return root


# --- the corpus: every line clean or rejected with its reason ---------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    raw = write_corpus(root)
    result = validate_dataset(raw, root / "out", load_config(None, LENIENT))
    return SimpleNamespace(
        raw=raw,
        result=result,
        clean=pd.read_parquet(result.clean_path),
        rejects=pd.read_csv(result.rejects_path, keep_default_na=False, dtype=str),
        report=json.loads(result.report_path.read_text()),
    )


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case.name for case in CASES])
def test_each_corpus_line_lands_clean_or_rejected_with_its_reason(corpus, index):
    case = CASES[index]
    rejected = corpus.rejects.loc[corpus.rejects["line_number"] == str(index + 2)]
    if case.expected == CLEAN:
        assert rejected.empty, rejected.to_dict("records")
        row = corpus.clean.loc[corpus.clean["id"] == case.style_id]
        assert len(row) == 1
        for column, value in case.clean_values.items():
            actual = row[column].iloc[0]
            assert pd.isna(actual) if value is None else actual == value, (column, actual)
    else:
        assert len(rejected) == 1, corpus.rejects.to_dict("records")
        assert rejected["reason"].iloc[0] == case.expected, rejected["detail"].iloc[0]
        assert rejected["detail"].iloc[0]
        assert rejected["raw_line"].iloc[0] == case.raw().decode("utf-8").strip("\r\n")
    report = corpus.report
    assert report["lines_read"] == len(CASES) == report["rows_clean"] + report["rows_rejected"]


def test_corpus_report_counts_every_reason(corpus):
    expected = Counter(case.expected for case in CASES)
    assert corpus.report["rows_clean"] == expected.pop(CLEAN) == len(corpus.clean)
    assert corpus.report["rejected_by_reason"] == dict(sorted(expected.items()))
    assert corpus.report["encoding"] == "utf-8-sig with cp1252 fallback"
    assert corpus.report["cp1252_lines"] == sum(isinstance(case.text, bytes) for case in CASES) == 2


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_an_unreadable_styles_csv_is_an_error_naming_the_rule(name, tmp_path):
    data, fragment = FILE_CASES[name]
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    if data is not None:
        (raw / "styles.csv").write_bytes(data)
    with pytest.raises(DataError, match=fragment):
        validate_dataset(raw, tmp_path / "out", load_config())


# --- 1. labels that differ only in case -------------------------------------------------------------------------


def test_labels_differing_only_in_case_are_folded_to_the_most_frequent_and_reported(corpus):
    assert corpus.report["labels_folded"] == {
        "baseColour": [{"variant": "BLACK", "canonical": "Black", "rows": 1}],
        "gender": [{"variant": "men", "canonical": "Men", "rows": 1}],
    }
    for attribute in ATTRIBUTES:
        labels = corpus.clean[attribute].dropna().unique()
        assert len({label.casefold() for label in labels}) == len(labels), attribute
    # One class, counted once: BLACK and Black no longer split a class below min_class_count.
    space = LabelSpace.from_frame(corpus.clean, ["baseColour"], min_class_count=3)
    assert space.classes["baseColour"] == ("Black", "Blue")
    assert space.counts["baseColour"]["Black"] == 3


def test_case_folding_picks_the_most_frequent_spelling_then_the_first_in_order():
    assert fold_case_variants(["Men", "men", "Men", "MEN", "Women"]) == {"men": "Men", "MEN": "Men"}
    assert fold_case_variants(["black", "Black"]) == {"black": "Black"}  # a tie: "Black" sorts first
    assert fold_case_variants(["Men", "Women"]) == {}


# --- 2. ids outside 1..2^63-1 -----------------------------------------------------------------------------------


def test_id_of_23_digits_is_rejected_as_bad_id_instead_of_crashing(tmp_path):
    raw = write_raw(tmp_path / "raw", [line("1"), line("1" * 23), line("-3"), line("0")], {"1.jpg": picture()})
    result = validate_dataset(raw, tmp_path / "out", load_config(None, LENIENT))
    rejects = pd.read_csv(result.rejects_path, dtype=str)
    assert result.rejected_by_reason == {"bad_id": 3}
    assert rejects["id"].tolist() == ["1" * 23, "-3", "0"]
    assert "outside 1..9223372036854775807" in rejects["detail"].iloc[0]
    assert result.lines_read == 4 == result.rows_clean + result.rows_rejected


# --- 3. a styles.csv in Latin-1 ---------------------------------------------------------------------------------


def test_latin1_styles_csv_is_read_as_cp1252_without_replacement_characters(tmp_path):
    lines = [line(str(i), colour="Beigé", name=f"Café Women Beigé Top {i}") for i in range(1, 4)] + [line("4")]
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "styles.csv").write_bytes("\n".join([HEADER.decode(), *lines, ""]).encode("latin-1"))
    for i in range(1, 5):
        (raw / "images" / f"{i}.jpg").write_bytes(picture(seed=i))
    result = validate_dataset(raw, tmp_path / "out", load_config(None, ["data.min_rows=1", "images.workers=1"]))
    report = json.loads(result.report_path.read_text())
    assert (report["encoding"], report["cp1252_lines"], report["rows_rejected"]) == (
        "utf-8 with cp1252 fallback", 3, 0)
    clean = pd.read_parquet(result.clean_path).set_index("id")
    assert clean.loc[1, "baseColour"] == "Beigé" and clean.loc[3, "productDisplayName"] == "Café Women Beigé Top 3"
    for column in STYLE_COLUMNS[1:]:
        assert not clean[column].dropna().astype(str).str.contains("\ufffd").any(), column


# --- 4. a column named twice ------------------------------------------------------------------------------------


def test_header_naming_a_column_twice_is_an_error_naming_the_column(tmp_path, monkeypatch, capsys):
    raw = write_raw(tmp_path / "raw", [line("1") + ",Red"], {"1.jpg": picture()}, header=HEADER + b",baseColour")
    with pytest.raises(DataError, match=r"'baseColour' in columns 6, 11"):
        validate_dataset(raw, tmp_path / "out", load_config())
    monkeypatch.setenv("FASHION_TAGGER_HOME", str(tmp_path / "home"))
    code, _, err = run_cli(monkeypatch, capsys, "run", "--set", f"data.source={raw}")
    assert_one_line_error(code, err, "names a column more than once", "'baseColour'")


# --- 5. an empty source -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["", "   "])
def test_empty_or_blank_fetch_source_is_an_error_not_the_default(source, tmp_path, monkeypatch, capsys):
    with pytest.raises(SourceError, match="the dataset source is empty"):
        fetch_dataset(source, tmp_path / "raw")
    monkeypatch.setenv("FASHION_TAGGER_HOME", str(tmp_path / "home"))
    run = create_run(load_config(None, {"data": {"source": source}}))
    with pytest.raises(SourceError, match="the dataset source is empty"):
        stages.run_stage(run, "fetch")
    code, _, err = run_cli(monkeypatch, capsys, "run", "--set", f'data.source="{source}"')
    assert_one_line_error(code, err, "the dataset source is empty")
    assert not (tmp_path / "home" / "raw").exists()  # nothing fetched in place of the default


# --- 6. configuration problems ----------------------------------------------------------------------------------


def _config_file(tmp_path: Path, kind: str) -> list[str]:
    path = tmp_path / f"{kind}.yaml"
    if kind == "syntax":
        path.write_text("train:\n  epochs: 3\n batch_size: [\n")
    elif kind == "binary":
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    elif kind == "nul":
        path.write_bytes(b"train:\n  epochs: 3\x00\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "list":
        path.write_text("- train\n- epochs\n")
    return ["--config", str(path)]


@pytest.mark.parametrize(
    ("kind", "args", "fragments"),
    [
        ("syntax", None, ["is not valid YAML", "line 3, column 2"]),
        ("binary", None, ["is not a text file", "byte 7"]),
        ("nul", None, ["is not a text file"]),
        ("directory", None, ["is a directory"]),
        ("list", None, ["must hold a mapping of sections"]),
        (None, ["--set", "train.epochs=["], ["override 'train.epochs=['", "is not valid YAML"]),
        (None, ["--set", "train..epochs=3"], ["must look like section.field=value"]),
        (None, ["--set", "train.epochs: 3"], ["must look like section.field=value"]),
        (None, ["--config", "no-such-preset"], ["neither a file nor a preset"]),
    ],
)
def test_every_configuration_problem_is_one_line_with_exit_code_2(kind, args, fragments, tmp_path, monkeypatch,
                                                                 capsys):
    args = _config_file(tmp_path, kind) if kind else args
    code, _, err = run_cli(monkeypatch, capsys, "config", *args)
    assert_one_line_error(code, err, *fragments)
    with pytest.raises(ConfigError):
        load_config(args[1] if args[0] == "--config" else None, [args[1]] if args[0] == "--set" else None)


# --- 7. predict on unreadable images and bad models -------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tagger_fixtures import make_run, make_split

    root = tmp_path_factory.mktemp("predict_bad")
    split = make_split(root / "split", rows=8)
    return make_run(root / "run", split, "constant:Footwear,Red") / "checkpoints" / "best.ckpt"


@pytest.fixture
def mixed_photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a-good.jpg").write_bytes(picture((120, 160), seed=1))
    (folder / "b-truncated.jpg").write_bytes(truncated_jpeg())
    (folder / "c-bomb.png").write_bytes(decompression_bomb())
    (folder / "d-text.jpg").write_bytes(b"not an image\n")
    (folder / "e-good.png").write_bytes(picture((80, 80), fmt="PNG", seed=2))
    return folder


@pytest.mark.usefixtures("one_torch_thread")
def test_predict_tags_readable_images_and_reports_unreadable_ones_with_exit_code_1(checkpoint, mixed_photos,
                                                                                  tmp_path, monkeypatch, capsys,
                                                                                  caplog):
    out = tmp_path / "predictions.csv"
    grid = tmp_path / "grid.png"
    code, stdout, err = run_cli(monkeypatch, capsys, "predict", mixed_photos, "--checkpoint", checkpoint,
                                "--out", out, "--json", "--grid", grid)
    assert code == 1, err
    assert "Traceback" not in err and "3 of 5 images could not be read" in err + caplog.text
    records = {Path(r["image"]).name: r for r in json.loads(stdout[stdout.index("[") :])}
    table = pd.read_csv(out)
    assert len(table) == len(records) == 5
    for name in ("a-good.jpg", "e-good.png"):
        assert records[name]["error"] is None
        assert (records[name]["masterCategory"], records[name]["baseColour"]) == ("Footwear", "Red")
    assert "truncated" in records["b-truncated.jpg"]["error"]
    assert "DecompressionBombError" in records["c-bomb.png"]["error"]
    assert "UnidentifiedImageError" in records["d-text.jpg"]["error"]
    for name in ("b-truncated.jpg", "c-bomb.png", "d-text.jpg"):
        assert records[name]["masterCategory"] is None and records[name]["masterCategory_confidence"] is None
    assert table["error"].notna().sum() == 3
    with Image.open(grid) as image:  # the unreadable ones are drawn as their error text
        assert image.width > 300


def _bad_model_args(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    if kind == "model_text_file":
        return ["--model", str(text)], str(text)
    if kind == "unknown_alias":
        return ["--model", "models:/fashion-tagger@nope"], "models:/fashion-tagger@nope"
    if kind == "checkpoint_text_file":
        return ["--checkpoint", str(text)], f"{text} is not a fashion-tagger checkpoint"
    if kind == "checkpoint_empty_file":
        (tmp_path / "empty.ckpt").write_bytes(b"")
        return ["--checkpoint", str(tmp_path / "empty.ckpt")], "is not a fashion-tagger checkpoint"
    if kind == "checkpoint_of_something_else":
        torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "other.ckpt")
        return ["--checkpoint", str(tmp_path / "other.ckpt")], "is not a fashion-tagger checkpoint"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["model_text_file", "unknown_alias", "checkpoint_text_file", "checkpoint_empty_file",
                                  "checkpoint_of_something_else"])
def test_bad_model_uri_alias_or_checkpoint_is_a_one_line_error_naming_it(kind, tmp_path, monkeypatch, capsys):
    args, fragment = _bad_model_args(tmp_path, kind)
    (tmp_path / "photo.jpg").write_bytes(picture())
    code, _, err = run_cli(monkeypatch, capsys, "predict", tmp_path / "photo.jpg", *args)
    assert_one_line_error(code, err, fragment)


def test_served_model_tags_each_readable_row_and_says_why_the_others_failed(checkpoint, tmp_path):
    import base64

    from fashion_tagger.serving.predictor import Predictor
    from fashion_tagger.serving.pyfunc_model import TaggerModel, tag_frame

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    good = picture((64, 64), seed=5)
    frame = pd.DataFrame(
        {"image": [good, truncated_jpeg(), "%%% not base64 %%%", None, base64.b64encode(good).decode(), 7],
         "path": [None, None, None, str(tmp_path / "missing.jpg"), None, None]},
        index=[10, 11, 12, 13, 14, 15],
    )
    model = TaggerModel()
    model.predictor = predictor
    out = model.predict(None, frame)
    pd.testing.assert_frame_equal(out, tag_frame(predictor, frame))
    assert out.index.tolist() == frame.index.tolist()
    assert out.loc[[10, 14], "error"].isna().all()
    assert out.loc[[10, 14], "masterCategory"].tolist() == ["Footwear", "Footwear"]
    errors = out["error"].tolist()
    assert "row 11: cannot read image bytes" in errors[1] and "truncated" in errors[1]
    assert "not base64" in errors[2]
    assert "row 13: paths are not accepted by this server" in errors[3]
    assert "must hold image bytes or base64 text" in errors[5]
    assert out.loc[[11, 12, 13, 15], "masterCategory_confidence"].isna().all()


# --- 8. the backbone is checked when the configuration is built -------------------------------------------------


def test_unknown_backbone_fails_when_the_config_is_built_with_similar_names(tmp_path, isolated_home):
    with pytest.raises(ConfigError, match=r"model\.backbone: .*'efficientnet_b33' is not a timm model "
                                          r"\(similar names: efficientnet_b3"):
        load_config(None, ["model.backbone=efficientnet_b33"])
    assert load_config(None, ["model.backbone=efficientnet_b3.ra2_in1k"]).model.backbone.startswith("efficientnet")
    with pytest.raises(ConfigError, match=r"model\.pretrained_path: .*does not exist"):
        load_config(None, [f"model.pretrained_path={tmp_path / 'weights.pth'}"])
    (tmp_path / "weights.pth").write_bytes(b"w")
    assert load_config(None, [f"model.pretrained_path={tmp_path / 'weights.pth'}"]).model.pretrained_path

    # A DAG trigger fails in fetch_dataset's first step, before any data work or run folder.
    from fashion_tagger.orchestration.form import config_from_params

    with pytest.raises(ConfigError, match=r"backbone \(model\.backbone\): .*similar names: resnet50"):
        config_from_params({"preset": "demo", "backbone": "resnet5O", "source": "synthetic:100"})
    assert not (isolated_home / "runs").exists() and not (isolated_home / "raw").exists()


def test_the_backbone_check_imports_no_ml_library_until_a_backbone_is_given():
    probe = (
        "import sys\n"
        "import fashion_tagger.orchestration.form\n"
        "from fashion_tagger.core.config import load_config\n"
        "load_config(None, ['train.epochs=2'])\n"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- 9. image sizes ---------------------------------------------------------------------------------------------


def test_images_too_small_or_too_elongated_are_rejected_and_counted(corpus, tmp_path):
    counts = corpus.report["rejected_by_reason"]
    assert (counts["too_small"], counts["bad_aspect"]) == (3, 2)
    assert corpus.report["image_rules"] == {"min_image_side": 32, "max_aspect_ratio": 4.0}
    details = corpus.rejects.set_index("id")["detail"]
    assert "1x1 px, a side below data.min_image_side=32" in details["43"]
    assert "2000x100 px, an aspect ratio of 20.00, above data.max_aspect_ratio=4" in details["46"]

    # The limits come from the configuration, through the same stage function the CLI and the DAG call.
    sizes = {"1.jpg": (1, 1), "2.jpg": (2000, 100), "3.jpg": (60, 80)}
    raw = write_raw(tmp_path / "raw", [line("1"), line("2"), line("3")],
                    {name: picture(size, seed=i) for i, (name, size) in enumerate(sizes.items())})
    def validated(*overrides: str) -> dict:
        home = f"home={tmp_path / 'home'}"
        run = create_run(load_config(None, [home, f"data.source={raw}", "data.min_rows=1", *overrides]))
        stages.run_stage(run, "fetch")
        return stages.run_stage(run, "validate")

    strict = validated("data.max_reject_fraction=1")
    assert strict["rejected_by_reason"] == {"bad_aspect": 1, "too_small": 1}
    relaxed = validated("data.min_image_side=1", "data.max_aspect_ratio=25")
    assert (relaxed["rows_clean"], relaxed["rejected_by_reason"]) == (3, {})


def test_fetch_and_validate_of_missing_or_bad_sources_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    # No S3 endpoint and no AWS credentials anywhere (and no instance metadata to ask): boto3 fails at once.
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws" / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws" / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("FASHION_TAGGER_HOME", str(tmp_path / "home"))
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "styles.csv").write_text("")
    for source, fragment in [
        (tmp_path / "nowhere", "does not exist"),
        ("s3://no-such-bucket-here/data", "s3://no-such-bucket-here/data"),
        ("kaggle:paramaggarwal/fashion-product-images-small", "no Kaggle credentials"),
        ("synthetic:0", "synthetic:0 asks for no rows"),
        (empty, "styles.csv"),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, "run", "--set", f"data.source={source}")
        assert_one_line_error(code, err, str(fragment))



@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_fetch_counts_the_lines_validate_reads_whatever_the_line_ending(ending, tmp_path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "styles.csv").write_bytes(ending.join([HEADER, line("1").encode(), line("2").encode(), b""]))
    (raw / "images" / "1.jpg").write_bytes(picture(seed=1))
    (raw / "images" / "2.jpg").write_bytes(picture(seed=2))
    fetched = fetch_dataset(str(raw), tmp_path / "home" / "raw")
    validated = validate_dataset(fetched.raw_dir, tmp_path / "out",
                                 load_config(None, ["data.min_rows=1", "images.workers=1"]))
    assert fetched.rows == validated.lines_read == validated.rows_clean == 2


def test_a_full_disk_anywhere_is_one_transient_line_naming_the_file(monkeypatch, capsys):
    import errno

    from fashion_tagger.core import config_sources

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/scratch/homes/h/runs/r/train/last.ckpt")

    monkeypatch.setattr(config_sources, "preset_names", full)
    code, _, err = run_cli(monkeypatch, capsys, "presets")
    assert code == 75 and "Traceback" not in err, err
    lines = [text for text in err.splitlines() if text.startswith("error:")]
    assert lines == ["error: no space left on the device writing /scratch/homes/h/runs/r/train/last.ckpt: free "
                     "space there (a scratch folder, FASHION_TAGGER_SCRATCH, is a cache that may be emptied between "
                     "tasks); a retry continues from what was complete"], err
