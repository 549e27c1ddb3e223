"""The code's own rules: one module spells the run layout, the layers hold (import-linter), no import cycles."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fashion_tagger"
# File and folder names of the home, a run and the tags folder: only fashion_tagger/core/layout.py may spell them.
LAYOUT_NAMES = (
    "config.yaml", "state.json", "clean.parquet", "rejects.csv", "report.json", "train.parquet", "val.parquet",
    "test.parquet", "labels.json", "split_report.json", "fingerprint.json", "prepared.json", "prepare_failures.json",
    "checkpoints", "best.ckpt", "last.ckpt", "run.json", "metrics.json", "eval", "predictions.parquet",
    "registration.json", "model_card.md", "mlflow_run.json", "sample_predictions.png", "mlflow.db", "mlartifacts",
    # the tags folder of `fashion-tagger tag` and the tagging DAG's work folder
    "tags.parquet", "review.csv", "review.parquet", "changes.csv", "changes.parquet", "summary.json", "model.json",
    "catalog.parquet",
)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_only_the_layout_module_spells_the_names_of_the_run_layout():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py":
            continue
        for line, value in _string_constants(path):
            for name in LAYOUT_NAMES:
                # A bare name, or a path ending in it: messages may mention a name inside a sentence.
                if value == name or re.fullmatch(rf"[\w./-]*/{re.escape(name)}", value):
                    offenders.append(f"{path.relative_to(REPO)}:{line}: {value!r}")
    assert not offenders, "ask fashion_tagger.core.layout for these paths:\n" + "\n".join(offenders)


def test_import_contracts_hold():
    """pyproject.toml's import-linter contracts: no Airflow in the library, layers, no cycles."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout and result.stdout.count("KEPT") >= 3


MAX_MODULE_LINES = 450  # where to look for the seam (STYLE.md): a module that does six things is six modules


def test_no_module_of_the_library_or_the_dags_is_over_450_lines():
    too_long = {
        str(path.relative_to(REPO)): lines
        for path in sorted([*PACKAGE.rglob("*.py"), *(REPO / "dags").glob("*.py")])
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"split these by concern: {too_long}"


def test_every_folder_of_the_library_is_a_layer_of_the_import_contract():
    """A new subpackage must take its place in the layers; a new module inside one is covered by its folder."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    named = {part.strip().removeprefix("fashion_tagger.") for layer in layers for part in layer.split("|")}
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")} - {"presets"}
    assert subpackages <= named, f"add to the layers contract in pyproject.toml: {sorted(subpackages - named)}"


def test_yaml_is_only_ever_read_with_the_safe_loader():
    """A config, a preset or an MLmodel file must never construct Python objects: `yaml.safe_load` only."""
    unsafe = re.compile(r"yaml\.(load|load_all|unsafe_load|full_load)\s*\(|Loader\s*=\s*yaml\.(Loader|UnsafeLoader)")
    offenders = [f"{path.relative_to(REPO)}:{number}"
                 for folder in ("fashion_tagger", "dags", "scripts", "docker", "benchmarks")
                 for path in sorted((REPO / folder).rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if unsafe.search(line)]
    assert not offenders, offenders
