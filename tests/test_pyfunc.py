"""The servable pyfunc model: raw JPEG/PNG bytes, base64 text or paths in, one tag and confidence per attribute
out; loadable from the registry without the training code and answering `mlflow models serve` over REST."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tagger_fixtures import draw, jpeg_bytes, make_run, make_split, tiny_config

from fashion_tagger.core import tracking
from fashion_tagger.serving.limits import ServingLimits
from fashion_tagger.serving.predictor import Predictor
from fashion_tagger.serving.pyfunc_model import SERVING_FLAG_ENV, InputError, images_from_frame, log_tagger_model

ATTRIBUTE_COLUMNS = ["masterCategory", "masterCategory_confidence", "baseColour", "baseColour_confidence"]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_are_read_from_bytes_base64_data_urls_and_paths(tmp_path):
    rng = np.random.default_rng(0)
    image = draw("Apparel", "Red", rng)
    jpeg = jpeg_bytes(image)
    (tmp_path / "a.jpg").write_bytes(jpeg)
    b64 = base64.b64encode(jpeg).decode()
    frame = pd.DataFrame({
        "image": [jpeg, b64, f"data:image/jpeg;base64,{b64}", _png_bytes(image.convert("RGBA")), None],
        "path": [None, None, None, None, str(tmp_path / "a.jpg")],
    })
    images = images_from_frame(frame, path_roots=(tmp_path.resolve(),))
    assert [im.mode for im in images] == ["RGB"] * 5 and {im.size for im in images} == {(32, 40)}
    decoded = np.asarray(images[0])
    assert all(np.array_equal(decoded, np.asarray(im)) for im in (images[1], images[2], images[4]))
    assert np.abs(np.asarray(images[3]).astype(int) - np.asarray(image).astype(int)).max() == 0  # lossless PNG


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"picture": [b"x"]}), "needs a column 'image'"),
        (pd.DataFrame({"image": [b"not an image"]}), "row 0: cannot read image bytes"),
        (pd.DataFrame({"image": ["%%% not base64 %%%"]}), "holds text that is not base64"),
        (pd.DataFrame({"image": [None], "path": [None]}), "row 0: neither 'image' nor 'path' is set"),
        (pd.DataFrame({"path": ["/nonexistent/x.jpg"]}), "paths are not accepted by this server"),
        (pd.DataFrame({"image": [12]}), "must hold image bytes or base64 text"),
    ],
)
def test_unreadable_input_is_a_bad_request(frame, message):
    with pytest.raises(InputError, match=message) as info:
        images_from_frame(frame)
    assert info.value.get_http_status_code() == 400


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A probe tagger exported, logged as a pyfunc model and registered with alias champion."""
    root = tmp_path_factory.mktemp("pyfunc")
    config = tiny_config(home=root / "home", tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    split = make_split(root / "split")
    run_dir = make_run(root / "run", split, "probe", config)
    export_dir = Predictor.from_checkpoint(run_dir / "checkpoints" / "best.ckpt").export(root / "export")
    with tracking.tracking_session(config) as client:
        with mlflow.start_run(experiment_id=tracking.ensure_experiment(client, config)):
            info = log_tagger_model(export_dir, name="model")
        version = mlflow.register_model(info.model_uri, "tagger")
        client.set_registered_model_alias("tagger", "champion", version.version)
    return {"config": config, "export_dir": export_dir, "split": split, "uri": "models:/tagger@champion",
            "tracking_uri": config.tracking_uri}


def _split_images(split: Path, count: int = 6) -> list[Path]:
    return sorted((split / "images").glob("*.jpg"))[::4][:count]


def test_registered_model_tags_raw_jpeg_bytes_and_base64_like_the_export(registered, monkeypatch):
    files = _split_images(registered["split"])
    # Paths only below the folders the server was started with (FASHION_TAGGER_SERVING_PATH_ROOTS).
    monkeypatch.setenv("FASHION_TAGGER_SERVING_PATH_ROOTS", str(files[0].parent))
    model = tracking.load_model(registered["uri"], registered["config"])
    raw = [path.read_bytes() for path in files]
    expected = Predictor.from_export(registered["export_dir"]).predict([Image.open(path) for path in files])

    from_bytes = model.predict(pd.DataFrame({"image": raw}))
    from_base64 = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in raw]}))
    from_paths = model.predict(pd.DataFrame({"path": [str(p) for p in files]}))
    assert list(from_bytes.columns) == [*ATTRIBUTE_COLUMNS, "error"]
    for table in (from_bytes, from_base64, from_paths):
        assert table["error"].isna().all()
        pd.testing.assert_frame_equal(table.drop(columns="error").reset_index(drop=True), expected,
                                      check_exact=False, atol=1e-5)
    # The probe model really tags: block shape -> masterCategory, colour -> baseColour.
    truth = pd.read_parquet(registered["split"] / "val.parquet").set_index("image_path")
    assert from_bytes["baseColour"].tolist() == truth.loc[[str(p) for p in files], "baseColour"].tolist()

    signature = model.metadata.get_input_schema()
    assert signature.input_names() == ["image", "path"] and not signature.required_input_names()


