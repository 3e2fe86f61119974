"""A sweep on an autoscaling cluster whose worker nodes are at zero.

Ray's own autoscaling test cluster: the ``fake_multinode`` node provider that
``ray.cluster_utils.AutoscalingCluster`` drives, whose "nodes" are real raylets the
autoscaler starts on demand on this machine. ``AutoscalingCluster.start`` itself runs
``ray stop --force`` (every Ray process on the machine, other people's included) and
reads an example config the wheel does not ship, so the same cluster is started here by
hand, from the same kind of config, inside a network namespace of its own: every fake
node's address is that namespace's loopback, and stopping it means ending the processes
in that namespace, nothing else.

The head holds 1 CPU and ``cliptd_driver``; node type ``cpu`` (2 CPUs) and ``gpu``
(1 CPU, 1 GPU) start at zero. ``cliptd.tune --cpus-per-worker 2`` can only run on a
``cpu`` node: it must plan from what the cluster can grow to, ask the autoscaler, say
that it waits, and finish its sweep on the node that came up. Asking for GPUs: the plan
counts the GPU nodes the cluster can add and the autoscaler brings them up; more GPUs per
trial than the cluster can ever have fails at once with a clear message.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _cli import diagnose

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

try:
    import _netns
except ImportError:  # pragma: no cover
    from tests.e2e import _netns

WHY_NOT = _netns.why_not()
GCS = "127.0.0.2:6390"


def fake_cluster_config() -> dict:
    """The autoscaler config AutoscalingCluster generates (Ray's fake_multi_node example
    with our node types), pointed at this cluster's GCS."""
    empty = ("initialization_commands", "setup_commands", "head_setup_commands",
             "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
             "cluster_synced_files", "rsync_exclude", "rsync_filter")
    return {
        "cluster_name": "fake_multinode", "max_workers": 3,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": GCS},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "cliptd_driver": 8},
                                 "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                    "max_workers": 1},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                    "max_workers": 2},
        },
        # idle nodes stay 5 minutes: the fake provider removing the cpu node between two
        # trials was seen to take the head's raylet down with it (SIGKILL)
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in empty}}


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    if WHY_NOT:
        pytest.skip(f"no network namespace for the fake cluster: {WHY_NOT}")
    tmp = tmp_path_factory.mktemp("autoscaling")
    short = Path(tempfile.mkdtemp(prefix="cltd", dir="/tmp"))  # AF_UNIX path limit
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    (tmp / "cluster.json").write_text(json.dumps(fake_cluster_config()))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CLIPTD_LOCAL_RAY")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PYTHONUNBUFFERED": "1",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                # what AutoscalingCluster.start sets for the fake provider
                "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    host = _netns.Hosts(single=True)
    py = sys.executable
    try:
        host.start("head", [py, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                            "--node-ip-address=127.0.0.2", "--port=6390",
                            f"--autoscaling-config={tmp / 'cluster.json'}", "--num-cpus=1",
                            "--resources", '{"cliptd_driver": 8}', f"--temp-dir={short}",
                            "--object-store-memory=200000000", "--dashboard-host=127.0.0.1",
                            "--disable-usage-stats"], env, tmp / "ray-head.log")
        probe = (f"import ray; ray.init(address='{GCS}', log_to_driver=False); "
                 "assert ray.cluster_resources().get('cliptd_driver') == 8")
        host.wait_for("the fake cluster's head", lambda: host.run(
            "head", [py, "-c", probe], env, timeout=60).returncode == 0, 180,
            [tmp / "ray-head.log"])
        yield {"host": host, "env": env, "tmp": tmp}
    finally:
        host.close()
        shutil.rmtree(short, ignore_errors=True)


def _resources(autoscaling) -> dict:
    code = (f"import json, ray; ray.init(address='{GCS}', log_to_driver=False); "
            "print('RES', json.dumps(ray.cluster_resources()))")
    out = autoscaling["host"].run("head", [sys.executable, "-c", code], autoscaling["env"])
    line = next(x for x in out.stdout.splitlines() if x.startswith("RES "))
    return json.loads(line[4:])


