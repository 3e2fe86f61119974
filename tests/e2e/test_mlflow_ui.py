"""The MLflow UI, in a real browser, shows a sweep's runs with their task / shots / method tags,
a searched param and the metric column.

Starts ``mlflow ui`` on a hand-built SQLite store, drives headless Chromium (Debian's
``chromium`` package) with Playwright, and saves a screenshot (path printed; set
``CLIPTD_UI_SCREENSHOT=docs/mlflow-ui.png`` to also copy it there). Skips only when no
Chromium executable is installed (``CLIPTD_CHROMIUM`` overrides the path); never downloads a
browser (no ``playwright install``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CLIPTD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
START_TIMEOUT_S = 120  # ~5-11 s on an idle machine; far more on a busy 2-CPU one
UI_TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set "
                              "CLIPTD_CHROMIUM)"),
    pytest.mark.timeout(400),
]

CONDITIONS = {"synthetic-shots0.05": "0.05", "synthetic-shots1.0": "1.0"}
METHODS = ("none", "naive", "cliptd")
# final in-domain Q→A per (condition, method, seed): distinct, short, easy to find on screen
Q_A = {(c, m, s): round(0.3 + 0.2 * ci + 0.05 * mi + 0.001 * (s + 1), 3)
       for ci, c in enumerate(CONDITIONS) for mi, m in enumerate(METHODS) for s in range(2)}
WEIGHTING = {"none": "uniform", "naive": "uniform", "cliptd": "confidence"}


def build_store(path: Path) -> dict:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("cliptd-vcr", artifact_location=(path / "artifacts").as_uri())
    parent = c.create_run(exp, run_name="vcr-ui", tags={
        "cliptd.kind": "sweep", "cliptd.sweep_id": "vcr-ui", "task": "vcr",
        "budget": "small"}).info.run_id
    names = {}
    for (cond, method, seed), q_a in Q_A.items():
        name = f"{cond}/{method}/seed{seed}"
        run = c.create_run(exp, run_name=name, tags={
            "mlflow.parentRunId": parent, "cliptd.kind": "trial",
            "cliptd.trial_id": f"vcr-ui/{name}", "task": "vcr", "condition": cond,
            "shots": CONDITIONS[cond], "preset": "synthetic", "method": method,
            "seed": str(seed), "subset_seed": str(seed), "phase": "seeds", "sweep": "vcr-ui"})
        rid = run.info.run_id
        metrics = [Metric("val/id/q_a", 0.25, 1000, 0), Metric("val/id/q_a", q_a, 2000, 1),
                   Metric("score", q_a, 2000, 1)]
        params = [Param("distill.method", method), Param("distill.weighting", WEIGHTING[method]),
                  Param("lr", "0.0001")]
        c.log_batch(rid, metrics=metrics, params=params)
        c.set_terminated(rid, "FINISHED")
        names[name] = (cond, method, seed)
    c.set_terminated(parent, "FINISHED")
    return {"uri": uri, "experiment_id": exp, "parent": parent, "names": names}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_ui(proc: subprocess.Popen) -> None:
    """SIGTERM the CLI (it ends its uvicorn worker), wait; SIGKILL our own group if needed."""
    pgid = proc.pid  # start_new_session=True: the group holds exactly what this test started
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def ui(tmp_path):
    store = build_store(tmp_path)
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           # no background job runner (8 huey processes) for a read-only look
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (tmp_path / "mlflow-ui.log").open("wb")
    proc = subprocess.Popen(
        [str(mlflow_bin), "ui", "--backend-store-uri", store["uri"], "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow ui exited with {proc.returncode}:\n"
                            f"{(tmp_path / 'mlflow-ui.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not answer /health within {START_TIMEOUT_S} s:\n"
                            f"{(tmp_path / 'mlflow-ui.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {**store, "url": url, "proc": proc, "tmp": tmp_path}
    finally:
        stop_ui(proc)
        log.close()
    assert proc.returncode is not None and not _group_alive(proc.pid)


def _row_text(page, name: str) -> str:
    """A grid row's whole text: the pinned run-name part and the scrolling part share a
    row-id."""
    left = page.locator('[role="row"][row-id]').filter(has_text=name)
    left.first.wait_for(timeout=UI_TIMEOUT_MS)
    row_id = left.first.get_attribute("row-id")
    return " | ".join(page.locator(f'[role="row"][row-id="{row_id}"]').all_inner_texts())


def test_runs_visible_in_mlflow_ui(ui):
    from playwright.sync_api import sync_playwright

    from cliptd.tracking.runs import experiment_url

    columns = {"metric": "val/id/q_a", "param": "distill.weighting", "tags": ["task", "shots",
                                                                            "method", "seed"]}
    shot = ui["tmp"] / "mlflow-ui.png"
    page = None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"],
                                    timeout=UI_TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # the link the commands print opens the runs table (the plain experiment link
            # opens MLflow 3's GenAI overview)
            page.goto(experiment_url(ui["url"], ui["experiment_id"]))
            page.get_by_text("matching runs").wait_for()
            assert "/runs" in page.url and "workflowType=machine_learning" in page.url
            assert "cliptd-vcr" in page.inner_text("body")
            # show the columns: Columns ▸ tick each (antd tree nodes carry the name as title)
            page.get_by_role("button", name="Columns", exact=True).click()
            menu = page.get_by_role("dialog", name="Popover content")
            for name in ["Dataset", "Source", "Models"]:  # defaults, untick for room
                menu.locator(f'[title="{name}"]').click()
            for name in [columns["metric"], columns["param"], *columns["tags"]]:
                node = menu.locator(f'[title="{name}"]').locator("xpath=..")
                node.locator("[class*='tree-checkbox']").first.click()
                assert "checkbox-checked" in node.get_attribute("class"), name
            page.keyboard.press("Escape")
            menu.wait_for(state="hidden")
            assistant_close = page.get_by_role("button", name="Close")
            if assistant_close.count():  # the "MLflow Assistant" side panel, open at first
                assistant_close.last.click()
            headers = page.locator('[role="columnheader"]').all_inner_texts()
            for name in [columns["metric"], columns["param"], *columns["tags"]]:
                assert name in headers, (name, headers)
            # child runs sit under the sweep's parent run: expand it
            parent_row = page.locator('[role="row"][row-id]').filter(has_text="vcr-ui").first
            parent_row.get_by_role("button").first.click()
            for name, (cond, method, seed) in ui["names"].items():
                text = _row_text(page, name)
                for value in ("vcr", CONDITIONS[cond], method, WEIGHTING[method],
                              f"{Q_A[(cond, method, seed)]:g}"):
                    assert value in text, (name, value, text)
            assert page.get_by_text("matching runs").inner_text().startswith(
                str(len(ui["names"]) + 1))
            page.screenshot(path=str(shot), full_page=True)
        except Exception:
            if page is not None:
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the failure: {shot}")
            raise
        finally:
            browser.close()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    print(f"MLflow UI screenshot: {shot}")
    if os.environ.get("CLIPTD_UI_SCREENSHOT"):
        dest = Path(os.environ["CLIPTD_UI_SCREENSHOT"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
        print(f"copied to {dest}")
