"""The two web UIs as a person uses them, in Chromium: `make up` (scripts/up.sh) on free ports in a temporary home,
log in to Airflow, trigger `fashion_tagger_training` through its form, watch the run succeed and read train_model's
log, then find the champion in MLflow with its headline metric and evaluation plots. A screenshot of every step goes
to tests/.screenshots/test_browser/ (git-ignored), where it stays, also when the test fails.

Playwright drives Debian's `chromium` (scripts/ensure_services.sh installs it); `playwright install` is not needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from process_sessions import session_members

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1200)]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: pip install -e '.[dev]'")
expect = sync_api.expect
# Generous: on a busy machine the Airflow API answers a page's queries in tens of seconds.
UI_TIMEOUT_MS = 60_000
expect.set_options(timeout=UI_TIMEOUT_MS)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("FASHION_TAGGER_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("FASHION_TAGGER_SCREENSHOTS") or REPO / "tests" / ".screenshots") / "test_browser"
DAG_ID = "fashion_tagger_training"
DAG_TITLE = "Fashion tagger: retrain and register"
MODEL_NAME = "fashion-tagger"
HEADLINE_METRIC = "headline_macro_f1"
TASKS = 7
RUN_TIMEOUT_S = 600
FORM = {  # trigger-form field title -> value typed or chosen; a few hundred generated rows, one epoch
    "Preset": "demo",
    "Dataset source": "synthetic:300",
    "Minimum class count": "10",
    "Epochs": "1",
    "Batch size": "32",
    "Image width": "32",
    "Image height": "40",
}

# ---- train_model's log, as the UI shows it: (what to type into "Search logs...", the line that must show) ----------
# The per-epoch line of training, e.g. `epoch 1/1 ... train loss ... val macro-F1 ...`.
PER_EPOCH_LINE = ("epoch 1/1", r"epoch 1/1\b.*train loss.*val_macro_f1 [0-9.]+ \(best [0-9.]+\).*img/s")
# The trainer's summary, which its log holds today.
TRAINER_SUMMARY_LINE = ('"epochs_completed"', r'"epochs_completed": 1\b')
TRAIN_LOG_LINE = PER_EPOCH_LINE

# Folders of the checkout that the test may not judge: caches, the venv, the Makefile's home, its own screenshots.
NOT_CHECKED = {".git", ".venv", ".home", "__pycache__", ".pytest_cache", ".ruff_cache", ".screenshots"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checkout_files() -> set[str]:
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in NOT_CHECKED and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(root, name), REPO) for name in files + dirs)
    return found


@dataclass
class Services:
    home: Path
    airflow_url: str
    mlflow_url: str
    password: str


@pytest.fixture
def services(isolated_home):
    """What `make up` starts, in a temporary home on free ports; `make down` (scripts/down.sh) stops it afterwards."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/ensure_services.sh (Debian package `chromium`)")
    airflow_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FASHION_TAGGER_", "MLFLOW_"))}
    env.update(
        FASHION_TAGGER_HOME=str(isolated_home),
        AIRFLOW_UI_PORT=str(airflow_port),
        MLFLOW_UI_PORT=str(mlflow_port),
        VENV_BIN=str(Path(sys.executable).parent),
        FASHION_TAGGER_TASK_RETRIES="0",  # a failing task shows at once instead of after retry backoffs
        # The tasks import this checkout's package even when the venv was installed from another one.
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    before = checkout_files()
    try:
        up = subprocess.run(["scripts/up.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        assert up.returncode == 0, f"scripts/up.sh failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        passwords = isolated_home / "airflow" / "simple_auth_manager_passwords.json.generated"
        assert str(passwords) in up.stdout, up.stdout  # `make up` tells where the password is
        yield Services(isolated_home, f"http://127.0.0.1:{airflow_port}", f"http://127.0.0.1:{mlflow_port}",
                       json.loads(passwords.read_text())["admin"])
    finally:
        service_dir = isolated_home / "services"
        sessions = [int(p.read_text()) for p in service_dir.glob("*.pid")] if service_dir.is_dir() else []
        down = subprocess.run(["scripts/down.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, f"scripts/down.sh failed:\n{down.stdout}\n{down.stderr}"
    left = {sid: session_members(sid) for sid in sessions}
    assert not any(left.values()), f"make down left processes running: {left}"
    written = checkout_files() - before  # e.g. MLflow's ./mlruns when a service runs from the checkout
    assert not written, f"make up / the DAG run wrote into the checkout: {sorted(written)}"


class Screenshots:
    """Numbered full-page screenshots of the steps, in a folder emptied when the test starts."""

    def __init__(self, folder: Path):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.count = folder, 0

    def take(self, page, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(services):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(UI_TIMEOUT_MS)
        page = context.new_page()
        page.server_errors = []  # (status, url, body) of every 5xx answer, shown when the test fails
        page.on("response", lambda response: response.status >= 500 and page.server_errors.append(
            (response.status, response.url, _body(response))))
        try:
            yield page
        finally:
            browser.close()


def _body(response) -> str:
    try:
        return response.text()[:2000]
    except sync_api.Error as error:  # e.g. the page navigated away before the body was read
        return f"(body not read: {error})"


def field_group(dialog, title: str):
    """The group of the trigger-form field titled `title`: its label (which may carry a required mark) and input."""
    label = re.compile(rf"^\s*{re.escape(title)}\s*\*?\s*$")
    return dialog.get_by_role("group").filter(has=dialog.page.get_by_text(label))


def form_field(dialog, title: str):
    """The input of the trigger-form field titled `title`. Inputs with suggestions (`examples`) are not tied to their
    label in Airflow 3.3 (the label's `for` names another id): for them, the combobox of the field's group."""
    label = re.compile(rf"^\s*{re.escape(title)}\s*\*?\s*$")
    return dialog.get_by_label(label).or_(field_group(dialog, title).get_by_role("combobox")).first


def reveal(dialog, title: str, timeout_s: float = 30):
    """The field titled `title`, opening the form section that holds it (one section is open at a time). The form
    grows its sections once the DAG's params have loaded, so look again until `timeout_s`."""
    field = form_field(dialog, title)
    deadline = time.monotonic() + timeout_s
    while True:
        if field.is_visible():
            return field
        sections = [name.strip() for name in dialog.get_by_role("button", expanded=False).all_inner_texts()]
        for name in filter(None, sections):
            section = dialog.get_by_role("button", name=name, exact=True)
            if section.get_attribute("aria-expanded") == "false":
                section.click()
            with suppress(sync_api.Error):
                field.wait_for(state="visible", timeout=1_000)
                return field
        if time.monotonic() > deadline:
            raise AssertionError(f"the trigger form has no field titled {title!r} (sections: {sections})")
        time.sleep(1)


def fill_form(page, dialog, values: dict[str, str]) -> None:
    for title, value in values.items():
        field = reveal(dialog, title)
        if field.get_attribute("aria-haspopup"):  # a select: open it, pick the option whose label starts with value
            field.click()
            page.get_by_role("option", name=re.compile(rf"^{re.escape(value)}\b")).click()
            expect(field_group(dialog, title)).to_contain_text(value)
            continue
        field.fill(value)
        if field.get_attribute("role") == "combobox":  # free text with suggestions: close the suggestions
            field.press("Escape")
        expect(field).to_have_value(value)


def wait_for_run(page, timeout_s: float) -> None:
    """Until every task instance of the open run page shows Success; fails at the first failed task."""
    rows = page.get_by_role("table").get_by_role("row")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        failed = rows.filter(has_text=re.compile(r"\b(Failed|Upstream Failed)\b"))
        if failed.count():
            raise AssertionError(f"the run failed: {failed.first.inner_text()}")
        if rows.filter(has_text="Success").count() == TASKS:
            return
        time.sleep(10)
        page.reload()
    raise AssertionError(f"the run did not succeed within {timeout_s:.0f} s")


def open_trigger_form(page, timeout_s: float = UI_TIMEOUT_MS / 1000):
    """The DAG page's trigger dialog. A click made while the page still re-renders can be lost with the button it
    hit, so click again until the dialog shows. .first: while the page settles, the header and the grid may each
    render a trigger button for a moment."""
    dialog = page.get_by_role("dialog")
    heading = dialog.get_by_role("heading", name=re.compile("^Trigger Dag"))
    deadline = time.monotonic() + timeout_s
    while True:
        page.get_by_role("button", name="Trigger Dag").first.click()
        try:
            heading.wait_for(state="visible", timeout=10_000)
            return dialog
        except sync_api.TimeoutError:
            if time.monotonic() > deadline:
                raise


def dismiss_mlflow_dialogs(page) -> None:
    """MLflow greets a new browser with announcement dialogs; close them as a person would."""
    dialogs = page.get_by_role("dialog")
    with suppress(sync_api.Error):
        dialogs.first.wait_for(state="visible", timeout=2_000)
    for dialog in dialogs.all():
        with suppress(sync_api.Error):
            dialog.get_by_role("button", name="Close").click(timeout=2_000)


def test_trigger_in_airflow_watch_it_succeed_and_find_the_champion_in_mlflow(services, page):
    shots = Screenshots(SCREENSHOTS)
    try:
        trigger_and_watch_in_airflow(services, page, shots)
        find_the_champion_in_mlflow(services, page, shots)
    except BaseException:
        with suppress(Exception):
            print(f"screenshot of the failure: {shots.take(page, 'failure')}")
        for status, url, body in page.server_errors[:10]:
            print(f"the UI got {status} from {url}: {body}")
        raise
    finally:
        print(f"screenshots: {shots.folder}")


def trigger_and_watch_in_airflow(services: Services, page, shots: Screenshots) -> None:
    # Log in with the password `make up` generated.
    page.goto(services.airflow_url)
    expect(page.get_by_role("heading", name="Sign into Airflow")).to_be_visible()
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(services.password)
    shots.take(page, "airflow-login")
    page.get_by_role("button", name="Sign in").click()

    # The DAG list: the DAG appears once the dag-processor has parsed it.
    page.get_by_role("link", name="Dags", exact=True).first.click()
    dag_link = page.get_by_role("link", name=DAG_TITLE, exact=True)
    deadline = time.monotonic() + 180
    while not dag_link.is_visible() and time.monotonic() < deadline:
        time.sleep(5)
        page.reload()
    expect(dag_link).to_be_visible()
    shots.take(page, "airflow-dags")
    dag_link.click()
    expect(page).to_have_url(re.compile(rf"/dags/{DAG_ID}$"))
    # The DAG's own page, rendered: its task list (the URL changes before the list page is gone, and the list
    # has a trigger button per DAG that a click made too early would hit).
    expect(page.get_by_text("register_model", exact=True).first).to_be_visible()
    with suppress(sync_api.Error):  # the page re-renders as its data arrives, which would close a dialog opened early
        page.wait_for_load_state("networkidle", timeout=15_000)
    shots.take(page, "airflow-dag")

    # The trigger form, filled through its labelled fields.
    dialog = open_trigger_form(page)
    data_fields = ("Preset", "Dataset source", "Minimum class count")
    fill_form(page, dialog, {title: FORM[title] for title in data_fields})
    shots.take(page, "trigger-form-data")
    fill_form(page, dialog, {title: value for title, value in FORM.items() if title not in data_fields})
    shots.take(page, "trigger-form-training")
    dialog.get_by_role("button", name="Advanced Options").click()
    expect(dialog.get_by_text("Configuration JSON")).to_be_visible()
    shots.take(page, "trigger-form-configuration-json")
    dialog.get_by_role("button", name="Trigger", exact=True).click()
    expect(page.get_by_text("Dag run has been successfully triggered").first).to_be_visible()
    expect(page).to_have_url(re.compile(rf"/dags/{DAG_ID}/runs/manual__"))  # the UI opens the new run

    # One run, the one just triggered: no scheduled run starts beside it and nothing waits in the queue.
    page.get_by_role("link", name=DAG_TITLE, exact=True).first.click()
    try:
        page.wait_for_url(re.compile(rf"/dags/{DAG_ID}$"), timeout=15_000)
    except sync_api.TimeoutError:
        # The breadcrumb link sometimes swallows a click made while the run page is still loading its data.
        page.goto(f"{services.airflow_url}/dags/{DAG_ID}")
    expect(page).to_have_url(re.compile(rf"/dags/{DAG_ID}$"))
    page.get_by_role("link", name="Runs", exact=True).click()
    run_rows = page.get_by_role("table").get_by_role("row").filter(has=page.get_by_role("link", name=re.compile("__")))
    expect(run_rows).to_have_count(1)
    expect(run_rows.first).to_contain_text("Manual")
    shots.take(page, "airflow-runs")
    run_rows.first.get_by_role("link", name=re.compile("^manual__")).click()

    wait_for_run(page, RUN_TIMEOUT_S)
    shots.take(page, "airflow-run-succeeded")

    # train_model's log, as the UI shows it.
    page.get_by_role("table").get_by_role("link", name="train_model", exact=True).click()
    expect(page.get_by_role("heading", name="train_model")).to_be_visible()
    search, line = TRAIN_LOG_LINE
    page.get_by_role("textbox", name="Search logs...").fill(search)
    expect(page.get_by_text(re.compile(line)).first).to_be_visible()
    shots.take(page, "airflow-train-model-log")

    page.goto(f"{services.airflow_url}/dags/{DAG_ID}/runs")
    expect(run_rows).to_have_count(1)  # still one: nothing was scheduled while it ran


def find_the_champion_in_mlflow(services: Services, page, shots: Screenshots) -> None:
    # MLflow: the registered model, its champion version, that version's run.
    page.goto(services.mlflow_url)
    with suppress(sync_api.Error):  # MLflow 3 opens on its GenAI view; models live under "Model training"
        page.get_by_role("button", name="Model training").click(timeout=5_000)
    page.get_by_role("link", name="Model registry").click()
    dismiss_mlflow_dialogs(page)
    model_link = page.get_by_role("link", name=MODEL_NAME, exact=True)
    expect(model_link).to_be_visible()
    shots.take(page, "mlflow-models")
    model_link.click()
    dismiss_mlflow_dialogs(page)
    champion_row = page.get_by_role("row").filter(has=page.get_by_role("status", name="champion", exact=True))
    expect(champion_row).to_have_count(1)
    shots.take(page, "mlflow-model-versions")
    champion_row.get_by_role("link", name=re.compile(r"^Version \d+$")).click()
    main = page.get_by_role("main")
    expect(main.get_by_role("status", name="champion", exact=True)).to_be_visible()
    expect(main.get_by_text(FORM["Dataset source"], exact=True).first).to_be_visible()  # the model card: form's source
    shots.take(page, "mlflow-champion-version")
    main.get_by_role("link").and_(page.locator("[href*='/runs/']")).first.click()

    # The run: the headline metric, and the evaluation plots among its artifacts.
    page.get_by_role("textbox", name="Search metrics").fill(HEADLINE_METRIC)
    metric_row = page.get_by_role("row").filter(has=page.get_by_role("link", name=re.compile(HEADLINE_METRIC)))
    expect(metric_row.first).to_be_visible()
    value = float(re.search(r"\d+\.\d+", metric_row.first.inner_text()).group())
    assert 0.0 < value <= 1.0, f"{HEADLINE_METRIC} = {value}"
    shots.take(page, "mlflow-run-metrics")
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("eval", exact=True).click()
    eval_folder = page.get_by_role("listitem").filter(has=page.get_by_text("eval", exact=True))
    plots = eval_folder.get_by_role("listitem").filter(has_text=re.compile(r"\.png$"))
    expect(plots.first).to_be_visible()
    assert plots.count() >= 2, f"evaluation plots: {plots.all_inner_texts()}"
    plots.first.click()
    plot = page.get_by_role("img", name=re.compile(r"^eval\/.+\.png$"))  # `\/`: Playwright passes the regex on as /…/
    expect(plot).to_be_visible()
    assert plot.evaluate("img => img.complete && img.naturalWidth") > 0, "the plot preview did not load"
    shots.take(page, "mlflow-run-evaluation-plot")

    # MLflow's default artifact root lives in the home, not in the directory `make up` was started from.
    from mlflow import MlflowClient

    default = MlflowClient(f"sqlite:///{services.home / 'mlflow.db'}").get_experiment("0")
    assert default.artifact_location.startswith(str(services.home)), default.artifact_location
