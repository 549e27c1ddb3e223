"""The servable model: an MLflow pyfunc that tags raw product photos with the Lightning-free exported tagger.

Input is a DataFrame with a column `image` (JPEG/PNG bytes, or base64 text as it arrives in REST JSON) or
`path`; output is one column per attribute plus `<attribute>_confidence`, and `error`: null for a tagged row,
else why its image could not be read (that row's tags are null; the other rows are still tagged).

Paths are refused unless the server is started with `FASHION_TAGGER_SERVING_PATH_ROOTS` (folders, separated by
`:`): a client of `mlflow models serve` must not make the server open files of its choosing. Even then only regular
files below those folders are read, and a refused path gets the same answer whether or not it exists. Our inference
code travels with the model (`code_paths`), so `mlflow.pyfunc.load_model("models:/fashion-tagger@champion")`
needs no training code.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc import PythonModel
from PIL import Image

from fashion_tagger.core.errors import FashionTaggerError
from fashion_tagger.data.imaging import ImageReadError, decode_image, read_fitted
from fashion_tagger.serving.limits import DECODE_CHUNK, RequestTooLarge, ServingLimits
from fashion_tagger.serving.predictor import EXPORT_FILENAME, Predictor, default_device
from fashion_tagger.serving.rows import IMAGE_COLUMN, PATH_COLUMN, read_one, with_errors

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo
    from mlflow.models.signature import ModelSignature

# Set by MLflow's scoring server (`mlflow models serve`) in its process before it answers requests.
SERVING_FLAG_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
PATH_ROOTS_ENV = "FASHION_TAGGER_SERVING_PATH_ROOTS"  # folders a request may name files in; none by default
TAGGER_ARTIFACT = "tagger"  # key of the exported tagger (weights.pt + tagger.json) among the model's artifacts
# Pinned to what this environment has, so logging never probes the environment (slow) and serving matches it.
REQUIREMENTS = ("mlflow", "torch", "timm", "pillow", "pandas", "numpy")


MODEL_CODE = """\
import mlflow

from fashion_tagger.serving.pyfunc_model import TaggerModel

