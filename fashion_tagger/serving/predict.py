"""`fashion-tagger predict`: tag image files and folders with a checkpoint, an export, a run or an MLflow model URI.

Each file is decoded and fitted as the served model reads a request (`data.imaging`); an unreadable file becomes a
row with its error, the others are tagged. Prints a table or JSON, writes a CSV and can draw a grid of the tags.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image

from fashion_tagger.core.errors import DataError, FashionTaggerError, first_line
from fashion_tagger.core.plots import image_grid
from fashion_tagger.data.imaging import IMAGE_SUFFIXES, decode_image, read_fitted, resize_image
from fashion_tagger.serving.predictor import Predictor, load_predictor
from fashion_tagger.serving.rows import (
    CONFIDENCE_SUFFIX,
    ERROR_COLUMN,
    attributes_of,
    confidence_column,
    failed_images,
    read_each,
    with_errors,
)

log = logging.getLogger(__name__)


def collect_images(inputs: Iterable[str | Path]) -> tuple[list[Path], bool]:
    """Image files from files and folders (folders searched recursively, sorted); True when a folder was given."""
    files: list[Path] = []
    had_folder = False
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            had_folder = True
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
    return files, had_folder


def _predict_files(predictor: Predictor, files: Sequence[Path], batch_size: int = 64) -> pd.DataFrame:
    """Decode (and fit to the model's size) at most one batch of files at a time, as the served model decodes a
    request, so both give the same tags; an unreadable file becomes an error row."""

    def read(path: Path) -> Image.Image:
        return resize_image(decode_image(path, name=path.name), *predictor.image_size)

    tables: list[pd.DataFrame] = []
    errors: list[str | None] = []
    for start in range(0, len(files), batch_size):
        images, batch_errors = read_each(files[start : start + batch_size], read)
        errors.extend(batch_errors)
        readable = [image for image in images if image is not None]
        if readable or not tables:  # an all-unreadable batch adds no rows; the first one still gives the columns
            tables.append(predictor.predict(readable, batch_size=batch_size))
    return with_errors(pd.concat(tables, ignore_index=True), errors)


def _predict_with_mlflow(model_uri: str, files: Sequence[Path]) -> pd.DataFrame:
    from mlflow.exceptions import MlflowException

    # Resolves models:/ URIs against this project's store even when MLFLOW_TRACKING_URI is unset.
    from fashion_tagger.core.tracking import load_model

    try:
        model = load_model(model_uri)
    except MlflowException as exc:
        raise FashionTaggerError(
            f"cannot load the model {model_uri!r}: {first_line(exc)}; give models:/NAME@ALIAS, models:/NAME/VERSION, "
            "runs:/RUN_ID/model or a model folder (`fashion-tagger models` lists versions and aliases)"
        ) from exc
    # Unreadable files are caught here, so the model only sees images (older models reject a whole batch).
    _, errors = read_each(files, lambda path: read_fitted(path, 64, 64, name=path.name))
    readable = [path for path, error in zip(files, errors, strict=True) if error is None]
    if not readable:
        return with_errors(pd.DataFrame(), errors)
    try:
        table = pd.DataFrame(model.predict(pd.DataFrame({"image": [path.read_bytes() for path in readable]})))
    except MlflowException as exc:
        raise FashionTaggerError(f"the model {model_uri!r} refused the images: {first_line(exc)}") from exc
    model_errors = table.pop(ERROR_COLUMN) if ERROR_COLUMN in table.columns else None
    out = with_errors(table, errors)
    if model_errors is not None:
        rows = [i for i, error in enumerate(errors) if error is None]
        out.loc[rows, ERROR_COLUMN] = model_errors.where(model_errors.notna(), None).tolist()
    return out


def draw_grid(files: Sequence[Path], table: pd.DataFrame, out_path: str | Path, *, columns: int = 4) -> Path:
    """The images with their predicted tags underneath (the reference notebook's external-image check)."""
    attributes = attributes_of(table)
    with image_grid(out_path, len(files), columns=columns, cell_height=4.2 + 0.17 * len(attributes)) as (_, cells):
        for ax, path, (_, row) in zip(cells, files, table.iterrows(), strict=False):
            if isinstance(row.get(ERROR_COLUMN), str):
                ax.imshow(Image.new("RGB", (240, 320), (235, 235, 235)))  # the same frame as a tagged image
                ax.text(0.5, 0.5, textwrap.fill(row[ERROR_COLUMN][:200], 34), transform=ax.transAxes, ha="center",
                        va="center", fontsize=7, color="darkred")
                tags = "(not tagged)"
            else:
                ax.imshow(read_fitted(path, 240, 320))
                tags = "\n".join(f"{a}: {row[a]} ({row[confidence_column(a)]:.2f})" for a in attributes)
            ax.set_title(path.name, fontsize=8)
            ax.text(0.5, -0.02, tags, transform=ax.transAxes, ha="center", va="top", fontsize=7,
                    family="monospace")
    return Path(out_path)


def run_predict(
    images: Sequence[str | Path],
    *,
    checkpoint: str | Path | None = None,
    model_uri: str | None = None,
    as_json: bool = False,
    out_csv: str | Path | None = None,
    grid: str | Path | None = None,
) -> pd.DataFrame:
    """Tag image files/folders with a checkpoint (or export/run dir) or an MLflow model URI.

    Prints a table (or JSON records) to stdout; writes a CSV to `out_csv`, by default predictions.csv in
    the working directory when a folder was given; draws a tagged grid PNG when `grid` is set.
    """
    if (checkpoint is None) == (model_uri is None):
        raise FashionTaggerError("give exactly one of checkpoint or model_uri")
    files, had_folder = collect_images(images)
    if model_uri is not None:
        table = _predict_with_mlflow(model_uri, files)
    elif checkpoint is not None:
        table = _predict_files(load_predictor(checkpoint), files)
    table.insert(0, "image", [str(path) for path in files])
    for column in table.columns:
        if column.endswith(CONFIDENCE_SUFFIX):
            table[column] = table[column].astype(float).round(4)
    if failed := failed_images(table):
        failures = table.loc[table[ERROR_COLUMN].notna(), ["image", ERROR_COLUMN]]
        log.warning("%d of %d images could not be read and have no tags:\n%s", failed, len(table),
                    "\n".join(f"  {row.image}: {row.error}" for row in failures.itertuples()))

    if out_csv is None and had_folder:
        out_csv = Path("predictions.csv")
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False)
        log.info("wrote %d predictions to %s", len(table), Path(out_csv).resolve())
    if as_json:
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")  # null, not NaN
        print(json.dumps(records, indent=2))
    else:
        print(table.astype(object).where(table.notna(), "").to_string(index=False))
    if grid is not None:
        log.info("drew %s", draw_grid(files, table, grid))
    return table
