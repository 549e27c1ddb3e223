"""Training: beats the majority baseline on generated data, resumes at the next epoch, records what it did.

The generated dataset goes through the real stages (validate -> split -> prepare) at 32x40 pixels and a
tiny timm backbone, so a few epochs take seconds on a CPU.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from tagger_helpers import make_split, tiny_config, train_on_real_small_images

from fashion_tagger.core.config import load_config
from fashion_tagger.core.io import read_json
from fashion_tagger.core.layout import TrainDir
from fashion_tagger.data.imaging import normalize, pixel_stats
from fashion_tagger.evaluation.evaluate import evaluate_run
from fashion_tagger.training.datamodule import eval_transform, train_transform
from fashion_tagger.training.hardware import resolve_hardware
from fashion_tagger.training.module import MIN_LR_RATIO, lr_factor_fn
from fashion_tagger.training.train import TrainError, train_model

WIDTH, HEIGHT = 32, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(source: str | None = "demo", **train):
    return load_config(
        source,
        {
            "images": {"width": WIDTH, "height": HEIGHT},
            "model": {"backbone": "test_efficientnet", "pretrained": False},
            # Module-scoped fixtures train before the per-test environment is isolated: no tracking store then.
            "train": {"batch_size": 32, "num_workers": 0, "progress_bar": False, "system_metrics": False, **train},
        },
    )


@pytest.fixture(scope="module")
def prepared_split(synthetic_raw, tmp_path_factory):
    from fashion_tagger.data.prepare import prepare_images
    from fashion_tagger.data.split import split_dataset
    from fashion_tagger.data.validate import validate_dataset

    root = tmp_path_factory.mktemp("train-data")
    data = load_config(None, {"labels": {"min_class_count": 20}, "images": {"width": WIDTH, "height": HEIGHT,
                                                                            "workers": 1}})
    validate_dataset(synthetic_raw, root / "clean", data)
    split_dataset(root / "clean", root / "split", data)
    prepare_images(root / "split", root / "cache", data)
    return root / "split"


@pytest.fixture(scope="module")
def resumed_run(prepared_split, tmp_path_factory):
    """The same run directory trained with epochs=2, then again with epochs=3."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    first = train_model(_config(epochs=2), split_dir=prepared_split, run_dir=run_dir)
    first_history = read_json(run_dir / "metrics.json")["history"]
    second = train_model(_config(epochs=3), split_dir=prepared_split, run_dir=run_dir)
    return run_dir, first, first_history, second


@pytest.mark.slow
def test_training_beats_the_majority_baseline(resumed_run):
    run_dir, _, _, result = resumed_run
    evaluation = evaluate_run(run_dir, _config(epochs=3))
    for attribute in ("masterCategory", "baseColour"):
        scores = evaluation.attributes[attribute]
        assert scores["accuracy"] > scores["majority_baseline_accuracy"] + 0.05, (attribute, scores)
        assert scores["macro_f1"] > scores["majority_baseline_macro_f1"] + 0.05, (attribute, scores)
    # Evaluation of the best checkpoint on validation comes close to the score it was selected by: training reads
    # the prepared copies, evaluation the originals through the serving preprocessing (the one scoring path).
    assert evaluation.val_headline_macro_f1 == pytest.approx(result.best_score, abs=0.02)


