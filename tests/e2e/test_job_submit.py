"""The round trip of docs/cluster.md, "Submit a sweep": ``ray job submit --working-dir .``
against a cluster's job server on loopback runs the sweep *on that cluster*.

A one-node cluster stands in for the head of ``clusters/*.yaml``, started as they start it
(token auth, dashboard and Jobs API on 127.0.0.1, ``cliptd_driver``, MLflow on
127.0.0.1:5000), in a network namespace of its own so that its ports are its own and
stopping it ends only its processes. The submission is the documented command, with
``RAY_ADDRESS=http://127.0.0.1:8265`` in place of the SSH tunnel's end; the job's
entrypoint finds the cluster through the ``RAY_ADDRESS`` the job server sets
(``cliptd.cli.common.init_ray``). The job must succeed, its trials must be in the
cluster's MLflow and its checkpoints under the storage path, and the head's own Ray must
be what ran them (its job list holds the submission)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

try:
    import _netns
except ImportError:  # pragma: no cover
    from tests.e2e import _netns

REPO = Path(__file__).resolve().parents[2]
WHY_NOT = _netns.why_not()


@pytest.fixture
def head(tmp_path, world_cache):
    if WHY_NOT:
        pytest.skip(f"no network namespace for the cluster: {WHY_NOT}")
    py = sys.executable
    short = Path(tempfile.mkdtemp(prefix="cltd", dir="/tmp"))  # AF_UNIX path limit
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CLIPTD_LOCAL_RAY")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PYTHONUNBUFFERED": "1",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                # what ~/.cliptd_env gives every node of clusters/*.yaml
                "CLIPTD_STORAGE_PATH": str(tmp_path / "storage"),
                "CLIPTD_CACHE": str(world_cache),
                "CLIPTD_TRACKING_BUFFER": str(tmp_path / "buffer"),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                # the nodes' `python` is the one cliptd is installed in (the cluster image's)
                "PATH": f"{Path(py).parent}:{os.environ.get('PATH', '')}"})
    host = _netns.Hosts(single=True)
    try:
        host.start("head", [str(Path(py).with_name("mlflow")), "server",
                            "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                            "--artifacts-destination", str(tmp_path / "artifacts"),
                            "--host", "127.0.0.1", "--port", "5000", "--workers", "1"],
                   env, tmp_path / "mlflow.log", cwd=tmp_path)
        host.start("head", [py, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                            "--node-ip-address=127.0.0.2", "--port=6379", "--num-cpus=2",
                            "--resources", '{"cliptd_driver": 8}', f"--temp-dir={short}",
                            "--object-store-memory=200000000", "--dashboard-host=127.0.0.1",
                            "--dashboard-port=8265", "--disable-usage-stats"],
                   env, tmp_path / "ray-head.log")
        # any HTTP answer will do: without the token it is 401
        jobs_up = [py, "-c", "import urllib.request, urllib.error\ntry:\n"
                   " urllib.request.urlopen('http://127.0.0.1:8265/api/version', timeout=2)\n"
                   "except urllib.error.HTTPError:\n pass"]
        health = [py, "-c", "import urllib.request; urllib.request.urlopen("
                  "'http://127.0.0.1:5000/health', timeout=2)"]
        host.wait_for("the job server", lambda: host.run("head", jobs_up, env).returncode == 0,
                      180, [tmp_path / "ray-head.log"])
        host.wait_for("MLflow", lambda: host.run("head", health, env).returncode == 0, 180,
                      [tmp_path / "mlflow.log"])
        yield {"host": host, "env": env}
    finally:
        killed = host.close()
        shutil.rmtree(short, ignore_errors=True)
    assert not killed, f"still running after SIGTERM: {killed}"


def test_ray_job_submit_runs_the_sweep_on_the_cluster(head, tmp_path):
    host, py = head["host"], sys.executable
    ray_cli = str(Path(py).with_name("ray"))
    # the client side: the token and RAY_ADDRESS, nothing of the cluster's environment
    client = {k: v for k, v in head["env"].items() if not k.startswith("CLIPTD_")}
    client["RAY_ADDRESS"] = "http://127.0.0.1:8265"
    client["PATH"] = f"{Path(py).parent}:{client.get('PATH', '')}"
    entry = ("python -m cliptd.tune --task vcr --budget small --methods none "
             "--num-samples 1 --name submitted "
             '--storage-path "$CLIPTD_STORAGE_PATH" --tracking-uri http://127.0.0.1:5000')
    # docs/cluster.md, "Submit a sweep": the cluster's CLIPTD_STORAGE_PATH, single-quoted
    proc = host.run("head", [ray_cli, "job", "submit", "--working-dir", ".", "--",
                             "bash", "-c", entry], client, timeout=1200, cwd=REPO)
    out = proc.stdout + proc.stderr
    (tmp_path / "submit.log").write_text(out)
    assert proc.returncode == 0, out[-6000:]
    assert "succeeded" in out, out[-3000:]
    assert "[cliptd] sweep submitted" in out  # the entrypoint's own output, streamed back
    listed = host.run("head", [ray_cli, "job", "list"], client, timeout=120)
    assert "SUCCEEDED" in listed.stdout and "cliptd.tune" in listed.stdout, listed.stdout[-2000:]

    check = ("import json; from mlflow.tracking import MlflowClient; "
             "c = MlflowClient(tracking_uri='http://127.0.0.1:5000'); "
             "e = c.get_experiment_by_name('cliptd-vcr'); "
             "r = c.search_runs([e.experiment_id], filter_string=\"tags.sweep = 'submitted'\"); "
             "print('RUNS', json.dumps([[x.info.status, x.data.metrics.get('epoch')] "
             "for x in r]))")
    res = host.run("head", [py, "-c", check], client, timeout=120)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RUNS ")), None)
    assert line, res.stdout + res.stderr[-3000:]
    runs = json.loads(line[5:])
    assert len(runs) == 2, runs  # 1 searched trial, then the other seed re-run
    assert all(status == "FINISHED" and epoch for status, epoch in runs), runs
    storage = Path(head["env"]["CLIPTD_STORAGE_PATH"])
    # a one-worker trial is light (Tune's checkpoint_NNNNNN in the trial's folder), a
    # multi-worker one Ray Train's (epoch-NNN in the run's): either way, on the storage path
    saved = list(storage.glob("submitted-*/**/checkpoint.pt"))
    assert saved, sorted(str(p) for p in storage.rglob("*"))[:40]