mlflow.models.set_model(TaggerModel())
"""


class InputError(MlflowException):
    """A request the model cannot read; the scoring server answers it with HTTP 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=BAD_REQUEST)


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        # Browsers and some clients send data URLs ("data:image/jpeg;base64,....").
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            return base64.b64decode(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageReadError(f"column '{IMAGE_COLUMN}' holds text that is not base64 ({exc})") from None
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if not isinstance(value, bytes):
        raise ImageReadError(
            f"column '{IMAGE_COLUMN}' must hold image bytes or base64 text, not {type(value).__name__}"
        )
    return value


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def path_roots_from_env() -> tuple[Path, ...]:
    """The folders below which the served model reads files a request names by path: $PATH_ROOTS_ENV, none by
    default. Each must be an existing folder (a typo must not silently allow nothing or everything)."""
    value = os.environ.get(PATH_ROOTS_ENV, "").strip()
    roots = []
    for part in filter(None, (item.strip() for item in value.split(os.pathsep))):
        root = Path(part).expanduser()
        if not root.is_absolute() or not root.is_dir():
            raise FashionTaggerError(f"${PATH_ROOTS_ENV}: {part!r} is not an existing absolute folder; give the "
                                     f"folders the server may read images from, separated by {os.pathsep!r}")
        roots.append(root.resolve())
    return tuple(roots)


def _allowed_file(path: str, roots: Sequence[Path]) -> str:
    """PATH when it is a regular file below one of ROOTS; otherwise an ImageReadError that says the same for a path
    that exists and one that does not (no oracle of the server's files), opening nothing."""
    if not roots:
        raise ImageReadError(f"paths are not accepted by this server: send the image's bytes in column "
                             f"'{IMAGE_COLUMN}' (a server started with {PATH_ROOTS_ENV}=<folders> reads files "
                             "below those folders)")
    resolved = Path(os.path.realpath(path)) if os.path.isabs(path) else None
    if resolved is None or not any(resolved.is_relative_to(root) for root in roots):
        raise ImageReadError(f"path {path!r} is not below the folders this server reads ({PATH_ROOTS_ENV})")
    try:
        mode = os.stat(resolved).st_mode
    except OSError:
        raise ImageReadError(f"path {path!r}: no such file below the folders this server reads") from None
    if not stat.S_ISREG(mode):  # a fifo or a device would block or stream forever
        raise ImageReadError(f"path {path!r} is not a regular file")
    return str(resolved)


def _decode(source: bytes | str, size: tuple[int, int] | None, name: str) -> Image.Image:
    return decode_image(source, name=name) if size is None else read_fitted(source, *size, name=name)


def _row_image(record: Any, has_image: bool, has_path: bool, path_roots: Sequence[Path] | None,
               limits: ServingLimits | None, size: tuple[int, int] | None, where: str) -> Image.Image:
    value = getattr(record, IMAGE_COLUMN) if has_image else None
    if not _is_missing(value):
        data = _image_bytes(value)
        if limits is not None:
            limits.check_pixels(data, where)
        return _decode(data, size, "image bytes")
    path = getattr(record, PATH_COLUMN) if has_path else None
    if _is_missing(path) or not str(path):
        raise ImageReadError(f"neither '{IMAGE_COLUMN}' nor '{PATH_COLUMN}' is set")
    if path_roots is not None:
        path = _allowed_file(str(path), path_roots)
    if limits is not None:
        limits.check_pixels(str(path), where)
    return _decode(str(path), size, f"path {str(path)!r}")


def read_rows(
    frame: pd.DataFrame, path_roots: Sequence[Path] | None = (), limits: ServingLimits | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[list[Image.Image | None], list[str | None]]:
    """Each row's image from `image` (preferred) or `path`, or None and why it could not be read ("row 3: ...").
    SIZE (width, height): fitted into it as `prepare` fits the training images (a JPEG decoded at the smallest DCT
    scale that still covers it), instead of decoded whole.

    PATH_ROOTS: the folders a `path` may point into (the default, none, refuses every path; None is for this
    process's own trusted callers and reads any path). A frame with neither column is an InputError (HTTP 400):
    no row of it could ever be read.
    """
    has_image, has_path = IMAGE_COLUMN in frame.columns, PATH_COLUMN in frame.columns
    if not (has_image or has_path):
        raise InputError(
            f"input needs a column '{IMAGE_COLUMN}' (JPEG/PNG bytes or base64) or '{PATH_COLUMN}'; "
            f"got columns {list(frame.columns)}"
        )
    images: list[Image.Image | None] = []
    errors: list[str | None] = []
    for row, record in zip(frame.index, frame.itertuples(index=False), strict=True):
        where = f"row {row}"
        image, error = read_one(partial(_row_image, record, has_image, has_path, path_roots, limits, size, where),
                                where=where)
        images.append(image)
        errors.append(error)
    return images, errors


def images_from_frame(frame: pd.DataFrame, path_roots: Sequence[Path] | None = ()) -> list[Image.Image]:
    """Decode each row's `image` (preferred) or `path` (`read_rows`); the first row that cannot be read is an
    InputError."""
    images, errors = read_rows(frame, path_roots)
    if problems := [error for error in errors if error is not None]:
        raise InputError(problems[0])
    return [image for image in images if image is not None]


def tag_frame(predictor: Predictor, frame: pd.DataFrame, path_roots: Sequence[Path] | None = (),
              limits: ServingLimits | None = None) -> pd.DataFrame:
    """The model's answer to FRAME: tags and confidences per readable row, `error` for the others (paths as
    `read_rows` allows them). Each image is read fitted into the model's input size, exactly as the training
    images were prepared; rows are read and tagged DECODE_CHUNK at a time, so memory holds one chunk's images.
    LIMITS (the served model's) refuse a request too large as a whole with RequestTooLarge."""
    if limits is not None:
        limits.check_rows(len(frame))
        if IMAGE_COLUMN in frame.columns:
            limits.check_bytes(frame[IMAGE_COLUMN])
    parts, any_error = [], False
    for start in range(0, max(len(frame), 1), DECODE_CHUNK):
        images, errors = read_rows(frame.iloc[start : start + DECODE_CHUNK], path_roots, limits,
                                   predictor.image_size)
        any_error = any_error or any(errors)
        parts.append(with_errors(predictor.predict([image for image in images if image is not None]), errors))
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    if any_error:
        out = out.astype(object).where(out.notna(), None)  # JSON null for the untagged rows, not NaN
    out.index = frame.index
    return out


class TaggerModel(PythonModel):
    """pyfunc wrapper of `fashion_tagger.serving.predictor.Predictor` loaded from the exported tagger artifact."""

    def load_context(self, context: Any) -> None:
        # Default: the GPU when there is one; FASHION_TAGGER_DEVICE=cpu keeps a server off a shared GPU.
        self.predictor = Predictor.from_export(context.artifacts[TAGGER_ARTIFACT], device=default_device())
        self.path_roots = path_roots_from_env()
        self.limits = ServingLimits.from_env()

    # A DataFrame hint is one MLflow derives no schema from: the logged signature stays the only one.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        # The limits guard the server; this process's own callers (evaluation, the gate) batch their work.
        limits = getattr(self, "limits", None) if os.environ.get(SERVING_FLAG_ENV) == "true" else None
        try:
            return tag_frame(self.predictor, frame, getattr(self, "path_roots", ()), limits)
        except RequestTooLarge as exc:
            raise InputError(str(exc)) from None


def exported_tagger(model_dir: str | Path) -> Path:
    """Where a downloaded model of ours keeps the exported tagger (its `tagger` artifact)."""
    import yaml

    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        relative = (flavor.get("artifacts") or {}).get(TAGGER_ARTIFACT, {}).get("path")
        if relative and (model_dir / relative / EXPORT_FILENAME).is_file():
            return model_dir / relative
    found = sorted(model_dir.rglob(EXPORT_FILENAME))
    if not found:
        raise FashionTaggerError(f"the model in {model_dir} holds no exported tagger ({EXPORT_FILENAME}): it was not "
                                 "logged by `fashion-tagger register`")
    return found[0].parent


def _requirement(package: str) -> str | None:
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return f"{package}=={version.split('+')[0]}"  # drop local tags like +cu130: any build of the version will do


def pip_requirements(extra: Sequence[str] = ()) -> list[str]:
    return [req for pkg in (*REQUIREMENTS, *extra) if (req := _requirement(pkg))]


def model_signature(example_output: pd.DataFrame) -> ModelSignature:
    """Inputs: optional `image` (binary: base64 in JSON, decoded by the server) and `path` (string)."""
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("binary", IMAGE_COLUMN, required=False), ColSpec("string", PATH_COLUMN, required=False)])
    outputs = infer_signature(model_output=example_output).outputs
    return ModelSignature(inputs=inputs, outputs=outputs)