def test_model_carries_its_inference_code(registered, tmp_path):
    with tracking.tracking_session(registered["config"]):
        model_dir = Path(mlflow.artifacts.download_artifacts(registered["uri"], dst_path=str(tmp_path)))
    assert (model_dir / "code" / "fashion_tagger" / "serving" / "predict.py").is_file()
    assert (model_dir / "artifacts" / "export" / "tagger.json").is_file()
    assert not list((model_dir / "code").rglob("__pycache__"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_served_model_opens_no_path_a_client_names(registered, tmp_path, monkeypatch):
    """With the default settings a path is refused without being opened (a fifo would block a worker forever); with
    allowed folders, a path outside them gets the same answer whether it exists or not, and only regular files are
    read."""
    fifo = tmp_path / "allowed" / "pipe.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    inside = fifo.parent / "photo.jpg"
    inside.write_bytes(_split_images(registered["split"])[0].read_bytes())
    asked = ["/etc/hostname", "/no/such/file", "/root/.bashrc", str(fifo), str(inside)]

    monkeypatch.delenv("FASHION_TAGGER_SERVING_PATH_ROOTS", raising=False)
    model = tracking.load_model(registered["uri"], registered["config"])
    started = time.monotonic()
    out = model.predict(pd.DataFrame({"path": asked}))
    assert time.monotonic() - started < 30  # the fifo was never opened
    for row, error in enumerate(out["error"]):
        assert error.startswith(f"row {row}: paths are not accepted by this server: send the image's bytes"), error
    assert out["baseColour"].isna().all()

    monkeypatch.setenv("FASHION_TAGGER_SERVING_PATH_ROOTS", str(fifo.parent))
    model = tracking.load_model(registered["uri"], registered["config"])
    out = model.predict(pd.DataFrame({"path": [*asked, str(fifo.parent / ".." / ".." / "etc" / "passwd")]}))
    errors = out["error"].tolist()
    outside = [e.replace(repr(path), "PATH") for e, path in zip(errors[:3], asked[:3], strict=True)]
    assert len({e.split(": ", 1)[1] for e in outside}) == 1, outside  # existing or not: the same answer
    assert "is not below the folders this server reads" in outside[0]
    assert "is not below the folders" in errors[5]  # `..` cannot climb out
    assert errors[3] == f"row 3: path {str(fifo)!r} is not a regular file"
    assert errors[4] is None and out.loc[4, "baseColour"] is not None

    monkeypatch.setenv("FASHION_TAGGER_SERVING_PATH_ROOTS", "relative/folder")
    with pytest.raises(Exception, match="FASHION_TAGGER_SERVING_PATH_ROOTS: 'relative/folder' is not an existing"):
        tracking.load_model(registered["uri"], registered["config"])


def huge_png(side: int) -> bytes:
    """A valid grayscale PNG of SIDE x SIDE black pixels (SIDE=30,000: 900 megapixels in under 1 MB), compressed
    row by row so the pixels never exist in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []  # filter byte 0, then the row
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8 bits, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_serving_limits_read_from_the_environment_and_refuse_each_kind_of_oversized_request():
    assert ServingLimits.from_env({}) == ServingLimits(256, 32 * 2**20, 40_000_000)
    limits = ServingLimits.from_env({"FASHION_TAGGER_SERVING_MAX_ROWS": "3",
                                     "FASHION_TAGGER_SERVING_MAX_REQUEST_MB": "1",
                                     "FASHION_TAGGER_SERVING_MAX_MEGAPIXELS": "0.5"})
    assert limits == ServingLimits(3, 2**20, 500_000)
    for value in ("0", "-1", "many"):
        with pytest.raises(Exception, match=rf"\$FASHION_TAGGER_SERVING_MAX_ROWS={value!r}: give a positive number"):
            ServingLimits.from_env({"FASHION_TAGGER_SERVING_MAX_ROWS": value})
    with pytest.raises(Exception, match="the request has 4 rows; this server tags at most 3 per request"):
        limits.check_rows(4)
    with pytest.raises(Exception, match=r"holds 2.0 MB of images; this server takes at most 1.0 MB"):
        limits.check_bytes([b"x" * 2**20, base64.b64encode(b"y" * 2**20).decode()])
    big = _png_bytes(Image.new("L", (1000, 1000)))
    with pytest.raises(Exception, match=r"row 7: the image is 1,000 x 1,000 = 1 megapixels; .* at most 0"):
        limits.check_pixels(big, "row 7")
    limits.check_pixels(b"not an image", "row 0")  # left to decoding, which reports it as the row's error


def test_the_served_model_refuses_oversized_requests_and_this_process_is_not_limited(registered, monkeypatch):
    jpeg = _split_images(registered["split"])[0].read_bytes()
    monkeypatch.setenv("FASHION_TAGGER_SERVING_MAX_ROWS", "3")
    model = tracking.load_model(registered["uri"], registered["config"])
    frame = pd.DataFrame({"image": [jpeg] * 40})
    assert model.predict(frame)["error"].isna().all()  # evaluation and the gate: their own batches, no limit
    monkeypatch.setenv(SERVING_FLAG_ENV, "true")  # as in `mlflow models serve`
    with pytest.raises(InputError, match="the request has 40 rows; this server tags at most 3 per request"):
        model.predict(frame)
    assert model.predict(frame.iloc[:3])["error"].isna().all()


@pytest.mark.slow
def test_mlflow_models_serve_scores_a_jpeg_over_rest(registered, tmp_path):
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # Serving must not need the training code: in the server, importing Lightning fails.
    blocker = tmp_path / "no_lightning"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['lightning'] = None\n"
                                              "sys.modules['pytorch_lightning'] = None\n")
    blocked = subprocess.run([sys.executable, "-c", "import lightning"], env={**os.environ, "PYTHONPATH": str(blocker)},
                             capture_output=True)
    assert blocked.returncode != 0
    # The CLI execs `uvicorn` by name: the venv's bin must be on PATH, as it is in an activated venv.
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking_uri"], "PYTHONPATH": str(blocker),
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_file = (tmp_path / "serve.log").open("wb")
    # Its own process group: the CLI starts a web server with workers, all stopped together below.
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", registered["uri"], "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not come up: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(1)

        jpeg = _split_images(registered["split"])[0].read_bytes()
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        rows = answer["predictions"]
        assert len(rows) == 1 and set(rows[0]) == {*ATTRIBUTE_COLUMNS, "error"} and rows[0]["error"] is None
        expected = Predictor.from_export(registered["export_dir"]).predict([Image.open(io.BytesIO(jpeg))])
        assert rows[0]["baseColour"] == expected.loc[0, "baseColour"]
        assert rows[0]["baseColour_confidence"] == pytest.approx(expected.loc[0, "baseColour_confidence"], abs=1e-5)

        # An unreadable image is a row with an error; the readable one beside it is still tagged.
        mixed = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not a jpeg").decode()],
                                                                    [base64.b64encode(jpeg).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(mixed).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            failed, tagged = json.loads(response.read())["predictions"]
        assert "row 0: cannot read image bytes" in failed["error"] and failed["baseColour"] is None
        assert tagged["error"] is None and tagged["baseColour"] == expected.loc[0, "baseColour"]

        # A request without an image or path column cannot be read at all: HTTP 400.
        bad = {"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(bad).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        assert error.value.code == 400

        # Oversized requests: a clear 400 each, and the server goes on answering.
        def post(rows: list[list[str]]) -> tuple[int, str]:
            body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as refused:
                return refused.code, refused.read().decode()

        small = base64.b64encode(jpeg).decode()
        oversized = {
            "10,000 rows": ([[small]] * 10_000, "the request has 10,000 rows; this server tags at most 256"),
            "a 50 MB body": ([[base64.b64encode(os.urandom(38 * 2**20)).decode()]], "MB of images; this server "
                             "takes at most 32.0 MB per request"),
            "a 30,000 x 30,000 PNG": ([[base64.b64encode(huge_png(30_000)).decode()]], "row 0: the image is too "
                                      "large to decode"),
        }
        for what, (rows, message) in oversized.items():
            status, text = post(rows)
            assert status == 400 and message in text, (what, status, text[:500])
        status, text = post([[small]])
        assert status == 200 and json.loads(text)["predictions"][0]["error"] is None
    finally:
        _stop_group(server)
        log_file.close()


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def test_a_model_registered_before_the_subpackages_still_loads_in_this_process(registered, tmp_path, monkeypatch):
    """Models logged by the flat package name `fashion_tagger.pyfunc_model` in their code; the gate loads such a
    champion in a process that has imported this package, so that name must still resolve."""
    from fashion_tagger.serving import pyfunc_model

    legacy_code = pyfunc_model.MODEL_CODE.replace("fashion_tagger.serving.pyfunc_model", "fashion_tagger.pyfunc_model")
    assert "from fashion_tagger.pyfunc_model import TaggerModel" in legacy_code
    monkeypatch.setattr(pyfunc_model, "MODEL_CODE", legacy_code)
    with tracking.tracking_session(registered["config"]):
        with mlflow.start_run(experiment_id=tracking.ensure_experiment(mlflow.MlflowClient(), registered["config"])):
            info = log_tagger_model(registered["export_dir"], name="legacy")
        model = mlflow.pyfunc.load_model(info.model_uri)
    files = _split_images(registered["split"], count=2)
    tags = model.predict(pd.DataFrame({"image": [path.read_bytes() for path in files]}))
    expected = Predictor.from_export(registered["export_dir"]).predict([Image.open(path) for path in files])
    assert tags["error"].isna().all()
    pd.testing.assert_frame_equal(tags.drop(columns="error"), expected, check_exact=False, atol=1e-5)
