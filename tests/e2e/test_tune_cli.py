"""End to end: the real ``python -m cliptd.tune`` CLI on a tiny embedded world — what lands
in MLflow (one run per trial, with the metric and the searched params), and a sweep whose
driver is SIGKILLed mid-sweep, then completed by ``--resume``, for both kinds of trial
(light: the loop in the Tune trial; train: a one-worker TorchTrainer); the full record of
a sweep for the default (light) kind, a method added to it by ``--resume``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import kill_cli, run_cli

pytestmark = pytest.mark.slow


def _cmd(tmp: Path, cache: Path, *extra: str):
    env = {**os.environ, "CLIPTD_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "HF_HUB_OFFLINE": "1",
           "CLIPTD_TRACKING_BUFFER": str(tmp / "buffer"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small",
           "--storage-path", str(tmp / "ray"), "--out", str(tmp / "out"),
           "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]
    return cmd, env


def _trial_runs(tmp: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cliptd-vcr")
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if r.data.tags.get("cliptd.kind") == "sweep"], \
        [r for r in runs if r.data.tags.get("cliptd.kind") == "trial"]


KINDS = pytest.mark.parametrize("kind", ["light", "train"])


def test_tune_cli_records_every_trial(tmp_path, world_cache, kind="light"):
    # the default kind; train trials' records are checked after the killed-and-resumed
    # sweep of test_driver_sigkill_then_resume (the suite's time: a train trial costs its
    # TorchTrainer's processes)
    methods = ["cliptd", "none"]
    # the sweep is run for cliptd alone, then given a second method by ``--resume``: the
    # finished cliptd search and seeds restore as they are, only the new method runs
    cmd, env = _cmd(tmp_path, world_cache, "--methods", "cliptd", "--name", "e2e",
                    "--trial-kind", kind)
    first = run_cli(cmd, env, tmp_path, 720, tmp_path / "tune.log")
    assert first.returncode == 0, first.stdout[-4000:]
    cmd, env = _cmd(tmp_path, world_cache, "--methods", ",".join(methods), "--name", "e2e",
                    "--trial-kind", kind, "--resume")
    proc = run_cli(cmd, env, tmp_path, 720, tmp_path / "added.log")
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    assert "resuming" in out and "e2e-search-synthetic-shots0.05-cliptd" in out
    import optuna

    study = optuna.load_study(study_name="e2e-synthetic-shots0.05-cliptd",
                              storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    assert len(study.trials) == 2, "the finished search was run again"
    assert "== Comparison" in out and "mlflow ui --backend-store-uri" in out
    assert "--host 127.0.0.1" in out
    client, parents, trials = _trial_runs(tmp_path)
    assert len(parents) == 1
    # small budget: 2 search trials per method (none searches lr, weight decay, warm-up);
    # the best one, having run every epoch, is seed 0; then seed 1 is re-run
    search = [r for r in trials if r.data.tags["phase"] == "search"]
    seeds = [r for r in trials if r.data.tags["phase"] == "seeds"]
    assert len(search) == 2 * len(methods) and len(seeds) == len(methods)
    # the searches ran at once, each with its own method (trainables named apart)
    assert sorted(r.data.tags["method"] for r in search) == sorted(methods * 2)
    assert sorted(r.data.params["distill.method"] for r in search) == sorted(methods * 2)
    assert {r.data.tags["seed"] for r in seeds} == {"1"}
    compared = [r for r in trials if r.data.tags.get("cliptd.compare") == "true"]
    assert sorted((r.data.tags["method"], r.data.tags["seed"]) for r in compared) == sorted(
        (m, s) for m in methods for s in ("0", "1"))
    for r in compared:  # the epoch before the last scored the eval_limit sample, the last all
        counts = [m.value for m in sorted(client.get_metric_history(
            r.info.run_id, "val/instances"), key=lambda m: m.step)]
        assert counts == [40, 100], counts
    assert len({r.data.tags["cliptd.trial_id"] for r in trials}) == len(trials)
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "score" in r.data.metrics and "val/id/q_a" in r.data.metrics
        assert r.info.status == "FINISHED"
        assert {"task", "shots", "method", "seed"} <= set(r.data.tags)
        assert "distill.method" in r.data.params and "lr" in r.data.params
        assert r.data.params["patience"] == "1"  # the small budget's, in every run's config
        assert r.data.params["versions.ray"] == "2.60.0"
        assert r.data.tags["trial_kind"] == kind
    for r in search:
        if r.data.tags["method"] == "cliptd":  # the searched knobs are recorded as params
            assert {"distill.select_ratio_v", "distill.weighting", "distill.lam"} <= set(
                r.data.params)
    assert len(list((tmp_path / "out" / "best").glob("*.yaml"))) == len(methods)
    assert (tmp_path / "out" / "comparison.md").read_text().count("|") > 10
    _check_best_students(tmp_path, client, parents[0], search, methods, out)


def _check_best_students(tmp_path, client, parent, search, methods, out):
    """Each search's best student: a transformers folder, logged as a model of its best
    trial's run (a light trial's checkpoint is Tune's, a train trial's Ray Train's)."""
    students = sorted((tmp_path / "out" / "best").glob("*-student"))
    assert [p.name for p in students] == sorted(
        f"synthetic-shots0.05-{m}-student" for m in methods), students
    assert all((p / "model.safetensors").is_file() for p in students)
    models = client.search_logged_models([parent.info.experiment_id])
    assert len(models) == len(methods) and {m.source_run_id for m in models} <= {
        r.info.run_id for r in search}
    assert len(client.get_run(parent.info.run_id).outputs.model_outputs) == len(methods)
    assert out.count("(MLflow logged model m-") == len(methods)


