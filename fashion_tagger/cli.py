"""The `fashion-tagger` command line: one command per pipeline stage, each printing its paths and summary.

Every command is a thin wrapper over the stage function the Airflow tasks call too; heavy libraries are
imported inside the commands so that `fashion-tagger --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fashion_tagger import stages
from fashion_tagger.config import load_config, save_config
from fashion_tagger.errors import FashionTaggerError

app = typer.Typer(
    name="fashion-tagger",
    help="Build, train, evaluate and register the fashion product tagger.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

ConfigOption = Annotated[
    str | None, typer.Option("--config", "-c", help="YAML file or preset name (see `fashion-tagger presets`)")
]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set train.epochs=3 (repeatable)")
]


def _emit(result: Any, as_json: bool = True) -> None:
    data = result.to_dict() if hasattr(result, "to_dict") else result
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else data)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def presets() -> None:
    """List the bundled configuration presets."""
    from fashion_tagger.config import preset_names

    for name in preset_names():
        typer.echo(name)


@app.command("config")
def show_config(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the resolved configuration (defaults <- file/preset <- --set)."""
    import yaml

    cfg = load_config(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def synth(
    out_dir: Path,
    rows: Annotated[int, typer.Option("--rows", "-n", min=1)] = 2000,
    size: Annotated[str, typer.Option(help="small (60x80) or full (1800x2400)")] = "small",
    seed: int = 0,
) -> None:
    """Generate a dataset in the exact Kaggle format (styles.csv + images/<id>.jpg)."""
    from fashion_tagger.synth import generate_dataset

    _emit(generate_dataset(out_dir, rows=rows, size=size, seed=seed))


@app.command()
def fetch(
    source: Annotated[str, typer.Argument(help="kaggle:OWNER/DATASET, a folder, s3://bucket/prefix, synthetic:N")],
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Fetch a dataset into <home>/raw/<name>/{styles.csv,images/} (skipped when already complete)."""
    _emit(stages.fetch(load_config(config, set_), source))


@app.command()
def validate(
    raw_dir: Path,
    out_dir: Path,
    metadata_only: Annotated[bool, typer.Option("--metadata-only", help="do not open images")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Validate and clean styles.csv and the images: clean.parquet, rejects.csv, report.json."""
    cfg = load_config(config, set_)
    _emit(stages.validate(cfg, raw_dir, out_dir, metadata_only=metadata_only))
    save_config(cfg, out_dir)


@app.command()
def split(clean_dir: Path, out_dir: Path, config: ConfigOption = None, set_: SetOption = None) -> None:
    """Encode labels and write a stratified train/validation split (duplicate images kept together)."""
    cfg = load_config(config, set_)
    _emit(stages.split(cfg, clean_dir, out_dir))
    save_config(cfg, out_dir)


@app.command()
def prepare(
    split_dir: Path,
    cache_dir: Annotated[Path | None, typer.Option(help="default <home>/cache")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Resize every image once into the content-addressed cache shared by all runs."""
    _emit(stages.prepare(load_config(config, set_), split_dir, cache_dir))


@app.command()
def train(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="checkpoints, config and metrics go here")],
    split_dir: Annotated[Path | None, typer.Option(help="prepared split; default: the run's saved one")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Train (or resume) the tagger in RUN_DIR. Runs in its own process; Airflow launches exactly this."""
    from lightning.pytorch.utilities import rank_zero_only

    from fashion_tagger.train import train_model

    cfg = load_config(config, set_)
    result = train_model(cfg, split_dir=split_dir, run_dir=run_dir)
    # Under DDP every rank returns; the result is printed once.
    if rank_zero_only.rank == 0:
        _emit(result)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Option("--run-dir")],
    checkpoint: Annotated[Path | None, typer.Option(help="default: the run's best checkpoint")] = None,
    split_dir: Annotated[Path | None, typer.Option(help="default: the split the run trained on")] = None,
) -> None:
    """Per-attribute and per-class metrics, confusion matrices and plots into RUN_DIR/eval."""
    from fashion_tagger.evaluate import evaluate_run

    _emit(evaluate_run(run_dir, checkpoint=checkpoint, split_dir=split_dir))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="JPEG/PNG files or folders")],
    checkpoint: Annotated[Path | None, typer.Option(help="a training checkpoint (.ckpt)")] = None,
    model: Annotated[str | None, typer.Option(help="an MLflow model URI, e.g. models:/fashion-tagger@champion")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    out: Annotated[Path | None, typer.Option(help="write predictions as CSV")] = None,
    grid: Annotated[Path | None, typer.Option(help="draw the images with their tags into this PNG")] = None,
) -> None:
    """Tag product photos with a checkpoint or a registered model."""
    from fashion_tagger.predict import run_predict

    if (checkpoint is None) == (model is None):
        _fail("give exactly one of --checkpoint FILE or --model URI")
    run_predict(images, checkpoint=checkpoint, model_uri=model, as_json=as_json, out_csv=out, grid=grid)


@app.command()
def register(
    run_dir: Annotated[Path, typer.Option("--run-dir")],
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Log the run to MLflow, register it as challenger and apply the promotion gate."""
    from fashion_tagger.registry import describe_registration, register_run

    cfg = load_config(config, set_)
    result = register_run(run_dir, cfg)
    _emit(result)
    typer.echo(describe_registration(result), err=True)  # stdout stays JSON for scripts and Airflow


@app.command()
def models(config: ConfigOption = None, set_: SetOption = None) -> None:
    """List registered versions with their aliases, headline metric and promotion decision."""
    from fashion_tagger.registry import format_versions, list_versions

    cfg = load_config(config, set_)
    typer.echo(format_versions(list_versions(cfg)))


@app.command()
def weights(
    source: Annotated[str, typer.Argument(
        help="imagenet-lite0 (convert the installed EfficientNet-Lite0, offline) or a timm model name to download, "
        "e.g. efficientnet_b3.ra2_in1k (on a connected machine, for air-gapped workers)"
    )] = "imagenet-lite0",
    out: Annotated[Path | None, typer.Option(help="default <home>/weights/<architecture>.imagenet.safetensors")] = None,
    force: Annotated[bool, typer.Option("--force", help="rewrite an existing file")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Write ImageNet weights as a safetensors file for model.pretrained_path."""
    from fashion_tagger.weights import write_weights

    _emit(write_weights(source, load_config(config, set_).home_dir, out=out, force=force))


@app.command("run")
def run_pipeline(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Run every stage in this process: fetch, validate, split, prepare, train, evaluate, register."""
    from fashion_tagger.pipeline import run_all

    result = run_all(load_config(config, set_))
    _emit(result)
    typer.echo(result.summary, err=True)


def main() -> None:
    try:
        app()
    except FashionTaggerError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
