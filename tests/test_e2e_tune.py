"""End to end: the real ``python -m cliptd.tune`` CLI on a tiny embedded world, then what
landed in MLflow (one run per trial, with the metric and the searched params)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _run_tune(tmp: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPTD_CACHE": str(tmp / "cache"), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "HF_HUB_OFFLINE": "1",
           "CLIPTD_TRACKING_BUFFER": str(tmp / "buffer")}
    cmd = [sys.executable, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small",
           "--storage-path", str(tmp / "ray"), "--out", str(tmp / "out"),
           "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tune_cli_records_every_trial(tmp_path):
    proc = _run_tune(tmp_path, "--methods", "none,cliptd", "--name", "e2e")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "== Comparison" in out and "mlflow ui --backend-store-uri" in out
    assert "--host 127.0.0.1" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cliptd-vcr")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cliptd.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("cliptd.kind") == "trial"]
    assert len(parents) == 1
    # small budget: 2 search trials for cliptd, 1 for none (no knobs), then 1 seed each
    search = [r for r in trials if r.data.tags["phase"] == "search"]
    seeds = [r for r in trials if r.data.tags["phase"] == "seeds"]
    assert len(search) == 3 and len(seeds) == 2
    assert len({r.data.tags["cliptd.trial_id"] for r in trials}) == len(trials)
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "score" in r.data.metrics and "val/id/q_a" in r.data.metrics
        assert r.info.status == "FINISHED"
        assert {"task", "shots", "method", "seed"} <= set(r.data.tags)
        assert "distill.method" in r.data.params and "lr" in r.data.params
    for r in search:
        if r.data.tags["method"] == "cliptd":  # the searched knobs are recorded as params
            assert {"distill.select_ratio_v", "distill.weighting", "distill.lam"} <= set(
                r.data.params)
    best = list((tmp_path / "out" / "best").glob("*.yaml"))
    assert len(best) == 2
    assert (tmp_path / "out" / "comparison.md").read_text().count("|") > 10
