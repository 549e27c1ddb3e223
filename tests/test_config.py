"""The typed configuration: defaults, presets, YAML files, overrides, clear errors, saved beside outputs."""

from __future__ import annotations

import pytest
import yaml

from fashion_tagger.core.config import (
    ConfigError,
    config_to_flat_dict,
    load_config,
    project_home,
    save_config,
)
from fashion_tagger.core.config_sources import preset_names
from fashion_tagger.core.schema import ATTRIBUTES


def test_defaults_are_the_production_recipe():
    cfg = load_config()
    assert cfg.model.backbone == "efficientnet_b3"
    assert cfg.model.pretrained is True
    assert cfg.labels.min_class_count == 500
    assert cfg.labels.attributes == list(ATTRIBUTES)
    assert (cfg.images.width, cfg.images.height) == (240, 320)
    assert cfg.split.val_fraction == pytest.approx(0.2)


def test_home_comes_from_environment(isolated_home, monkeypatch):
    assert project_home().root == isolated_home.resolve()
    cfg = load_config()
    assert cfg.raw_root == isolated_home.resolve() / "raw"
    assert cfg.tracking_uri == f"sqlite:///{isolated_home.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_config().tracking_uri == "http://mlflow:5000"


def test_presets_and_overrides_layer_in_order(tmp_path):
    assert {"default", "demo"} <= set(preset_names())
    demo = load_config("demo", ["train.epochs=7", "model.pretrained=false", "data.max_rows=null"])
    assert demo.data.source.startswith("synthetic:")
    assert demo.train.epochs == 7
    assert demo.model.pretrained is False
    assert demo.data.max_rows is None

    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": 16}, "labels": {"min_class_count": 3}}))
    mine = load_config(path, {"train": {"lr": 0.5}})
    assert (mine.train.batch_size, mine.train.lr, mine.labels.min_class_count) == (16, 0.5, 3)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.epochs=0"], "train.epochs"),
        (["train.nope=1"], "train.nope"),
        (["labels.attributes=[colour]"], "attributes must be a non-empty subset"),
        (["epochs"], "must look like section.field=value"),
        (["train.loss=hinge"], "train.loss"),
    ],
)
def test_bad_overrides_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, overrides)


def test_unknown_config_source_lists_presets():
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["train.epochs=2"])
    path = save_config(cfg, tmp_path / "out")
    assert path.name == "config.yaml"
    assert load_config(path) == cfg
    flat = config_to_flat_dict(cfg)
    assert flat["train.epochs"] == 2
    assert flat["model.backbone"] == cfg.model.backbone


def test_every_worker_count_spells_auto_the_same_way():
    config = load_config(None)
    assert config.images.workers == config.train.num_workers == config.tagging.workers == "auto"
    explicit = load_config(None, {"images": {"workers": 3}, "train": {"num_workers": 0}, "tagging": {"workers": "2"}})
    assert (explicit.images.workers, explicit.train.num_workers, explicit.tagging.workers) == (3, 0, 2)


@pytest.mark.parametrize(("key", "legacy"), [("images.workers", 0), ("train.num_workers", -1), ("tagging.workers", -1)])
def test_the_old_spellings_of_auto_still_read_with_a_deprecation_message(key, legacy, caplog):
    section, field = key.split(".")
    with caplog.at_level("WARNING"):
        config = load_config(None, {section: {field: legacy}})
    assert getattr(getattr(config, section), field) == "auto"
    assert f"{key}={legacy} is deprecated: write {key}=auto" in caplog.text


def test_a_negative_worker_count_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"train.num_workers must be 'auto' or a number >= 0, not -3"):
        load_config(None, {"train": {"num_workers": -3}})


@pytest.mark.parametrize("where", ["env", "config"])
def test_an_s3_home_is_worked_on_in_scratch_and_never_a_local_folder_named_after_it(where, tmp_path, monkeypatch):
    """`FASHION_TAGGER_HOME=s3://ft/home` used to become a folder `s3:/ft/home` under the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("FASHION_TAGGER_SCRATCH", str(tmp_path / "scratch"))
    if where == "env":
        monkeypatch.setenv("FASHION_TAGGER_HOME", "s3://ft/home")
        config = load_config(None)
    else:
        config = load_config(None, {"home": "s3://ft/home/"})
    assert config.layout.url == "s3://ft/home"
    assert config.home_dir.is_relative_to(tmp_path / "scratch" / "homes")
    # A shared home needs a shared tracking server: the embedded store on this machine is refused.
    with pytest.raises(ConfigError, match=r"home is s3://ft/home, but MLflow tracking is the embedded store"):
        _ = config.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert config.tracking_uri == "http://mlflow:5000"
    for unsupported in ("gs://ft/home", "s3:/ft/home"):
        with pytest.raises(ConfigError, match=r"is not a home this tool can use: the home is a local folder or s3"):
            load_config(None, {"home": unsupported})
    assert not list(cwd.iterdir())
