"""A real two-node Ray cluster on one machine: ``ray start --head`` on 127.0.0.2 and a second
``ray start --address`` node on 127.0.0.3, each with one CPU. A short sweep runs on it with
2 Ray Train workers per trial, which cannot fit on one node (2 × 0.6 CPU > 1), so every run
spans both; storage is one folder both nodes see (shared storage), and every trial lands in
MLflow. The test starts and stops its own cluster and leaves none of its processes behind;
it touches no other Ray instance on the machine (``ray stop`` would stop them all, a
developer's sweep beside the tests too), so it finds its own by the cluster's temp dir."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _cli import alive, descendants, run_cli

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _cluster_processes(temp_dir: str) -> list[int]:
    """The cluster's own processes: those naming its temp dir on their command line (GCS,
    raylets, monitors, dashboard) and everything they started (workers, agents, whose
    ``ray::`` titles name nothing)."""
    roots = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if d.name.isdigit() and temp_dir in cmd:
            roots.append(int(d.name))
    return sorted({*roots, *(pid for root in roots for pid in descendants(root))})


def _stop_cluster(temp_dir: str) -> list[int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after 15 s; returns those still
    alive after that. The family is listed first: a worker whose raylet died is re-parented
    to init and would no longer be found under it."""
    family = _cluster_processes(temp_dir)
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(pid) for pid in family):
            time.sleep(0.2)
    return [pid for pid in family if alive(pid)]


@pytest.fixture
def cluster(tmp_path):
    # Token authentication, as the cluster files set it up: one token file every node and
    # the driver read.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    # A short temp dir of the cluster's own (Ray's socket paths must stay under 108 bytes):
    # every process of this cluster, and only those, names it.
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    port = _free_port()
    address = f"127.0.0.2:{port}"
    try:
        head = _ray("start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}",
                    "--num-cpus=1", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={_free_port()}", "--disable-usage-stats",
                    f"--temp-dir={temp_dir}", env=env)
        assert head.returncode == 0, head.stdout + head.stderr
        node = _ray("start", f"--address={address}", "--node-ip-address=127.0.0.3",
                    "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                    env=env)
        assert node.returncode == 0, node.stdout + node.stderr
        yield {"address": address, "env": env}
    finally:
        left = _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"the cluster's processes left behind: {left}"


def test_sweep_with_a_train_run_spanning_two_nodes(cluster, tmp_path, world_cache):
    deadline = time.time() + 90  # the autoscaler's view catches up within seconds
    while True:
        status = _ray("status", f"--address={cluster['address']}", env=cluster["env"])
        active = status.stdout.split("Pending:")[0].count("node_")
        if active == 2 or time.time() > deadline:
            break
        time.sleep(3)
    assert active == 2, status.stdout + status.stderr
    env = {**cluster["env"], "CLIPTD_CACHE": str(world_cache), "PYTHONUNBUFFERED": "1",
           "CLIPTD_TRACKING_BUFFER": str(tmp_path / "buffer")}
    shared = tmp_path / "shared-storage"  # one path both nodes see, as NFS would be
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small",
           "--methods", "none", "--name", "two-node", "--address", cluster["address"],
           "--workers", "2", "--cpus-per-worker", "0.6", "--storage-path", str(shared),
           "--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{db}"]
    proc = run_cli(cmd, env, tmp_path, 900, tmp_path / "tune.log")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "2 worker(s) each" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cliptd-vcr")
    trials = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("cliptd.kind") == "trial"]
    # small budget: 2 search trials, then seed 1 re-run of the best
    assert len(trials) == 3
    for r in trials:
        assert r.info.status == "FINISHED"
        assert r.data.metrics["train/workers"] == 2
        assert r.data.metrics["train/nodes"] == 2, "the Train run did not span both nodes"
        assert r.data.metrics["train/effective_batch"] == 32
    # every checkpoint went to the shared storage path
    assert list(shared.glob("two-node-*/epoch-*/checkpoint.pt"))
