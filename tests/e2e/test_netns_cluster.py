"""A Ray cluster whose hosts only reach each other over the network.

Two Linux network namespaces joined by a veth pair (``_netns.Hosts``): the *head*
(10.231.0.1) runs the Ray head, the MLflow server and the sweep; the *worker* (10.231.0.2)
runs a Ray worker node. Each has its own loopback, so MLflow on the head's 127.0.0.1 -- as
``clusters/*.yaml`` start it -- is out of the worker's reach, as on a real cluster. Ray
token auth on both nodes (one token file); checkpoints in one folder both see, as NFS
would be. The head holds no CPU and the ``cliptd_driver`` resource, the worker 1 CPU: the
searches (and their Tune callbacks, which talk to MLflow) sit on the head, and every trial
(the sweep's default one-worker trials train in their own Tune actor) can only run on the
worker host, as trials run on a real cluster's GPU nodes.

``python -m cliptd.tune --budget small`` runs inside the head namespace against the
cluster. It must finish with every trial FINISHED in MLflow, every epoch Ray saw in
MLflow, every epoch but a trial's last one in MLflow *before* that trial reported its
last epoch (a poller inside the head namespace watches the server), and none recovered
from Ray's results when the run closed: the curves are live. No metric may be left
buffered on either host, the trials must have trained on the worker host, and nothing
may be left running in either namespace.
"""

from __future__ import annotations

import json
import os
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
except ImportError:  # pragma: no cover - run from another rootdir
    from tests.e2e import _netns

WHY_NOT = _netns.why_not()
SWEEP_TIMEOUT_S = 900
START_TIMEOUT_S = 180  # a node or the MLflow server, on a busy 2-core machine

POLLER = r'''
import json, sys, time
from mlflow.tracking import MlflowClient
uri, out = sys.argv[1], sys.argv[2]
c = MlflowClient(tracking_uri=uri)
seen = {}
with open(out, "a") as f:
    while True:
        try:
            exp = c.get_experiment_by_name("cliptd-vcr")
            runs = c.search_runs([exp.experiment_id],
                                 filter_string="tags.`cliptd.kind` = 'trial'") if exp else []
            for r in runs:
                trial = r.data.tags.get("cliptd.trial_id")
                for m in c.get_metric_history(r.info.run_id, "epoch"):
                    key = (trial, m.step)
                    if key not in seen:
                        seen[key] = time.time()
                        f.write(json.dumps({"trial": trial, "epoch": m.step, "t": seen[key],
                                            "status": r.info.status}) + "\n")
                        f.flush()
        except Exception as exc:
            print("poll failed:", exc, file=sys.stderr, flush=True)
        time.sleep(0.5)
'''


