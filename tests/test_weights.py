"""Offline ImageNet weights: the package's EfficientNet-Lite0 converted for timm, named sources, the CLI command.

The real-data test checks the converted network against reality: its ImageNet top-5 on real product photos.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from fashion_tagger.core.config import load_config
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.model.weights import (
    LITE0_ARCHITECTURE,
    WeightsError,
    convert_lite0,
    export_timm,
    lite0_package_file,
    named_weights_path,
    resolve_pretrained_path,
    write_weights,
)
from fashion_tagger.training.module import build_model

LITE0_TENSORS = 296


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory):
    return convert_lite0(tmp_path_factory.mktemp("weights") / "lite0.safetensors")


def imagenet_lite0(path) -> torch.nn.Module:
    """tf_efficientnet_lite0 with its ImageNet classifier, loaded from PATH the way the tagger loads weights."""
    return timm.create_model(LITE0_ARCHITECTURE, pretrained=True, pretrained_cfg_overlay={"file": str(path)})


def test_conversion_maps_every_tensor_by_position_with_equal_values(lite0_file):
    assert (lite0_file.tensors, lite0_file.architecture) == (LITE0_TENSORS, LITE0_ARCHITECTURE)
    source = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    converted = load_file(lite0_file.path)
    loaded = imagenet_lite0(lite0_file.path).state_dict()
    assert sorted(converted) == sorted(loaded) and len(source) == LITE0_TENSORS
    for (src_name, src), (name, tensor) in zip(source.items(), loaded.items(), strict=True):
        assert tensor.shape == src.shape and torch.equal(tensor, src.to(tensor.dtype)), (src_name, name)
    # A few pairs by name, so that the order itself is checked, not only that both sides have one.
    assert torch.equal(loaded["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(loaded["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(loaded["classifier.bias"], source["_fc.bias"])


def test_a_tensor_that_does_not_fit_is_named(tmp_path):
    source = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    source["_blocks.3._project_conv.weight"] = torch.zeros(7, 7, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(source, bad)
    with pytest.raises(WeightsError, match=r"tensor \d+ _blocks\.3\._project_conv\.weight \(7, 7, 1, 1\) does not fit"):
        convert_lite0(tmp_path / "out.safetensors", package_file=bad)
    del source["_fc.bias"]
    torch.save(source, bad)
    with pytest.raises(WeightsError, match="holds 295 tensors but tf_efficientnet_lite0 has 296"):
        convert_lite0(tmp_path / "out.safetensors", package_file=bad)
    assert not (tmp_path / "out.safetensors").exists()


def test_named_source_is_converted_on_first_use_and_feeds_the_tagger(tmp_path, lite0_file):
    home = tmp_path / "home"
    path = resolve_pretrained_path("imagenet-lite0", LITE0_ARCHITECTURE, home)
    assert path == str(named_weights_path(home)) and named_weights_path(home).is_file()
    assert resolve_pretrained_path("/some/file.safetensors", "efficientnet_b3", home) == "/some/file.safetensors"
    with pytest.raises(WeightsError, match="not efficientnet_b3.*model.pretrained=false"):
        resolve_pretrained_path("imagenet-lite0", "efficientnet_b3", home)

    labels = LabelSpace({"gender": ("Men", "Women")}, min_class_count=1)
    config = load_config(None, {"home": str(home), "labels": {"attributes": ["gender"]},
                                "model": {"backbone": LITE0_ARCHITECTURE, "pretrained_path": "imagenet-lite0"}})
    pretrained = build_model(config, labels, pretrained=True).backbone.state_dict()
    expected = load_file(lite0_file.path)
    assert all(torch.equal(pretrained[k], expected[k]) for k in pretrained)  # the backbone, without the classifier
    # model.pretrained=false means from scratch, whatever pretrained_path names.
    config.model.pretrained = False
    scratch = build_model(config, labels, pretrained=True).backbone.state_dict()
    assert not torch.equal(scratch["conv_stem.weight"], expected["conv_stem.weight"])


def test_timm_pretrained_weights_are_written_for_air_gapped_workers(tmp_path, monkeypatch):
    """The hub is unreachable here: timm.create_model is replaced by a local model, so the write path is what
    is tested, not a download."""
    local = timm.create_model("test_efficientnet", pretrained=False)
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return local

    monkeypatch.setattr(timm, "create_model", create_model)
    result = write_weights("test_efficientnet.r160_in1k", tmp_path)
    assert calls == [("test_efficientnet.r160_in1k", True)]
    assert result.path == tmp_path / "weights" / "test_efficientnet.r160_in1k.imagenet.safetensors"
    written = load_file(result.path)
    assert sorted(written) == sorted(local.state_dict()) and result.tensors == len(written)
    assert all(torch.equal(written[k], v) for k, v in local.state_dict().items())
    again = write_weights("test_efficientnet.r160_in1k", tmp_path)
    assert (again.created, again.tensors, again.parameters) == (False, result.tensors, result.parameters)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="on a machine that reaches the hub"):
        export_timm("efficientnet_b3", tmp_path / "b3.safetensors")
    with pytest.raises(WeightsError, match="neither imagenet-lite0 nor a timm model name"):
        export_timm("efficientnet_b99", tmp_path / "b99.safetensors")


def test_weights_command_writes_into_the_home(isolated_home):
    proc = subprocess.run([sys.executable, "-m", "fashion_tagger", "weights"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["path"] == str(named_weights_path(isolated_home.resolve()))
    assert (result["tensors"], result["created"]) == (LITE0_TENSORS, True)
    # The name to give model.pretrained_path on any machine that shares this home.
    assert result["pretrained_path"] == "weights:tf_efficientnet_lite0.imagenet.safetensors"
    assert resolve_pretrained_path(result["pretrained_path"], LITE0_ARCHITECTURE, isolated_home) == result["path"]
    proc = subprocess.run([sys.executable, "-m", "fashion_tagger", "weights", "nonet_b0"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "nonet_b0" in proc.stderr and "Traceback" not in proc.stderr


# Real product photos of images-full and the ImageNet class their articleType should bring into the top 5.
EXPECTED_TOP5 = {
    10008: ("Tshirts", "jersey, T-shirt, tee shirt"),
    1865: ("Tshirts", "jersey, T-shirt, tee shirt"),
    1895: ("Sweatshirts", "sweatshirt"),
    1827: ("Sports Shoes", "running shoe"),
    1923: ("Sports Shoes", "running shoe"),
    2823: ("Formal Shoes", "Loafer"),
    3135: ("Heels", "sandal"),
    2668: ("Handbags", "mailbag, postbag"),
}


@pytest.mark.real_data
def test_converted_lite0_recognises_real_product_photos(real_data, lite0_file):
    import pandas as pd
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    folder = real_data / "images-full"
    if not folder.is_dir():
        pytest.skip(f"{real_data} has no images-full/")
    styles = pd.read_csv(real_data / "styles.csv", on_bad_lines="skip").set_index("id")
    model = imagenet_lite0(lite0_file.path).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    info = ImageNetInfo()
    misses = []
    for image_id, (article_type, expected) in EXPECTED_TOP5.items():
        assert styles.loc[image_id, "articleType"] == article_type
        with Image.open(folder / f"{image_id}.jpg") as image:
            batch = transform(image.convert("RGB"))[None]
        with torch.inference_mode():
            top5 = model(batch).softmax(1)[0].topk(5).indices.tolist()
        names = [info.index_to_description(i) for i in top5]
        if expected not in names:
            misses.append(f"{image_id} ({article_type}): {names}")
    assert not misses, misses
