"""Two training DAG runs and the tagging DAG at once on the production topology, against each alone (issue 20).

Starts the native stack of tests/native_stack.py (PostgreSQL, Redis, moto's S3 server, the MLflow server, Airflow's
API server, scheduler and DAG processor, a `default` and a `gpu` Celery worker, each with its own scratch folder),
then, through Airflow's REST API as a UI user would:

1. alone: one training run (smoke parameters on a new generated dataset, promoted to champion), then one tagging
   run of a catalog of generated photos in a bucket, each waited for;
2. at once: two training runs on two other new datasets and a tagging run of another catalog of the same size,
   triggered together.

Prints each run's time alone and at once, its task tries, and the wall time of the whole second phase against the
sum of the runs alone (below 1.0: the runs overlap; the gpu pool's one slot serialises training and tagging shards,
as on a one-GPU machine). Every run must succeed with no task retried.

Run: .venv/bin/python benchmarks/stack_load.py [--catalog 300] [--append docs/performance.md]
Needs PostgreSQL and Redis (scripts/ensure_services.sh installs them); about 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from native_stack import NativeStack, missing_prerequisites  # noqa: E402

TRAINING, TAGGING = "fashion_tagger_training", "fashion_tagger_tagging"
TRAIN_PARAMS = {  # the smoke run of tests/test_native_stack.py, two epochs
    "preset": "demo", "backbone": "test_efficientnet", "pretrained": "no", "image_width": 24, "image_height": 32,
    "epochs": 2, "batch_size": 32, "min_class_count": 10, "promote": "yes",
}
CATALOG_BUCKET = "catalogs"
TIMEOUT_S = 900
SECTION = "## two training runs and the tagging run at once on the stack (issue 20)"


def upload_catalog(stack: NativeStack, name: str, images: int, seed: int, work: Path) -> str:
    """IMAGES generated 60x80 product photos under s3://CATALOG_BUCKET/NAME/: the catalog's URI."""
    from fashion_tagger.data.synthetic.generator import generate_dataset

    out = generate_dataset(work / name, rows=images, size="small", seed=seed).out_dir
    client = stack.s3_client()
    for path in sorted((out / "images").glob("*.jpg")):
        client.upload_fileobj(io.BytesIO(path.read_bytes()), CATALOG_BUCKET, f"{name}/{path.name}")
    return f"s3://{CATALOG_BUCKET}/{name}"


def unpause(stack: NativeStack, dag_id: str) -> None:
    """Unpause DAG_ID once the DAG processor has parsed it."""
    deadline = time.monotonic() + 120
    while True:
        try:
            dag = stack.api("GET", f"dags/{dag_id}")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    if dag["is_paused"]:
        stack.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})


def trigger(stack: NativeStack, dag_id: str, conf: dict) -> str:
    return stack.api("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})["dag_run_id"]


def wait(stack: NativeStack, runs: dict[str, tuple[str, str]], started: float) -> dict[str, dict]:
    """Wait for RUNS ({label: (dag id, run id)}); per label its state, seconds from STARTED to its end, and the
    tries of its task instances beyond the first."""
    done: dict[str, dict] = {}
    deadline = time.monotonic() + TIMEOUT_S
    while len(done) < len(runs) and time.monotonic() < deadline:
        for label, (dag_id, run_id) in runs.items():
            if label in done:
                continue
            run = stack.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                tis = stack.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
                done[label] = {"state": run["state"], "seconds": round(time.monotonic() - started, 1),
                               "retried": sorted({ti["task_id"] for ti in tis if (ti["try_number"] or 1) > 1}),
                               "tasks": len(tis)}
                print(f"{label}: {done[label]}", flush=True)
        time.sleep(2)
    missing = set(runs) - set(done)
    if missing:
        raise SystemExit(f"runs {sorted(missing)} did not end within {TIMEOUT_S}s:\n{stack.diagnostics()}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=int, default=300, help="images per tagging catalog")
    parser.add_argument("--append", type=Path, help=f"write the table into this file's '{SECTION}' section")
    args = parser.parse_args()
    missing = missing_prerequisites()
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run scripts/ensure_services.sh")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp, NativeStack() as stack:
        print(f"native stack healthy after {stack.timings['healthy']:.0f}s", flush=True)
        # Unpaused before there is a champion: the tagging DAG's scheduled run for the last interval, which
        # unpausing starts, is then skipped ("nothing to tag yet") instead of tagging beside the measured runs.
        for dag_id in (TRAINING, TAGGING):
            unpause(stack, dag_id)
        stack.s3_client().create_bucket(Bucket=CATALOG_BUCKET)
        catalogs = [upload_catalog(stack, f"catalog-{i}", args.catalog, seed=10 + i, work=Path(tmp)) for i in (1, 2)]

        alone: dict[str, dict] = {}
        started = time.monotonic()
        run = trigger(stack, TRAINING, TRAIN_PARAMS | {"source": "synthetic:400"})
        alone["training"] = wait(stack, {"training": (TRAINING, run)}, started)["training"]
        started = time.monotonic()
        run = trigger(stack, TAGGING, {"source": catalogs[0]})
        alone["tagging"] = wait(stack, {"tagging": (TAGGING, run)}, started)["tagging"]

        started = time.monotonic()
        together = {
            "training 1": (TRAINING, trigger(stack, TRAINING, TRAIN_PARAMS | {"source": "synthetic:401"})),
            "training 2": (TRAINING, trigger(stack, TRAINING, TRAIN_PARAMS | {"source": "synthetic:402"})),
            "tagging": (TAGGING, trigger(stack, TAGGING, {"source": catalogs[1]})),
        }
        at_once = wait(stack, together, started)
        wall = max(r["seconds"] for r in at_once.values())

    failed = {k: v for k, v in {**alone, **{f"{k} (at once)": v for k, v in at_once.items()}}.items()
              if v["state"] != "success" or v["retried"]}
    rows = []
    for label, result in at_once.items():
        base = alone["tagging" if label == "tagging" else "training"]
        retried = ", ".join(result["retried"]) or "none"
        rows.append(f"| {label} | {base['seconds']:.0f} | {result['seconds']:.0f} | "
                    f"{result['seconds'] / base['seconds']:.2f} | {result['state']} | {retried} |")
    serial = 2 * alone["training"]["seconds"] + alone["tagging"]["seconds"]
    text = "\n".join([
        SECTION, "",
        f"`.venv/bin/python benchmarks/stack_load.py --catalog {args.catalog}`: the native stack (CeleryExecutor, "
        "one `default` and one `gpu` worker, the gpu pool with one slot), training runs of the smoke parameters "
        f"(test_efficientnet 24x32, 2 epochs, generated datasets of 400-402 rows), tagging runs of {args.catalog} "
        "generated photos in a bucket. 'alone' is the run by itself on the idle stack; 'at once' is from the "
        "moment the three were triggered together to the run's end.", "",
        "| run | alone (s) | at once (s) | at once / alone | state | tasks retried |",
        "| --- | ---: | ---: | ---: | --- | --- |",
        *rows, "",
        f"All three at once: {wall:.0f} s of wall time, against {serial:.0f} s for the same runs one after the other "
        f"({wall / serial:.2f}x).", "",
    ])
    print("\n" + text)
    if args.append:
        from inference import write_section

        write_section(args.append, SECTION, text)
    if failed:
        raise SystemExit(f"runs failed or retried a task: {failed}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "benchmarks"))
    main()
