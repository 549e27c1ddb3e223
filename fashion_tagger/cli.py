"""The `fashion-tagger` command line: one command per pipeline stage, each printing its paths and summary.

Every command is a thin wrapper over the stage function the Airflow tasks call too; heavy libraries are
imported inside the commands so that `fashion-tagger --help` stays fast.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from fashion_tagger.core.config import load_config
from fashion_tagger.core.errors import FashionTaggerError, ScratchFullError
from fashion_tagger.core.layout import SCRATCH_ENV
from fashion_tagger.runs.stage_registry import stage_names, stages

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
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs, and tracebacks of errors")] = False,
) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def presets() -> None:
    """List the bundled configuration presets."""
    from fashion_tagger.core.config_sources import preset_names

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
    from fashion_tagger.data.synthetic.generator import generate_dataset

    _emit(generate_dataset(out_dir, rows=rows, size=size, seed=seed))


RunArgument = Annotated[str, typer.Argument(help="a run id (see `fashion-tagger runs`) or a run folder")]


def _stage_command(name: str, summary: str) -> None:
    """Register `fashion-tagger NAME RUN`: stage NAME of an existing run, settings from the run's config.yaml."""

    def command(run: RunArgument) -> None:
        from fashion_tagger.runs.run import is_rank_zero, open_run
        from fashion_tagger.runs.stages import run_stage

        result = run_stage(open_run(run), name)
        if is_rank_zero():  # under torchrun every rank returns; the result is printed once
            _emit(result)

    command.__doc__ = f"{summary}. Stage {name} of RUN, with the settings in its config.yaml."
    app.command(name)(command)


for _stage in stages():  # the stage registry (runs/stage_registry.py), in run order
    _stage_command(_stage.name, _stage.summary)


@app.command()
def new(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Create a run (folder and config.yaml) without running any stage; prints its id and folder."""
    from fashion_tagger.runs.run import create_run

    run = create_run(load_config(config, set_))
    _emit({"run_id": run.id, "run_root": str(run.root)})


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
    from fashion_tagger.serving.predict import run_predict
    from fashion_tagger.serving.rows import failed_images

    if (checkpoint is None) == (model is None):
        _fail("give exactly one of --checkpoint FILE or --model URI")
    table = run_predict(images, checkpoint=checkpoint, model_uri=model, as_json=as_json, out_csv=out, grid=grid)
    if failed_images(table):  # the others are tagged and printed; the `error` column says what went wrong
        raise typer.Exit(1)


@app.command()
def tag(
    source: Annotated[str, typer.Argument(help="a folder of images, s3://bucket/prefix, or a listing .parquet")],
    out: Annotated[Path, typer.Option("--out", "-o", help="tags.parquet, rejects, review queue, changes go here")],
    model: Annotated[str | None, typer.Option(help="models:/NAME@ALIAS, models:/NAME/VERSION or a local export; "
                                              "default models:/<registry.model_name>@champion")] = None,
    manifest: Annotated[Path | None, typer.Option(help="styles.csv-like file: tag only its ids")] = None,
    previous: Annotated[Path | None, typer.Option(help="compare with this table instead of OUT/tags.parquet")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Tag a catalog with one pinned model version: new or changed images only, review queue, changed tags."""
    from fashion_tagger.tagging.jobs import tag_catalog

    _emit(tag_catalog(source, model, out, config=load_config(config, set_), manifest=manifest, previous=previous))


@app.command()
def models(config: ConfigOption = None, set_: SetOption = None) -> None:
    """List registered versions with their aliases, headline metric and promotion decision."""
    from fashion_tagger.registry.versions import format_versions, list_versions

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
    from fashion_tagger.model.weights import write_weights

    _emit(write_weights(source, load_config(config, set_).layout, out=out, force=force))


@app.command("run", help=(
    f"Run every stage in this process: {', '.join(stage_names())}.\n\nTrain, evaluate and register are skipped, "
    "with a line saying why, when the data, labels and training configuration equal the champion's; --force "
    "trains anyway."))
def run_pipeline(
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[str | None, typer.Option(help="continue this run after its last completed stage")] = None,
    force: Annotated[bool, typer.Option("--force", help="train even when nothing changed since the champion")] = False,
) -> None:
    from fashion_tagger.runs.pipeline import run_all
    from fashion_tagger.runs.run import create_run, interrupted_runs_like, open_run

    if resume and (config or set_):
        _fail("--resume continues a run with its own saved configuration: drop --config/--set")
    if resume:
        run = open_run(resume)
    else:
        cfg = load_config(config, set_)
        for earlier in interrupted_runs_like(cfg)[-1:]:
            typer.secho(f"note: run {earlier} has this configuration and was interrupted; "
                        f"`fashion-tagger run --resume {earlier}` continues it. Starting a new run.",
                        fg=typer.colors.YELLOW, err=True)
        run = create_run(cfg)
    result = run_all(run, force=force)
    _emit(result)
    typer.echo(result.summary, err=True)


@app.command("runs")
def list_runs(as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False) -> None:
    """List the runs of the home with their status and last completed stage."""
    from fashion_tagger.core.config import project_home
    from fashion_tagger.runs.run import format_runs, list_runs

    rows = list_runs(project_home())
    typer.echo(json.dumps(rows, indent=2) if as_json else format_runs(rows))


_verbose = False


def main() -> None:
    """The error contract (errors.py): an error we understand is one line and its exit code (2: bad input,
    75: transient, worth a retry); `--verbose` adds its traceback. Anything else is a bug and shows one."""
    try:
        try:
            app()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            raise ScratchFullError(f"no space left on the device{where}: free space there (a scratch folder, "
                                   f"{SCRATCH_ENV}, is a cache that may be emptied between tasks); a retry "
                                   "continues from what was complete") from exc
    except FashionTaggerError as exc:
        if _verbose:
            traceback.print_exc()
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
