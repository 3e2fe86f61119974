"""``python -m cliptd.pretrain`` end to end: Ray Train with 2 data-parallel workers, the run
in MLflow, and the exported student fine-tunes."""

from __future__ import annotations

import os
import sys

import pytest
from _cli import run_cli


@pytest.mark.slow
def test_cli_pretrains_on_ray_train_with_mlflow(tiny_world, tmp_path):
    """``python -m cliptd.pretrain`` on Ray Train with 2 data-parallel workers: the run is
    in MLflow with its metrics per checkpoint, and the exported student fine-tunes."""
    corpus = tiny_world.synthetic / "corpus" / "student.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "student"
    cmd = [sys.executable, "-m", "cliptd.pretrain", "--corpus", str(corpus), "--out", str(out),
           "--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--workers", "2",
           "--cpus-per-worker", "0.5", "--storage-path", str(tmp_path / "ray"),
           "--tracking-uri", uri, "--name", "pt", "--vocab-from", str(tiny_world.data["vcr"])]
    proc = run_cli(cmd, env, tmp_path, 600, tmp_path / "pretrain.log")
    text = (tmp_path / "pretrain.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("cliptd-pretrain")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "4"
    history = c.get_metric_history(run.info.run_id, "pretrain/mlm")
    assert sorted(m.step for m in history) == [2, 4]
    assert run.data.metrics["pretrain/workers"] == 2
    from cliptd.training.loop import train_loop
    from cliptd.training.runtime import LocalRuntime as Local

    rt = Local()
    train_loop({"task": "vcr", "data": str(tiny_world.data["vcr"]), "student": str(out),
                "preset": "synthetic", "epochs": 1, "batch_size": 8,
                "distill": {"method": "none"}}, rt)
    assert rt.history[-1]["val/id/q_a"] >= 0
