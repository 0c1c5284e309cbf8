"""Screenshots of the MLflow UI on a real medseg run, for the docs, taken in headless Chromium.

Trains ``configs/demo_segmentation.yaml`` for a few epochs, validating every epoch (so each
validation logs its overlays with the epoch as step), into a temporary folder; serves that store
with a real ``mlflow server`` on a free localhost port; and photographs

* the run page's "Model metrics" tab, filtered to the overlays the validations logged, each chart
  with its step slider over the epochs, set to the last (``docs/screenshots/mlflow_run_images.png``);
* the experiment page in MLflow's "Model training" view: the run with the manifest's datasets
  (one per role, the manifest's hash as digest) and its model (``docs/screenshots/mlflow_experiment.png``).

Usage (from the repository root):
    python benchmarks/screenshots_mlflow.py [--epochs 6] [--keep /tmp/medseg-mlflow-shots]

``--keep DIR`` trains into DIR, or reuses the run already there. Needs Playwright
(``pip install -e .[dev]``) and Chromium (``make browser``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_segmentation.yaml"
EXPERIMENT = "medseg-demo"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def train_demo(workdir: Path, epochs: int) -> dict[str, Any]:
    """Train the demo into ``workdir`` (or reuse the run there); its ``summary.json`` as a dict."""
    import medseg

    done = sorted(workdir.glob("runs/*/summary.json"))
    if done:
        return json.loads(done[-1].read_text())
    result = medseg.train(CONFIG, progress=False, overrides=[
        f"output_dir={workdir / 'runs'}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.experiment={EXPERIMENT}", f"train.max_epochs={epochs}", "train.max_minutes=null",
        "train.val_interval=1", "validation.hd95=false", "validation.overlays=2",
        "tracking.system_metrics_interval_s=2"])
    if result is None:
        raise SystemExit("training returned no result (a distributed run?)")
    return json.loads(result.summary_path.read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mlflow_server(store: str, log_path: Path, timeout_s: float = 120) -> Iterator[str]:
    """A real ``mlflow server`` on ``store`` at a free localhost port; its URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--backend-store-uri", store, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"mlflow server did not come up; see {log_path}") from None
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def experiment_id(url: str) -> str:
    query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as response:
        return str(json.loads(response.read())["experiment"]["experiment_id"])


def show_overlays(page: Any, step: int) -> None:
    """On the run page's "Model metrics" tab: only the overlay charts, each without the run's
    parameters (MLflow lists them all above the picture by default) and at ``step``."""
    page.get_by_placeholder("Search metric charts").fill("val/overlay")
    # the charts the search hides stay in the page, hidden
    cards = page.locator('[data-testid="experiment-view-compare-runs-card"]:visible').filter(
        has=page.locator("h4", has_text="val/overlay/"))
    cards.first.wait_for(timeout=60_000)
    for index in range(cards.count()):
        cards.nth(index).get_by_test_id("experiment-view-compare-runs-card-menu").click()
        page.get_by_role("menuitem", name="Configure").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("switch").click()  # "Show run parameters"
        dialog.get_by_role("button", name="Save changes").click()
        dialog.wait_for(state="hidden")
    steps = page.locator("input[type=number]:visible")
    for index in range(steps.count()):
        steps.nth(index).fill(str(step))
        steps.nth(index).press("Tab")  # the slider takes the typed step when the box loses focus
    page.wait_for_timeout(3000)  # the pictures load after their charts


def photograph(url: str, experiment: str, run_id: str, step: int, out_dir: Path, width: int,
               height: int) -> list[Path]:
    """The run page's overlays (with their step slider) and the experiment page, as PNGs."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Chromium not found: `make browser` installs it")
    out_dir.mkdir(parents=True, exist_ok=True)
    run_page, experiment_page = out_dir / "mlflow_run_images.png", out_dir / "mlflow_experiment.png"
    # MLflow 3.17 picks its GenAI or model-training layout from this parameter (else the browser's last choice)
    view = "workflowType=machine_learning"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"{url}/#/experiments/{experiment}/runs/{run_id}/model-metrics?{view}")
            assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
            assistant.wait_for(timeout=60_000)
            assistant.click()  # the chat panel would hide half the charts
            page.add_style_tag(content="[data-assistant-ui] { display: none !important; }")  # and its button some
            show_overlays(page, step)
            page.screenshot(path=str(run_page))

            page.goto(f"{url}/#/experiments/{experiment}/runs?{view}")
            page.add_style_tag(content="[data-assistant-ui] { display: none !important; }")
            page.get_by_text("Dataset", exact=False).first.wait_for(timeout=60_000)
            page.get_by_text("Expand rows").click()  # every dataset of the run with its context, not the first
            page.wait_for_timeout(3000)
            page.screenshot(path=str(experiment_page))
        finally:
            browser.close()
    return [run_page, experiment_page]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs to train, each validated (default 6)")
    parser.add_argument("--step", type=int, help="the epoch the overlays show (default: the last)")
    parser.add_argument("--keep", type=Path, help="train into this folder and keep it, or reuse the run there")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=680)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medseg-mlflow-shots-") as tmp:
        workdir = (args.keep or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        summary = train_demo(workdir, args.epochs)
        step = args.step or int(summary["metrics"]["train/epochs"])
        with mlflow_server(summary["tracking_uri"], workdir / "server.log") as url:
            for path in photograph(url, experiment_id(url), summary["run_id"], step, args.out, args.width,
                                   args.height):
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