@pytest.mark.slow
def test_training_the_same_run_dir_again_resumes_at_the_next_epoch(resumed_run):
    run_dir, first, first_history, second = resumed_run
    assert (first.resumed, first.epochs_completed) == (False, 2)
    assert (second.resumed, second.epochs_completed) == (True, 3)
    history = read_json(run_dir / "metrics.json")["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[:2] == first_history  # restored from the checkpoint, not retrained
    steps_per_epoch = history[0]["step"]
    assert history[2]["step"] == 3 * steps_per_epoch
    # The second attempt logged (so trained) the third epoch only.
    second_log = pd.read_csv(run_dir / "logs" / "version_1" / "metrics.csv")
    assert set(second_log["epoch"].dropna().astype(int)) == {2}
    assert read_json(run_dir / "run.json")["attempts"] == 2


@pytest.mark.slow
def test_a_finished_run_is_returned_as_it_is(resumed_run, prepared_split):
    run_dir, _, _, second = resumed_run
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    again = train_model(_config(epochs=3), split_dir=prepared_split, run_dir=run_dir)
    assert again.already_complete and again.epochs_completed == 3
    assert again.best_score == second.best_score
    assert again.split_dir == prepared_split.resolve() == TrainDir(run_dir).recorded_split()
    assert last.stat().st_mtime_ns == before


@pytest.mark.slow
def test_run_dir_is_self_describing(resumed_run, prepared_split):
    run_dir, _, _, result = resumed_run
    assert load_config(run_dir / "config.yaml").train.epochs == 3
    assert read_json(run_dir / "run.json")["split_dir"] == str(prepared_split.resolve())
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "complete" and metrics["resumed"] is True
    # history rounds to 6 decimals, best_score does not
    assert metrics["best_score"] == pytest.approx(max(h["val_macro_f1"] for h in metrics["history"]), abs=1e-6)
    assert metrics["images_per_s"] > 0
    assert set(metrics["best_scores"]) == set(read_json(prepared_split / "labels.json")["attributes"])
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    # A checkpoint carries the config and the label space: it needs nothing else to be used.
    hparams = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["config"]["model"]["backbone"] == "test_efficientnet"
    assert hparams["labels"] == read_json(prepared_split / "labels.json")
    assert list(hparams["image_size"]) == [WIDTH, HEIGHT]


@pytest.mark.slow
def test_another_model_in_the_same_run_dir_is_refused(resumed_run, prepared_split):
    run_dir = resumed_run[0]
    other = _config(epochs=3)
    other.model.hidden_dim = 16
    with pytest.raises(TrainError, match="another model config"):
        train_model(other, split_dir=prepared_split, run_dir=run_dir)


class _BackboneSnapshots(Callback):
    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.snapshots.append(torch.cat([p.detach().flatten() for p in pl_module.model.backbone.parameters()
                                         if p.ndim > 1]).clone())


@pytest.mark.slow
def test_bce_loss_backbone_freeze_and_extra_loggers(tmp_path):
    split_dir = make_split(tmp_path)
    snapshots = _BackboneSnapshots()
    extra = CSVLogger(tmp_path / "extra", name="mine")
    config = tiny_config(epochs=2, loss="bce", freeze_backbone_epochs=1)
    initial = None

    class _Initial(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            nonlocal initial
            initial = torch.cat([p.detach().flatten() for p in pl_module.model.backbone.parameters()
                                 if p.ndim > 1]).clone()

    result = train_model(config, split_dir=split_dir, run_dir=tmp_path / "run", loggers=[extra],
                         callbacks=[snapshots, _Initial()])
    assert result.epochs_completed == 2 and math.isfinite(result.best_score)
    # Convolution weights stay put while frozen (epoch 0), then train (epoch 1).
    assert torch.equal(snapshots.snapshots[0], initial)
    assert not torch.equal(snapshots.snapshots[1], snapshots.snapshots[0])
    assert "val_macro_f1" in pd.read_csv(tmp_path / "extra" / "mine" / "version_0" / "metrics.csv").columns


def test_learning_rate_schedules():
    cosine = lr_factor_fn("cosine", total_steps=100, warmup_steps=10, step_every=30, step_gamma=0.1)
    assert cosine(0) == pytest.approx(1 / 11)
    assert cosine(9) == pytest.approx(10 / 11)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5)
    assert cosine(100) == pytest.approx(MIN_LR_RATIO)
    assert all(cosine(s) >= cosine(s + 1) for s in range(10, 100))
    step = lr_factor_fn("step", total_steps=100, warmup_steps=0, step_every=30, step_gamma=0.1)
    assert [step(s) for s in (0, 29, 30, 61, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.001])


def test_hardware_on_cpu_and_under_torchrun(monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy

    config = _config(accelerator="cpu")
    hardware = resolve_hardware(config)
    assert (hardware["accelerator"], hardware["precision"], hardware["strategy"]) == ("cpu", "32-true", "auto")
    assert resolve_hardware(_config(accelerator="cpu", precision="bf16-mixed"))["precision"] == "bf16-mixed"

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    hardware = resolve_hardware(_config(accelerator="cpu", freeze_backbone_epochs=1))
    assert (hardware["devices"], hardware["num_nodes"]) == (1, 2)
    assert isinstance(hardware["strategy"], DDPStrategy)


def test_augmentation_keeps_size_and_colour_and_normalises_on_the_device():
    from PIL import Image

    red = Image.new("RGB", (WIDTH, HEIGHT), (200, 30, 30))
    augmented = train_transform(WIDTH, HEIGHT)(red)
    assert augmented.shape == (3, HEIGHT, WIDTH) and augmented.dtype == torch.uint8
    # No hue, saturation or brightness jitter: a flat colour comes out as exactly that colour.
    assert torch.equal(augmented, eval_transform()(red))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = normalize(augmented[None], *pixel_stats(mean, std))
    expected = (torch.tensor([200, 30, 30]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(normalised[0, :, 0, 0], expected)


@pytest.mark.slow
@pytest.mark.real_data
def test_short_training_on_real_small_images_beats_the_majority_baseline(real_small_raw, tmp_path):
    config = train_on_real_small_images(real_small_raw, tmp_path)
    evaluation = evaluate_run(tmp_path / "run", config)
    for attribute in ("masterCategory", "subCategory"):
        scores = evaluation.attributes[attribute]
        assert scores["accuracy"] > scores["majority_baseline_accuracy"] + 0.05, (attribute, scores)
        assert scores["macro_f1"] > scores["majority_baseline_macro_f1"] + 0.05, (attribute, scores)
    # Calibrated on validation, judged on test: no attribute's calibration error grows by more than noise, and
    # the tags accepted at a threshold chosen for 95 % precision reach close to it on real images.
    metrics = read_json(evaluation.metrics_path)
    for attribute, report in metrics["calibration"]["attributes"].items():
        assert report["ece_after"] <= report["ece_before"] + 0.03, (attribute, report)
        reached = metrics["coverage"][attribute]
        if reached["accepted"] >= 100:
            assert reached["precision"] >= 0.88, (attribute, reached)


@pytest.mark.slow
def test_training_ends_calibrated_on_the_validation_part_only(resumed_run, prepared_split, monkeypatch, tmp_path):
    """train/calibration.json holds a temperature and a review threshold per attribute, fitted on the validation
    part; calibrating again reads that part and nothing else; the checkpoint's predictor and its export divide the
    logits by those temperatures, and an export from before calibration keeps T = 1."""
    import json

    import numpy as np

    import fashion_tagger.training.datamodule as datamodule
    from fashion_tagger.core.layout import SplitDir
    from fashion_tagger.serving.predictor import EXPORT_FILENAME, Predictor
    from fashion_tagger.training.calibrate import calibrate

    run_dir, _, _, result = resumed_run
    calibration = read_json(TrainDir(run_dir).calibration)
    val_rows = len(pd.read_parquet(SplitDir(prepared_split).val))
    attributes = read_json(prepared_split / "labels.json")["attributes"]
    assert calibration["part"] == "val" and calibration["rows"] == val_rows
    assert set(calibration["temperatures"]) == set(attributes) == set(calibration["thresholds"])
    assert all(t > 0 for t in calibration["temperatures"].values())
    for attribute, chosen in calibration["thresholds"].items():
        assert chosen["target"] == 0.95
        assert chosen["threshold"] is None or chosen["precision"] >= 0.95 - 1e-9, (attribute, chosen)
        report = calibration["validation"][attribute]
        # The fitted temperature can only lower the validation NLL it minimises.
        assert report["nll_after"] <= report["nll_before"] + 1e-9, (attribute, report)

    # The logits calibration fits on are the network's on validation as training scored it: their macro-F1 is the
    # best checkpoint's validation score.
    from fashion_tagger.evaluation.metrics import macro_f1
    from fashion_tagger.training.calibrate import validation_logits

    logits_val, targets_val = validation_logits(result.best_checkpoint, prepared_split, _config(epochs=3), "cpu")
    from fashion_tagger.data.labels import LabelSpace

    num_classes = LabelSpace.load(prepared_split).num_classes
    scores = [macro_f1(targets_val[a], logits_val[a].argmax(1), num_classes[a]) for a in attributes]
    assert float(np.mean(scores)) == pytest.approx(result.best_score, abs=1e-3)

    parts: list[str] = []
    real_read_split = datamodule.read_split
    monkeypatch.setattr(datamodule, "read_split", lambda split, part, attrs: parts.append(part) or
                        real_read_split(split, part, attrs))
    again = calibrate(TrainDir(run_dir), prepared_split, _config(epochs=3))
    assert parts == ["val"], parts  # never test, and not train either
    assert again["temperatures"] == calibration["temperatures"]

    predictor = Predictor.from_checkpoint(result.best_checkpoint, "cpu")
    assert predictor.temperatures == calibration["temperatures"]
    batch = torch.rand(3, 3, HEIGHT, WIDTH)
    logits = predictor.model(batch)
    calibrated = predictor.predict_probabilities(batch)
    for attribute, t in calibration["temperatures"].items():
        expected = torch.softmax(logits[attribute].float() / t, dim=1)
        assert torch.allclose(calibrated[attribute], expected, atol=1e-6), attribute
    export = predictor.export(tmp_path / "export")
    assert json.loads((export / EXPORT_FILENAME).read_text())["calibration"]["temperatures"] == \
        calibration["temperatures"]
    assert Predictor.from_export(export, "cpu").temperatures == calibration["temperatures"]
    # An export written before calibration existed has no such key: its confidences are the raw softmax.
    spec = json.loads((export / EXPORT_FILENAME).read_text())
    del spec["calibration"]
    (export / EXPORT_FILENAME).write_text(json.dumps(spec))
    old = Predictor.from_export(export, "cpu")
    assert old.temperatures == {} and old.thresholds == {}
    raw = old.predict_probabilities(batch)
    assert all(np.allclose(raw[a].numpy(), torch.softmax(logits[a].float(), 1).detach().numpy(), atol=1e-6)
               for a in attributes)


@pytest.mark.slow
def test_training_logs_system_metrics_to_its_mlflow_run_and_trains_without_a_store(tmp_path, monkeypatch, caplog):
    """While it trains, MLflow's system metrics monitor samples CPU, memory, disk and network use into the run's
    MLflow run (named for a person browsing); register later continues that run. A tracking server that does not
    answer costs the samples, not the training."""
    from fashion_tagger.core import tracking

    split = make_split(tmp_path / "split")
    config = tiny_config(epochs=12, system_metrics=True, system_metrics_interval_s=0.2)
    config.registry.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # whatever the process environment holds
    train_model(config, split_dir=split, run_dir=tmp_path / "run")
    with tracking.tracking_session(config) as client:
        run = client.get_run(tracking.read_run_id(tmp_path / "run", client))
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert run.info.run_name == tracking.run_name(config, tmp_path / "run")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    # MLflow's own retries would take minutes: the health probe takes seconds.
    offline = tiny_config(epochs=1, system_metrics=True)
    with caplog.at_level("WARNING", logger="fashion_tagger.core.tracking"):
        result = train_model(offline, split_dir=split, run_dir=tmp_path / "offline")
    assert result.epochs_completed == 1
    assert any("without system metrics" in r.getMessage() and "127.0.0.1" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
