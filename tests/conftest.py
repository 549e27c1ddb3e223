"""Shared fixtures: an isolated project home, the generated dataset, and the optional real-data tier."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REAL_DATA_ENV = "FASHION_TAGGER_REAL_DATA"


def pytest_configure(config):
    """Keep Airflow (imported by the DAG tests) out of ~/airflow: its home is fixed at first import."""
    if "AIRFLOW_HOME" not in os.environ:
        import tempfile

        os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="fashion-tagger-airflow-")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch) -> Iterator[Path]:
    """Every test gets its own FASHION_TAGGER_HOME and MLflow store; nothing touches ~/.fashion-tagger."""
    home = tmp_path / "home"
    monkeypatch.setenv("FASHION_TAGGER_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    # A remote home's working copy and the scratch cache: per test, never the user's cache folder.
    monkeypatch.setenv("FASHION_TAGGER_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.delenv("FASHION_TAGGER_DATABASE_URL", raising=False)
    yield home
    from fashion_tagger.workspace.workspace import close_workspaces

    close_workspaces()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder named by FASHION_TAGGER_REAL_DATA (styles.csv, images-small/, images-full/)."""
    value = os.environ.get(REAL_DATA_ENV)
    if not value:
        pytest.skip(f"{REAL_DATA_ENV} is not set: the real-data tier is off")
    path = Path(value)
    if not (path / "styles.csv").is_file():
        pytest.skip(f"{REAL_DATA_ENV}={value} has no styles.csv")
    return path


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A generated dataset in the Kaggle layout (styles.csv + images/), shared by the whole session."""
    from fashion_tagger.data.synthetic.generator import generate_dataset

    out = tmp_path_factory.mktemp("synthetic") / "raw"
    generate_dataset(out, rows=800, size="small", seed=7)
    return out


@pytest.fixture(scope="session")
def real_small_raw(real_data, tmp_path_factory) -> Path:
    """The real styles.csv lines whose image is in images-small/, as a raw dir of symlinks (never copied)."""
    images = real_data / "images-small"
    if not images.is_dir():
        pytest.skip(f"{REAL_DATA_ENV} has no images-small/")
    raw = tmp_path_factory.mktemp("real_small") / "raw"
    (raw / "images").mkdir(parents=True)
    ids = set()
    for image in images.iterdir():
        (raw / "images" / image.name).symlink_to(image)
        ids.add(image.stem)
    lines = (real_data / "styles.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    kept = (line for line in lines[1:] if line.split(",", 1)[0] in ids)
    (raw / "styles.csv").write_text(lines[0] + "".join(kept))
    return raw


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread: two OpenMP threads on two cores shared with other jobs stall at every barrier."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
