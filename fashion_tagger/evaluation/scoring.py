"""The one scoring path of evaluate and the promotion gate, so that one model gets one score on one set.

A split part's images are read as serving reads them: the original files (the prepared cache copy only when an
original is gone, in both callers), decoded and preprocessed by `pyfunc_model.tag_frame` (the pyfunc model's own
code: the `data.imaging` decode and preprocessing, softmax), answered as class names, mapped onto the split's by name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fashion_tagger.core.errors import RunError
from fashion_tagger.core.io import sha256_file
from fashion_tagger.core.layout import SplitDir, cached_image_path
from fashion_tagger.core.schema import IGNORE_INDEX
from fashion_tagger.data.cache import read_prepared
from fashion_tagger.data.labels import LabelSpace, label_column
from fashion_tagger.serving.rows import IMAGE_COLUMN

log = logging.getLogger(__name__)


@dataclass
class ScoringSet:
    """The images of one split part and their true labels, as evaluate and the gate feed them to every model."""

    part: str
    frame: pd.DataFrame  # the part's rows (id, image_sha256, raw attribute columns, encoded labels)
    paths: list[str]
    y_true: dict[str, np.ndarray]
    labels: LabelSpace
    split_hash: str
    from_cache: int = 0  # images read from the prepared copy because the original is gone


def scoring_set(split_dir: str | Path, part: str = "test") -> ScoringSet:
    """PART's rows of the split: original images where they still exist, else the prepared cache copy."""
    split = SplitDir(Path(split_dir))
    path = split.part(part)
    if not path.is_file():
        hint = " (a split written before the test part existed: run the split stage again)" if part == "test" else ""
        raise RunError(f"{path} does not exist: scoring needs the {part} part of the split{hint}")
    labels = LabelSpace.load(split.labels)
    frame = pd.read_parquet(path)
    prepared = read_prepared(split.dir) if split.prepared.is_file() else None
    shas = frame["image_sha256"] if "image_sha256" in frame.columns else [None] * len(frame)
    paths, from_cache = [], 0
    for original, sha in zip(frame["image_path"], shas, strict=True):
        if isinstance(original, str) and original and Path(original).is_file():
            paths.append(original)
        elif prepared and isinstance(sha, str):
            paths.append(str(cached_image_path(prepared["cache_root"], sha, prepared["width"], prepared["height"])))
            from_cache += 1
        else:
            raise RunError(f"{part} image {original} is gone and has no prepared copy; re-run fetch/prepare for "
                           f"the split {split.dir}")
    if from_cache:
        log.warning("%d of %d %s images are gone: scored from their prepared copies", from_cache, len(paths), part)
    y_true = {a: frame[label_column(a)].to_numpy(dtype=np.int64) for a in labels.attributes}
    return ScoringSet(part=part, frame=frame, paths=paths, y_true=y_true, labels=labels, split_hash=sha256_file(path),
                      from_cache=from_cache)


class PredictorModel:
    """A `Predictor` behind the pyfunc model's `predict(frame)`: the serving code without an MLflow round trip."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        from fashion_tagger.serving.pyfunc_model import tag_frame

        return tag_frame(self.predictor, frame)


def _image_bytes(path: str) -> bytes:
    """The file's bytes; an unreadable file sends none, which the model reports as that row's error."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return b""


def predict_paths(model: Any, paths: Sequence[str], batch_size: int, desc: str = "scoring") -> pd.DataFrame:
    """Run a model with the pyfunc interface (a loaded pyfunc or a `PredictorModel`) over image paths in batches."""
    from tqdm.auto import tqdm

    from fashion_tagger.core.progress import log_progress

    parts = []
    batches = tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False, disable=None)
    for start in log_progress(batches, total=len(batches), what=desc, unit="batches"):  # a line every 30 s
        # The bytes, as a remote client sends them: a served model reads no path it is given (pyfunc_model).
        batch = pd.DataFrame({IMAGE_COLUMN: [_image_bytes(path) for path in paths[start : start + batch_size]]})
        parts.append(model.predict(batch))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def encode_predictions(predictions: pd.DataFrame, labels: LabelSpace) -> dict[str, np.ndarray]:
    """Class names -> indices of LABELS; names (or whole attributes) it does not know become IGNORE_INDEX,
    which never matches a true label, so a model is not rewarded for classes the split does not score."""
    encoded = {}
    for attribute, names in labels.classes.items():
        if attribute not in predictions.columns:
            encoded[attribute] = np.full(len(predictions), IGNORE_INDEX, dtype=np.int64)
            continue
        lookup = {name: i for i, name in enumerate(names)}
        encoded[attribute] = np.array([lookup.get(str(v), IGNORE_INDEX) for v in predictions[attribute]],
                                      dtype=np.int64)
    return encoded
