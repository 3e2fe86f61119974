"""The MLflow tracking server goes away mid-sweep and comes back: the sweep carries on and
nothing is lost.

A real ``mlflow server`` (SQLite backend) is started; ``python -m cliptd.tune`` runs a small
sweep against it over HTTP (3 searched trials on 2 slots, no seed re-runs); once the first
trial has logged an epoch the server is killed (SIGKILL, its whole process group: a crash,
not a clean stop), kept down for ``OUTAGE_S`` while trials train, then restarted on the same
port and backend. So the outage hits the first two trials' last epochs (logged into their
buffers, which the search replays when it closes their runs: Tune stops a trial right
after its last report, before its logger can retry) and, on this machine, the third
trial's start (its run cannot be opened yet: the trial trains anyway, and the search's
process opens the run with a later result). The sweep must exit 0, every Tune
trial must have exactly one MLflow run holding every epoch Ray saw it report (the final
one included, with the same score), no metric may be left in a local buffer, and the
output must say that the server was unreachable and when it came back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from _cli import diagnose

from cliptd.sweep.space import shipped_spaces

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
OUTAGE_S = 25
SWEEP_TIMEOUT_S = 600
SERVER_START_TIMEOUT_S = 120  # ~5 s idle; far more on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on a fixed port and SQLite file, in its own process group."""

    def __init__(self, tmp: Path, port: int):
        self.tmp, self.port, self.proc = tmp, port, None
        self.url = f"http://127.0.0.1:{port}"
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.tmp / f"mlflow-server-{self.starts}.log").open("wb")
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server",
             "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
             "--artifacts-destination", str(self.tmp / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp,
            start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n"
                            f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within {SERVER_START_TIMEOUT_S} s"
                            f"\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        return (self.tmp / f"mlflow-server-{self.starts}.log").read_text(
            errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL the server's whole group (the CLI and its uvicorn worker), wait it out."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        self.proc = None


def trial_epochs(client, experiment_id: str) -> dict[str, int]:
    """trial run id → the highest epoch MLflow holds for it."""
    runs = client.search_runs([experiment_id], filter_string="tags.`cliptd.kind` = 'trial'")
    return {r.info.run_id: int(r.data.metrics.get("epoch", 0)) for r in runs}


def ray_trials(storage: Path, sweep: str) -> dict[str, list[dict]]:
    """Every Tune trial of the sweep → the results Ray recorded for it, one per epoch."""
    out = {}
    for result in storage.glob(f"{sweep}-*/train_driver_fn_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        assert rows, f"{result.parent.name} reported nothing"
        out[f"{sweep}/{rows[0]['trial_id']}"] = rows
    return out


def test_sweep_survives_tracking_outage(tmp_path, world_cache):
    from mlflow.tracking import MlflowClient

    server = Server(tmp_path, free_port())
    server.start()
    env = {**os.environ, "CLIPTD_CACHE": str(world_cache), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "HF_HUB_OFFLINE": "1",
           "CLIPTD_TRACKING_BUFFER": str(tmp_path / "buffer"), "PYTHONUNBUFFERED": "1"}
    # the shipped VCR space with one seed: the search's best trial is the comparison, no
    # re-run after the search (the outage is over by then)
    space = yaml.safe_load(shipped_spaces()["vcr"].read_text())
    space["budgets"]["small"]["seeds"] = 1
    (tmp_path / "vcr.yaml").write_text(yaml.safe_dump(space))
    cmd = [sys.executable, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small",
           "--space", str(tmp_path / "vcr.yaml"), "--methods", "none", "--num-samples", "3",
           "--name", "outage", "--storage-path", str(tmp_path / "ray"),
           "--out", str(tmp_path / "out"), "--tracking-uri", server.url]
    log = tmp_path / "tune.log"
    client = MlflowClient(tracking_uri=server.url)
    outage = None
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:  # the first epoch lands
            time.sleep(1)
            exp = client.get_experiment_by_name("cliptd-vcr")
            if exp and any(trial_epochs(client, exp.experiment_id).values()):
                break
        assert proc.poll() is None, f"the sweep ended before the outage:\n" \
            f"{log.read_text()[-4000:]}"
        server.kill()
        outage = time.monotonic()
        time.sleep(OUTAGE_S)
        assert proc.poll() is None, f"the sweep died while the server was down:\n" \
            f"{log.read_text()[-4000:]}"
        server.start()
        outage = time.monotonic() - outage
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep did not finish in {SWEEP_TIMEOUT_S} s\n{diagnose(log)}")
        out = log.read_text(errors="replace")
        assert proc.returncode == 0, out[-4000:]

        exp = client.get_experiment_by_name("cliptd-vcr")
        ray = ray_trials(tmp_path / "ray", "outage")
        assert len(ray) == 3, sorted(ray)  # --num-samples 3, no seed re-runs
        runs = client.search_runs([exp.experiment_id],
                                  filter_string="tags.`cliptd.kind` = 'trial'")
        by_trial: dict[str, list] = {}
        for r in runs:
            by_trial.setdefault(r.data.tags["cliptd.trial_id"], []).append(r)
        assert sorted(by_trial) == sorted(ray), "one MLflow run per Tune trial"
        for trial_id, rows in ray.items():
            assert len(by_trial[trial_id]) == 1, f"{trial_id}: duplicate runs"
            run = by_trial[trial_id][0]
            assert run.info.status == "FINISHED", (trial_id, run.info.status)
            final = rows[-1]
            for key in ("score", "epoch", "val/id/q_a", "sys/peak_rss_mb"):
                history = {m.step: m.value for m in client.get_metric_history(
                    run.info.run_id, key)}
                # every epoch Ray saw, the last one included, is in MLflow, each once
                assert sorted(history) == [row["epoch"] for row in rows], (trial_id, key,
                                                                           history)
                assert history[final["epoch"]] == pytest.approx(final[key]), (trial_id, key)
        leftover = list((tmp_path / "buffer").glob("*.jsonl"))
        assert not leftover, f"metrics still buffered, never sent: {leftover}"
        # the outage hit the trials' logging, and the output says so, gap included
        assert "unreachable" in out and "buffering metrics" in out, out[-4000:]
        assert "reachable again after" in out, out[-4000:]
        parent = client.search_runs([exp.experiment_id],
                                    filter_string="tags.`cliptd.sweep_id` = 'outage'")[0]
        assert parent.info.status == "FINISHED"
        logged = json.loads(Path(client.download_artifacts(
            parent.info.run_id, "sweep.json", str(tmp_path))).read_text())
        assert logged["budget"]["num_samples"] == 3 and logged["args"]["num_samples"] == "3"
        print(f"server down {outage:.0f} s; {len(ray)} trials, all in MLflow")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        server.kill()