def _stage_code(into: Path) -> Path:
    """A clean copy of the fashion_tagger package (no caches) to ship as the model's code."""
    package = Path(__file__).resolve().parents[1]  # fashion_tagger/, not serving/
    target = into / package.name
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def example_image_bytes(width: int = 60, height: int = 80) -> bytes:
    """A small white JPEG with a grey product-like block: the logged input example."""
    image = Image.new("RGB", (width, height), "white")
    image.paste((90, 90, 110), (width // 5, height // 6, width - width // 5, height - height // 6))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def log_tagger_model(
    export_dir: str | Path,
    *,
    name: str = "model",
    example_image: bytes | None = None,
    registered_model_name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ModelInfo:
    """Log the exported tagger in EXPORT_DIR as a pyfunc model into the active run (start one in our experiment
    first: without a run MLflow files the model under its Default experiment, whose artifacts land in ./mlruns).

    The signature's output comes from predicting the input example with the export itself, so what is
    declared is what the model returns.
    """
    export_dir = Path(export_dir)
    example = pd.DataFrame({IMAGE_COLUMN: [example_image or example_image_bytes()]})
    example_output = tag_frame(Predictor.from_export(export_dir), example)
    with tempfile.TemporaryDirectory(prefix="fashion-tagger-code-") as tmp:
        code_dir = _stage_code(Path(tmp))
        # Models from code: MLflow stores this script instead of a pickled object and runs it on load.
        entry = Path(tmp) / "tagger_model.py"
        entry.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(entry),
            artifacts={TAGGER_ARTIFACT: str(export_dir)},
            code_paths=[str(code_dir)],
            signature=model_signature(example_output),
            input_example=example,
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            params=params,
            tags=tags,
            metadata=metadata,
        )
