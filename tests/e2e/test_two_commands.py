"""One machine, two commands: a sweep and a training run started at the same time each
start their own local Ray (``cliptd.cli.common.init_ray``: its own GCS port, its address
exported to its own processes) and both finish; neither Train run trips over the other
instance ("Found multiple active Ray instances"), and each run's epochs reach MLflow (the
train run's through Ray Train's controller, ``cliptd.training.live``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from _cli import diagnose

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_a_tune_and_a_train_at_once(tmp_path, world_cache):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CLIPTD_LOCAL_RAY")}
    env.update({"CLIPTD_CACHE": str(world_cache), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "HF_HUB_OFFLINE": "1",
                "CLIPTD_TRACKING_BUFFER": str(tmp_path / "buffer"), "PYTHONUNBUFFERED": "1"})
    commands = {
        "tune": [sys.executable, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small",
                 "--methods", "none", "--num-samples", "1", "--name", "beside",
                 "--storage-path", str(tmp_path / "ray"), "--out", str(tmp_path / "out"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'tune.db'}"],
        "train": [sys.executable, "-m", "cliptd.train", "--task", "vcr", "--budget", "small",
                  "--method", "none", "--epochs", "2", "--name", "beside-train",
                  "--storage-path", str(tmp_path / "ray"),
                  "--tracking-uri", f"sqlite:///{tmp_path / 'train.db'}"],
    }
    procs, logs = {}, {}
    for name, cmd in commands.items():
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("w") as f:
            procs[name] = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f,
                                           stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 1200
    try:
        for name, p in procs.items():
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish\n{diagnose(logs[name])}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
    for name, p in procs.items():
        out = logs[name].read_text(errors="replace")
        assert p.returncode == 0, f"{name}:\n{out[-5000:]}"
        assert "multiple active Ray instances" not in out, name

    from mlflow.tracking import MlflowClient

    tune = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'tune.db'}")
    exp = tune.get_experiment_by_name("cliptd-vcr")
    trials = tune.search_runs([exp.experiment_id], filter_string="tags.`cliptd.kind` = 'trial'")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    train = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'train.db'}")
    exp = train.get_experiment_by_name("cliptd-vcr")
    (run,) = train.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in train.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
    assert not list((tmp_path / "buffer").glob("*.jsonl"))