@pytest.fixture
def cluster(tmp_path):
    if WHY_NOT:
        pytest.skip(f"no network namespaces here: {WHY_NOT}")
    py = sys.executable
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CLIPTD_LOCAL_RAY")}
    env = {**base, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONUNBUFFERED": "1",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    buffers = {h: tmp_path / f"buffer-{h}" for h in ("head", "worker")}
    # Ray's sockets live under its temp dir: AF_UNIX paths stop at 107 bytes
    short = Path(tempfile.mkdtemp(prefix="cltd", dir="/tmp"))
    hosts = _netns.Hosts()
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        head_env = {**env, "CLIPTD_TRACKING_BUFFER": str(buffers["head"]),
                    # no job-runner consumers beside the server: SIGTERM ends it whole
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # MLflow exactly as the cluster files start it: the head's loopback only
        hosts.start("head", [str(Path(py).with_name("mlflow")), "server",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"),
                             "--host", "127.0.0.1", "--port", "5000", "--workers", "1"],
                    head_env, logs / "mlflow.log", cwd=tmp_path)
        hosts.start("head", [py, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             f"--node-ip-address={_netns.HEAD_IP}", "--port=6379",
                             f"--temp-dir={short / 'head'}", "--num-cpus=0",
                             "--resources", '{"cliptd_driver": 8}',
                             "--object-store-memory=200000000",
                             "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                    head_env, logs / "ray-head.log")
        address = f"{_netns.HEAD_IP}:6379"

        def reachable(host, port):
            probe = f"import socket; socket.create_connection(('{host}', {port}), 2)"
            return lambda: hosts.run("worker", [py, "-c", probe], env).returncode == 0

        hosts.wait_for("the head's GCS from the worker host", reachable(_netns.HEAD_IP, 6379),
                       START_TIMEOUT_S, [logs / "ray-head.log"])
        hosts.start("worker", [py, "-m", "ray.scripts.scripts", "start", "--block",
                               f"--address={address}", f"--node-ip-address={_netns.WORKER_IP}",
                               f"--temp-dir={short / 'worker'}", "--num-cpus=1",
                               "--object-store-memory=200000000", "--disable-usage-stats"],
                    {**env, "CLIPTD_TRACKING_BUFFER": str(buffers["worker"])},
                    logs / "ray-worker.log")
        nodes = (f"import ray, sys; ray.init(address='{address}', log_to_driver=False); "
                 "sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) == 2 else 1)")
        hosts.wait_for("2 alive Ray nodes", lambda: hosts.run("head", [py, "-c", nodes], env,
                                                              timeout=60).returncode == 0,
                       START_TIMEOUT_S, [logs / "ray-head.log", logs / "ray-worker.log"])
        health = ("import urllib.request; urllib.request.urlopen("
                  "'http://127.0.0.1:5000/health', timeout=2)")
        hosts.wait_for("MLflow on the head's loopback", lambda: hosts.run(
            "head", [py, "-c", health], env).returncode == 0, START_TIMEOUT_S,
            [logs / "mlflow.log"])
        yield {"hosts": hosts, "env": env, "address": address, "buffers": buffers,
               "head_env": head_env, "logs": logs, "reachable": reachable}
    finally:
        killed = hosts.close()
        shutil.rmtree(short, ignore_errors=True)
    assert not killed, f"still running in the namespaces after SIGTERM: {killed}"


def test_sweep_on_hosts_apart_tracks_live(cluster, tmp_path, world_cache):
    hosts, env, py = cluster["hosts"], cluster["env"], sys.executable
    # the premise: the head's loopback is not the worker's, the link is the only way
    assert not cluster["reachable"]("127.0.0.1", 5000)(), "the worker reached the head's MLflow"
    for host in ("head", "worker"):  # no route but the link's
        routes = hosts.run(host, ["ip", "route"], env).stdout.strip().splitlines()
        assert routes == [r for r in routes if r.startswith("10.231.0.0/24 ")] and routes, routes

    shared = tmp_path / "shared-storage"  # one folder both hosts see, as NFS would be
    poll_log = tmp_path / "mlflow-seen.jsonl"
    (tmp_path / "poller.py").write_text(POLLER)
    hosts.start("head", [py, str(tmp_path / "poller.py"), "http://127.0.0.1:5000",
                         str(poll_log)], env, cluster["logs"] / "poller.log")
    tune_env = {**cluster["head_env"], "CLIPTD_CACHE": str(world_cache)}
    cmd = [py, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small", "--methods", "none",
           "--name", "apart", "--address", cluster["address"], "--workers", "1",
           "--cpus-per-worker", "1", "--storage-path", str(shared),
           "--out", str(tmp_path / "out"), "--tracking-uri", "http://127.0.0.1:5000"]
    log = tmp_path / "tune.log"
    started = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(hosts.cmd("head", cmd), cwd=tmp_path, env=tune_env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        report = diagnose(log)
        os.killpg(proc.pid, 9)
        proc.wait(timeout=60)
        pytest.fail(f"the sweep did not finish in {SWEEP_TIMEOUT_S} s\n{report}")
    wall = time.monotonic() - started
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, out[-5000:]
    time.sleep(2)  # the poller's last round

    # what Ray recorded: every trial's reports, with the time of each
    ray = {}
    for result in shared.glob("apart-*/train_driver_fn_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        assert rows, f"{result.parent.name} reported nothing"
        ray[f"apart/{rows[0]['trial_id']}"] = rows
    assert len(ray) == 3, sorted(ray)  # small budget: 2 searched trials, 1 seed re-run

    check = tmp_path / "check.py"
    check.write_text(r'''
import json, sys
from mlflow.tracking import MlflowClient
import ray
from ray.util.state import list_actors
c = MlflowClient(tracking_uri="http://127.0.0.1:5000")
exp = c.get_experiment_by_name("cliptd-vcr")
runs = {}
for r in c.search_runs([exp.experiment_id], filter_string="tags.`cliptd.kind` = 'trial'"):
    runs.setdefault(r.data.tags["cliptd.trial_id"], []).append({
        "status": r.info.status, "epochs": sorted(m.step for m in c.get_metric_history(
            r.info.run_id, "epoch")), "backfilled": r.data.tags.get("cliptd.backfilled_epochs"),
        "score": {m.step: m.value for m in c.get_metric_history(r.info.run_id, "score")}})
ray.init(address=sys.argv[1], log_to_driver=False)
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
# what trained: a light trial's own actor (Tune's function trainable), a train trial's workers
workers = [(a["class_name"], ips.get(a["node_id"])) for a in list_actors(
    address="http://127.0.0.1:8265", limit=1000, detail=True)
    if "ImplicitFunc" in a["class_name"] or a["class_name"] == "RayTrainWorker"]
print("CHECK " + json.dumps({"runs": runs, "trainer_ips": workers}))
''')
    res = hosts.run("head", [py, str(check), cluster["address"]], env, timeout=120)
    line = next((x for x in res.stdout.splitlines() if x.startswith("CHECK ")), None)
    assert line, res.stdout[-2000:] + res.stderr[-3000:]
    got = json.loads(line[6:])
    runs = got["runs"]
    assert sorted(runs) == sorted(ray), "one MLflow run per Tune trial"
    seen = {}
    for row in map(json.loads, poll_log.read_text().splitlines()):
        seen.setdefault((row["trial"], row["epoch"]), row)
    live_checked = 0
    for trial, rows in ray.items():
        assert len(runs[trial]) == 1, f"{trial}: duplicate runs"
        run = runs[trial][0]
        assert run["status"] == "FINISHED", (trial, run["status"])
        epochs = [row["epoch"] for row in rows]
        assert run["epochs"] == epochs, (trial, run["epochs"], epochs)
        assert run["score"][str(epochs[-1])] == pytest.approx(rows[-1]["score"])
        last_report = rows[-1]["timestamp"]  # whole seconds, rounded down
        for row in rows[:-1]:
            first = seen.get((trial, row["epoch"]))
            assert first is not None, f"{trial} epoch {row['epoch']} never seen by the poller"
            # in MLflow while the trial still trained, not back-filled when it closed
            assert first["t"] < last_report, (
                f"{trial}: epoch {row['epoch']} reached MLflow {first['t'] - last_report:.1f} s "
                f"after the trial's last report (status then {first['status']})")
            assert first["status"] == "RUNNING"
            live_checked += 1
        # the last epoch too was logged as it arrived, not recovered when the run closed
        assert run["backfilled"] is None, (trial, run)
    assert live_checked, "no trial ran two epochs: nothing showed the curves were live"
    trainers = got["trainer_ips"]
    assert trainers and {ip for _, ip in trainers} == {_netns.WORKER_IP}, trainers
    workers = sorted({ip for _, ip in trainers})
    for host, folder in cluster["buffers"].items():
        left = sorted(folder.glob("*.jsonl")) if folder.exists() else []
        assert not left, f"metrics left buffered on the {host} host: {left}"
    print(f"sweep on two hosts apart: {wall:.0f} s, {len(ray)} trials, "
          f"{live_checked} epochs seen live, trials trained on {workers}")