def test_more_gpus_than_the_cluster_can_grow_to_fail_at_once(autoscaling, world_cache):
    env = {**autoscaling["env"], "CLIPTD_CACHE": str(world_cache)}
    tmp = autoscaling["tmp"]
    started = time.monotonic()
    proc = autoscaling["host"].run("head", [
        sys.executable, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small",
        "--methods", "none", "--address", GCS, "--workers", "3", "--gpus-per-worker", "1",
        "--name", "too-big", "--storage-path", str(tmp / "ray"), "--out", str(tmp / "big"),
        "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"], env, timeout=600, cwd=tmp)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a trial needs 3 × 1.0 GPUs; the cluster has 0 and can grow to 2" in proc.stderr
    assert time.monotonic() - started < 300  # refused up front, no wait for the autoscaler
    assert _resources(autoscaling).get("GPU", 0) == 0  # and nothing was launched


def test_gpu_nodes_at_zero_are_planned_and_requested(autoscaling):
    """The plan counts the GPU nodes the cluster can add; ``scale_for`` brings them up."""
    assert _resources(autoscaling).get("GPU", 0) == 0
    code = f"""
import argparse, json, types, ray
from cliptd.sweep import plan
ray.init(address="{GCS}", log_to_driver=False)
args = argparse.Namespace(workers=1, gpus_per_worker=1, cpus_per_worker=1)
p = plan.plan_resources(args, types.SimpleNamespace(max_concurrent=0))
waited = plan.scale_for(p, timeout_s=300, poll_s=1)
print("PLAN", json.dumps({{"plan": p, "waited": waited, "after": ray.cluster_resources()}}))
plan.release_scale_request(p)
"""
    proc = autoscaling["host"].run("head", [sys.executable, "-c", code], autoscaling["env"],
                                   timeout=400)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PLAN ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(line[5:])
    assert got["plan"]["concurrency"] == 2  # 2 GPU nodes the cluster can launch
    assert got["plan"]["autoscaling"] and got["plan"]["worker"] == {"CPU": 1.0, "GPU": 1}
    assert got["after"].get("GPU", 0) >= 1
    assert "asked the autoscaler for 2 trial(s)" in proc.stdout
    print(f"GPU nodes from zero: waited {got['waited']:.0f} s, then "
          f"{got['after'].get('GPU', 0):g} GPU(s)")


def test_sweep_scales_a_cpu_node_up_from_zero(autoscaling, world_cache):
    env = {**autoscaling["env"], "CLIPTD_CACHE": str(world_cache)}
    tmp = autoscaling["tmp"]
    # the GPU nodes of the test before may still be up (1 CPU each): none holds a 2-CPU
    # Train worker, the cpu node type is at zero
    before = _resources(autoscaling)
    assert before.get("CPU", 0) - before.get("GPU", 0) == 1, before
    log = tmp / "tune.log"
    cmd = [sys.executable, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small",
           "--methods", "none", "--address", GCS, "--workers", "1", "--cpus-per-worker", "2",
           "--name", "scaled", "--storage-path", str(tmp / "ray"), "--out", str(tmp / "out"),
           "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    started = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(autoscaling["host"].cmd("head", cmd), cwd=tmp, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        report = diagnose(log)
        os.killpg(proc.pid, 9)
        proc.wait(timeout=60)
        pytest.fail(f"the sweep did not finish in 900 s\n{report}")
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, out[-5000:]
    assert re.search(r"asked the autoscaler for 1 trial\(s\) × 1 × \{'CPU': 2\.0\}", out), out
    assert re.search(r"nodes up after \d+ s", out), out[-3000:]
    assert "1 trial(s) at once" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cliptd-vcr")
    trials = client.search_runs([exp.experiment_id], filter_string=(
        "tags.`cliptd.kind` = 'trial' and tags.sweep = 'scaled'"))
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    print(f"sweep from zero worker nodes: {time.monotonic() - started:.0f} s")
