"""Prediction: tags and confidences for raw JPEGs, the grid, the CLI, and an export that predicts identically."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from PIL import Image
from tagger_helpers import make_split, product_image, tiny_config
from typer.testing import CliRunner

from fashion_tagger.data.imaging import resize_image
from fashion_tagger.serving.predict import run_predict
from fashion_tagger.serving.predictor import EXPORT_FILENAME, WEIGHTS_FILENAME, Predictor, load_predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fashion_tagger.training.train import train_model

    root = tmp_path_factory.mktemp("predict")
    split_dir = make_split(root)
    return train_model(tiny_config(epochs=1), split_dir=split_dir, run_dir=root / "run").best_checkpoint


@pytest.fixture
def photos(tmp_path):
    """Two 'raw' photos at another size and aspect than the training images, one of them grayscale."""
    folder = tmp_path / "photos"
    folder.mkdir()
    product_image("Red", "Apparel", 1).resize((120, 200)).save(folder / "red-shirt.jpg", quality=90)
    product_image("Blue", "Footwear", 2).convert("L").resize((160, 160)).save(folder / "shoe.jpg", quality=90)
    return folder


def test_predictor_tags_raw_images(checkpoint, photos):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert predictor.image_size == (32, 40)
    assert not predictor.model.training
    images = [Image.open(p) for p in sorted(photos.iterdir())]
    table = predictor.predict(images)
    assert list(table.columns) == [
        "masterCategory", "masterCategory_confidence", "baseColour", "baseColour_confidence"
    ]
    assert len(table) == 2
    for attribute in predictor.attributes:
        assert set(table[attribute]) <= set(predictor.label_space.classes[attribute])
        assert table[f"{attribute}_confidence"].between(0, 1).all()


def test_raw_image_preprocessing_matches_prepare(checkpoint, photos):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    with Image.open(photos / "red-shirt.jpg") as image:
        tensor = predictor.transform(image)
    with Image.open(photos / "red-shirt.jpg") as image:
        prepared = resize_image(image, 32, 40)
    assert tensor.shape == (3, 40, 32)
    pixels = torch.tensor(list(prepared.getdata()), dtype=torch.float32).T.reshape(3, 40, 32) / 255
    mean, std = torch.tensor(predictor.mean)[:, None, None], torch.tensor(predictor.std)[:, None, None]
    torch.testing.assert_close(tensor, (pixels - mean) / std)
    # Padding is white, as in the prepared cache.
    assert prepared.getpixel((0, 0)) == (255, 255, 255)


def test_export_round_trip_predicts_the_same(checkpoint, photos, tmp_path):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    export_dir = predictor.export(tmp_path / "export")
    assert (export_dir / WEIGHTS_FILENAME).is_file()
    spec = json.loads((export_dir / EXPORT_FILENAME).read_text())
    assert spec["model"]["backbone"] == "test_efficientnet"
    assert (spec["image"]["width"], spec["image"]["height"]) == (32, 40)

    exported = Predictor.from_export(export_dir, device="cpu")
    images = [Image.open(p) for p in sorted(photos.iterdir())]
    pd.testing.assert_frame_equal(exported.predict(images), predictor.predict(images))
    batch = predictor.preprocess(images)
    for attribute, probs in predictor.predict_probabilities(batch).items():
        torch.testing.assert_close(exported.predict_probabilities(batch)[attribute], probs)
    assert isinstance(load_predictor(export_dir), Predictor)
    assert load_predictor(checkpoint.parent.parent).label_space == predictor.label_space


def test_run_predict_prints_writes_csv_and_draws_grid(checkpoint, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "grid.png"
    table = run_predict([photos], checkpoint=checkpoint, grid=grid)
    printed = capsys.readouterr().out
    assert "red-shirt.jpg" in printed and "baseColour" in printed
    # A folder as input gives a CSV (by default in the working directory).
    csv = pd.read_csv(tmp_path / "predictions.csv")
    assert csv["image"].tolist() == table["image"].tolist() == [str(photos / "red-shirt.jpg"), str(photos / "shoe.jpg")]
    with Image.open(grid) as image:
        assert image.width > 300 and image.height > 300

    run_predict([photos / "shoe.jpg"], checkpoint=checkpoint, as_json=True)
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 1 and records[0]["image"].endswith("shoe.jpg")
    assert 0 <= records[0]["masterCategory_confidence"] <= 1


def test_cli_predict(checkpoint, photos, tmp_path):
    from fashion_tagger.cli import app

    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["predict", str(photos / "shoe.jpg"), "--checkpoint", str(checkpoint),
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == 1


def test_missing_image_is_a_clear_error(checkpoint, tmp_path):
    from fashion_tagger.core.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        run_predict([tmp_path / "nope.jpg"], checkpoint=checkpoint)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        run_predict([tmp_path / "empty"], checkpoint=checkpoint)


def test_model_uri_sends_jpeg_bytes_to_the_registered_model(photos, monkeypatch, capsys):
    import fashion_tagger.core.tracking

    received = {}

    class FakePyfunc:
        def predict(self, frame):
            received["frame"] = frame
            n = len(frame)
            return pd.DataFrame({"masterCategory": ["Footwear"] * n, "masterCategory_confidence": [0.9] * n})

    def load_model(uri):
        received["uri"] = uri
        return FakePyfunc()

    monkeypatch.setattr(fashion_tagger.core.tracking, "load_model", load_model)
    table = run_predict([photos / "shoe.jpg"], model_uri="models:/fashion-tagger@champion", as_json=True)
    assert received["uri"] == "models:/fashion-tagger@champion"
    assert received["frame"]["image"].tolist() == [(photos / "shoe.jpg").read_bytes()]
    assert table.columns.tolist() == ["image", "masterCategory", "masterCategory_confidence", "error"]
    assert table["error"].isna().all()
    assert json.loads(capsys.readouterr().out)[0]["masterCategory"] == "Footwear"
