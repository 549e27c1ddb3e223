"""Unit tests of the orchestration helpers: parameters -> Config, run-scoped paths, stage child processes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest

from fashion_tagger.core.config import Config, ConfigError, load_config
from fashion_tagger.core.config_sources import preset_names
from fashion_tagger.core.layout import run_dir_name
from fashion_tagger.core.parallel import device_processes, parse_devices
from fashion_tagger.orchestration import child, dag_support
from fashion_tagger.orchestration import form as orch
from fashion_tagger.runs.stage_registry import stage_names

AIRFLOW_RUN_ID = "manual__2025-06-01T10:20:30.123456+00:00"


# --- run-scoped paths ------------------------------------------------------------------------------------------------


def test_run_dir_name_is_path_safe_deterministic_and_unique():
    name = run_dir_name(AIRFLOW_RUN_ID)
    assert name == run_dir_name(AIRFLOW_RUN_ID)
    assert name.startswith("manual__2025-06-01T10-20-30.123456-00-00-")
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    # Ids that differ only in unsafe characters must not share a folder.
    assert run_dir_name("a:b") != run_dir_name("a/b") != run_dir_name("a-b")
    assert run_dir_name("scheduled_2025-01-01") == "scheduled_2025-01-01"  # safe ids stay readable
    assert run_dir_name("../../etc") not in ("..", "../../etc") and "/" not in run_dir_name("../../etc")
    with pytest.raises(ConfigError):
        run_dir_name("  ")


def test_run_layouts_live_under_the_runs_root(isolated_home):
    layout = load_config("demo").layout.run(AIRFLOW_RUN_ID)
    assert layout.root.parent == isolated_home / "runs"
    assert {p.parent for p in (layout.config, layout.validate.dir, layout.split.dir, layout.train.dir)} == {layout.root}
    assert layout.to_dict()["train"] == str(layout.root / "train")
    assert load_config("demo").layout.run(AIRFLOW_RUN_ID.replace("10:20", "10:21")).root != layout.root


# --- parameters -> Config --------------------------------------------------------------------------------------------


def test_every_parameter_maps_to_a_config_field():
    for name, key in orch.PARAM_CONFIG_KEYS.items():
        section, field = key.split(".")
        assert field in Config.model_fields[section].annotation.model_fields, name


def test_params_override_the_preset_and_empty_values_keep_it():
    config = orch.config_from_params(
        {"preset": "demo", "epochs": 2, "backbone": "test_efficientnet", "image_width": 32, "image_height": 40,
         "learning_rate": 0.01, "min_class_count": 5, "pretrained": False, "promote": False, "min_delta": 0.01,
         "max_rows": 250, "source": "synthetic:300", "batch_size": None}
    )
    demo = load_config("demo")
    assert (config.train.epochs, config.model.backbone, config.images.width, config.images.height) == (
        2, "test_efficientnet", 32, 40)
    assert (config.train.lr, config.labels.min_class_count, config.model.pretrained) == (0.01, 5, False)
    assert (config.registry.promote, config.registry.min_delta) == (False, 0.01)
    assert (config.data.max_rows, config.data.source) == (250, "synthetic:300")
    assert config.train.batch_size == demo.train.batch_size  # None keeps the preset's value
    assert orch.config_from_params({"preset": "demo", "source": ""}).data.source == demo.data.source


def test_the_form_is_generated_from_the_config_schema():
    form = orch.form_params()
    assert list(form) == ["preset", *orch.PARAM_CONFIG_KEYS]
    # Bounds and descriptions are the schema's: max_rows >= 1 as in DataConfig, epochs within TrainConfig's.
    assert form["max_rows"]["minimum"] == Config.model_fields["data"].default_factory().model_fields[
        "max_rows"].metadata[0].ge
    epochs = Config.model_json_schema()["$defs"]["TrainConfig"]["properties"]["epochs"]
    assert (form["epochs"]["minimum"], form["epochs"]["maximum"]) == (epochs["minimum"], epochs["maximum"])
    assert form["epochs"]["description"].startswith(epochs["description"])
    # The preset choices and what each one does are read from the presets themselves.
    assert form["preset"]["enum"] == preset_names()
    demo = load_config("demo")
    assert f"{demo.train.epochs} epochs" in form["preset"]["values_display"]["demo"]
    assert demo.model.backbone in form["preset"]["values_display"]["demo"]


def test_changing_a_bound_in_the_config_changes_the_form():
    from pydantic import Field, create_model

    from fashion_tagger.core.config import TrainConfig

    stricter = create_model("TrainConfig", __base__=TrainConfig, epochs=(int, Field(30, ge=2, le=9)))
    config_cls = create_model("Config", __base__=Config, train=(stricter, Field(default_factory=stricter)))
    form = orch.form_params(config_cls)
    assert (form["epochs"]["minimum"], form["epochs"]["maximum"]) == (2, 9)
    assert orch.form_params()["epochs"]["minimum"] == 1


def test_yes_no_fields_offer_keep_yes_and_no():
    form = orch.form_params()
    for name in ("pretrained", "promote", "force"):
        assert form[name]["enum"] == ["keep", "yes", "no"] and form[name]["default"] == "keep", name
        assert form[name]["values_display"]["keep"] == "keep the preset's value"
    demo = load_config("demo")
    assert orch.config_from_params({"preset": "demo", "promote": "keep"}).registry.promote == demo.registry.promote
    assert orch.config_from_params({"preset": "demo", "promote": "no"}).registry.promote is False
    assert orch.config_from_params({"preset": "demo", "pretrained": "yes"}).model.pretrained is True
    assert orch.config_from_params({"preset": "demo", "force": "yes"}).train.force is True
    assert orch.config_from_params({"preset": "demo"}).train.force is False


def test_fixed_overrides_win_over_params():
    config = orch.config_from_params({"preset": "demo", "epochs": 4}, fixed={"train": {"devices": "1", "epochs": 1}})
    assert (config.train.devices, config.train.epochs) == ("1", 1)


def test_preset_defaults_to_env_then_default(monkeypatch):
    monkeypatch.delenv(orch.PRESET_ENV, raising=False)
    assert orch.config_from_params({}).model.backbone == load_config("default").model.backbone
    monkeypatch.setenv(orch.PRESET_ENV, "demo")
    assert orch.config_from_params({}).model.backbone == load_config("demo").model.backbone


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"preset": "demo", "epochs": 0}, "epochs (train.epochs)"),
        ({"preset": "demo", "learning_rate": -1.0}, "learning_rate (train.lr)"),
        ({"preset": "demo", "image_width": 8}, "image_width (images.width)"),
        ({"preset": "demo", "epoch": 3}, "unknown parameter(s) epoch"),
        ({"preset": "nope"}, "neither a file nor a preset"),
    ],
)
def test_bad_params_raise_a_config_error_naming_the_field(params, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        orch.config_from_params(params)


def test_the_tagging_form_is_generated_from_the_config_schema():
    form = orch.tagging_form_params()
    assert list(form) == ["source", "out_dir", "model", "shard_size", "batch_size"]  # the DAG's parameter names
    tagging = Config.model_json_schema()["$defs"]["TaggingConfig"]["properties"]
    assert form["shard_size"]["minimum"] == tagging["shard_size"]["minimum"] == 1
    assert form["source"]["description"].startswith(tagging["catalog"]["description"])
    assert form["model"]["pattern"] and all(spec["default"] is None for spec in form.values())


def test_tagging_params_become_tagging_overrides_of_the_preset():
    fields = orch.TAGGING_FORM_FIELDS
    assert orch.param_overrides({"source": "/photos", "out_dir": None, "model": "", "shard_size": 20}, fields) == {
        "tagging": {"catalog": "/photos", "shard_size": 20}}
    config = orch.config_from_params({"preset": "demo", "model": "models:/x/3", "batch_size": 8}, fields=fields)
    assert (config.tagging.model, config.tagging.batch_size) == ("models:/x/3", 8)
    assert config.tagging.shard_size == load_config("demo").tagging.shard_size
    with pytest.raises(ConfigError, match=r"shard_size \(tagging.shard_size\)"):
        orch.config_from_params({"shard_size": 0}, fields=fields)
    with pytest.raises(ConfigError, match="unknown parameter.s. epochs: the DAG accepts preset, source, out_dir"):
        orch.param_overrides({"epochs": 3}, fields)


# --- what every DAG shares -------------------------------------------------------------------------------------------


def test_deployment_settings_come_from_the_environment_and_name_a_bad_value(monkeypatch):
    from datetime import timedelta

    for name in (dag_support.GPU_QUEUE_ENV, dag_support.RETRIES_ENV, dag_support.TRAIN_GPUS_ENV,
                 "FASHION_TAGGER_TRAIN_TIMEOUT_HOURS"):
        monkeypatch.delenv(name, raising=False)
    assert (dag_support.gpu_queue(), dag_support.task_retries(), dag_support.train_gpus()) == ("gpu", 2, 1)
    assert dag_support.timeout_from_env("train", 12) == timedelta(hours=12)
    monkeypatch.setenv("FASHION_TAGGER_TRAIN_TIMEOUT_HOURS", "0.5")
    monkeypatch.setenv(dag_support.TRAIN_GPUS_ENV, "0")
    assert (dag_support.timeout_from_env("train", 12), dag_support.train_gpus()) == (timedelta(minutes=30), 1)
    monkeypatch.setenv(dag_support.RETRIES_ENV, "two")
    with pytest.raises(ConfigError, match=r"\$FASHION_TAGGER_TASK_RETRIES must be a whole number, not 'two'"):
        dag_support.task_retries()


def test_run_overlap_and_retry_delay_are_deployment_settings(monkeypatch):
    from datetime import timedelta

    monkeypatch.delenv(dag_support.MAX_ACTIVE_RUNS_ENV, raising=False)
    monkeypatch.delenv(dag_support.RETRY_DELAY_ENV, raising=False)
    assert (dag_support.max_active_runs(), dag_support.retry_delay()) == (1, timedelta(minutes=1))
    assert dag_support.default_args(2)["retry_delay"] == timedelta(minutes=1)
    monkeypatch.setenv(dag_support.MAX_ACTIVE_RUNS_ENV, "3")
    monkeypatch.setenv(dag_support.RETRY_DELAY_ENV, "5")
    assert (dag_support.max_active_runs(), dag_support.default_args(2)["retry_delay"]) == (3, timedelta(seconds=5))
    monkeypatch.setenv(dag_support.MAX_ACTIVE_RUNS_ENV, "0")
    with pytest.raises(ConfigError, match=r"\$FASHION_TAGGER_MAX_ACTIVE_RUNS must be at least 1, not 0"):
        dag_support.max_active_runs()
    monkeypatch.setenv(dag_support.RETRY_DELAY_ENV, "-1")
    with pytest.raises(ConfigError, match=r"\$FASHION_TAGGER_TASK_RETRY_DELAY_S must be zero or more seconds"):
        dag_support.retry_delay()


def test_default_source_follows_env_then_kaggle_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv(orch.SOURCE_ENV, raising=False)
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    assert orch.default_source() == orch.SYNTHETIC_DEFAULT
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    assert orch.default_source("default").startswith("kaggle:paramaggarwal/fashion-product-images-dataset")
    assert orch.default_source("demo") == orch.KAGGLE_SMALL
    monkeypatch.setenv(orch.SOURCE_ENV, "s3://bucket/fashion")
    assert orch.default_source() == "s3://bucket/fashion"


# --- stage commands --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "expected"),
    [("auto", 1), ("1", 1), (None, 1), ("4", 4), (2, 2), ("0,1,2", 3), ("[0, 1]", 2), ("[0,1]", 2), ("0,", 1),
     ("-1", 1)],
)
def test_one_parser_of_train_devices_gives_the_trainer_and_the_orchestrator_the_same_count(devices, expected):
    """`train.devices` is parsed once (core.parallel): the processes the DAG launches and the devices Lightning
    is given agree, "[0,1]" included (it used to be 2 processes for the DAG and a ValueError for the trainer)."""
    assert device_processes(devices) == expected


def test_device_ids_parse_the_same_with_or_without_brackets():
    assert parse_devices("[0,1]") == parse_devices("0,1") == parse_devices("[0, 1]") == [0, 1]
    assert parse_devices("auto") == "auto" and parse_devices("2") == 2 and parse_devices(-1) == -1


def test_a_train_devices_value_nobody_can_parse_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"train.devices.*'two'"):
        load_config(None, {"train": {"devices": "two"}})


def test_a_stage_child_is_the_stage_name_and_the_run_and_torchrun_only_for_several_gpus(tmp_path):
    single = child.stage_command("train", tmp_path / "run")
    assert single == [sys.executable, "-m", "fashion_tagger", "train", str(tmp_path / "run")]
    multi = child.stage_command("train", tmp_path / "run", nproc=4)
    assert multi[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert multi[5:] == single[1:]
    assert child.stage_command("prepare", tmp_path / "run")[3:] == ["prepare", str(tmp_path / "run")]


@pytest.mark.parametrize("stage", stage_names())
def test_every_stage_command_takes_the_run_and_nothing_else(stage):
    result = subprocess.run(
        [sys.executable, "-m", "fashion_tagger", stage, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "RUN" in result.stdout and "--config" not in result.stdout and "--set" not in result.stdout


CHILD = """
import json, sys, time
print("step 1", flush=True)
print("a warning on stderr", file=sys.stderr, flush=True)
print("step 2", flush=True)
print(json.dumps({"not": "this one"}))
print(json.dumps({"run_dir": "/x", "best_score": 0.5}, indent=2))
print("trailing noise")
"""


def test_run_logged_streams_every_line_and_returns_the_last_json(caplog):
    logger = logging.getLogger("test.child")
    with caplog.at_level(logging.INFO, logger="test.child"):
        output = child.run_logged([sys.executable, "-c", CHILD], logger=logger)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("running: ")
    for line in ("step 1", "a warning on stderr", "step 2", '  "best_score": 0.5', "trailing noise"):
        assert line in messages
    assert messages.index("step 1") < messages.index("step 2")
    assert output.result == {"run_dir": "/x", "best_score": 0.5}
    assert child.run_logged([sys.executable, "-c", CHILD], logger=logger).result["best_score"] == 0.5


def test_a_failing_child_raises_with_its_last_lines():
    code = "import sys; print('loading'); print('CUDA out of memory', file=sys.stderr); sys.exit(3)"
    with pytest.raises(child.StageProcessError, match=r"exited with code 3(.|\n)*CUDA out of memory"):
        child.run_logged([sys.executable, "-c", code])
    with pytest.raises(child.StageProcessError, match="printed no JSON result"):
        child.run_json_command("evaluate", [sys.executable, "-c", "print('no result')"])


@pytest.mark.parametrize(("code", "retryable"), [(2, False), (75, True), (1, True), (-9, True)])
def test_a_child_error_follows_the_exit_code_contract(code, retryable):
    """2 is bad input (fail now); 75 (transient), a crash (1) or a kill (-9) are retried."""
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)" if code == -9 else f"raise SystemExit({code})"
    with pytest.raises(child.StageProcessError) as caught:
        child.run_logged([sys.executable, "-c", script])
    assert caught.value.returncode == code and caught.value.retryable is retryable


class _Interrupt(Exception):
    pass


def test_an_interrupted_task_stops_its_child(tmp_path):
    """An orchestrator timeout raises inside the log loop; the trainer must not outlive the task."""
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('started', flush=True); " \
           "time.sleep(120)"

    class RaisingLogger(logging.Logger):
        def info(self, msg, *args, **kwargs):
            if args and args[-1] == "started":
                raise _Interrupt
            super().info(msg, *args, **kwargs)

    started = time.monotonic()
    with pytest.raises(_Interrupt):
        child.run_logged([sys.executable, "-c", code], logger=RaisingLogger("interrupt"))
    assert time.monotonic() - started < 60
    pid = int(pid_file.read_text())
    # The child was terminated and reaped: its pid no longer refers to a live process of ours.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_last_json_object_skips_noise_and_non_objects():
    text = 'log line\n{"a": 1}\n[1, 2]\n{ broken\n{\n  "b": 2\n}\nbye'
    assert child.last_json_object(text) == {"b": 2}
    assert child.last_json_object("nothing here") is None