@KINDS
def test_driver_sigkill_then_resume(tmp_path, world_cache, kind):
    cmd, env = _cmd(tmp_path, world_cache, "--methods", "cliptd", "--name", "killed",
                    "--trial-kind", kind)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 900
    try:  # wait until a search trial has reported a result, then kill the driver hard
        while time.time() < deadline and proc.poll() is None:
            time.sleep(2)
            trials = list((tmp_path / "ray").glob("killed-search-*/train_driver_fn_*"))
            if len(trials) >= 2 and any((t / "result.json").exists() and (
                    t / "result.json").stat().st_size > 0 for t in trials):
                break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
    finally:  # the driver dies hard, and its local Ray instance with it
        kill_cli(proc)
    cmd, env = _cmd(tmp_path, world_cache, "--methods", "cliptd", "--name", "killed",
                    "--trial-kind", kind, "--resume")
    done = run_cli(cmd, env, tmp_path, 600, tmp_path / "resume.log")
    assert done.returncode == 0, done.stdout[-4000:]
    assert "resuming" in done.stdout
    client, parents, trials = _trial_runs(tmp_path)
    assert len(parents) == 1, "a resumed sweep reuses its parent run"
    search = [r for r in trials if r.data.tags["phase"] == "search"]
    assert len(search) == 2, "finished trials = the budget (num_samples=2), no duplicates"
    assert len({r.data.tags["cliptd.trial_id"] for r in search}) == 2
    for r in search:
        history = client.get_metric_history(r.info.run_id, "score")
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), f"epochs logged twice: {steps}"
        assert r.info.status == "FINISHED"
        assert r.data.tags["trial_kind"] == kind
        assert "val/id/q_a" in r.data.metrics and r.data.params["distill.method"] == "cliptd"
    assert all(r.info.status == "FINISHED" for r in trials)
    _check_best_students(tmp_path, client, parents[0], search, ["cliptd"], done.stdout)
    import optuna

    study = optuna.load_study(study_name="killed-synthetic-shots0.05-cliptd",
                              storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    assert len(study.trials) == 2, "the searcher continued instead of starting over"
