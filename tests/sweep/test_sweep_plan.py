"""How a sweep is laid out before anything runs: trial slots from the cluster's resources,
jobs sharing those slots without oversubscribing them, and sweep names."""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import pytest

from cliptd import tune
from cliptd.sweep import plan as sweep_plan


def _args(**kw):
    base = dict(workers=1, gpus_per_worker=0, cpus_per_worker=None, task="vcr",
                budget="default", name=None, out=None, resume=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def cluster(monkeypatch):
    def set_resources(res):
        import ray

        monkeypatch.setattr(ray, "cluster_resources", lambda: res)
    return set_resources


def test_two_cpus_give_two_slots_that_fill_the_machine(cluster):
    cluster({"CPU": 2.0})
    plan = sweep_plan.plan_resources(_args(), SimpleNamespace(max_concurrent=0))
    assert plan["concurrency"] == 2
    # each slot: its trial's worker, its driver and one waiting driver (see run_jobs)
    per_slot = 2 * plan["driver"]["CPU"] + plan["cpus_per_worker"]
    assert per_slot * plan["concurrency"] == pytest.approx(2.0)
    assert plan["cpus_per_worker"] >= 0.9
    assert plan["task"] == {"num_cpus": 0}  # search jobs hold no CPU


def test_gpu_slots_and_head_only_drivers(cluster):
    cluster({"CPU": 8.0, "GPU": 4.0, "cliptd_driver": 1.0})
    plan = sweep_plan.plan_resources(_args(workers=2, gpus_per_worker=1),
                               SimpleNamespace(max_concurrent=0))
    assert plan["concurrency"] == 2
    assert plan["driver"]["cliptd_driver"] > 0 and plan["task"]["resources"]["cliptd_driver"] > 0


def test_budget_caps_the_slots(cluster):
    cluster({"CPU": 16.0})
    plan = sweep_plan.plan_resources(_args(), SimpleNamespace(max_concurrent=3))
    assert plan["concurrency"] == 3


def test_jobs_never_hold_more_trials_than_slots(monkeypatch):
    """run_jobs: the trials that running jobs may hold never exceed twice the slots (the
    driver room plan_resources reserves), every running job may use every slot (so a slot
    one job leaves goes to another's waiting trial), every job runs, and a finished
    search's follow-up (its seed re-runs) is queued."""
    import ray

    live, launches = [], []

    class Ref:  # stands for an ObjectRef: hashable, one per launched job
        def __init__(self, job, concurrency):
            self.job, self.concurrency = job, concurrency

    class FakeTask:
        def remote(self, job, concurrency):
            live.append(Ref(job, concurrency))
            launches.append((job["name"], concurrency))
            assert sum(r.concurrency for r in live) <= 2 * 2, launches
            return live[-1]

    monkeypatch.setattr(ray, "remote", lambda **kw: (lambda fn: FakeTask()))
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns: ([refs[0]], refs[1:]))

    def get(ref):
        live.remove(ref)
        return {"job": ref.job["name"]}

    monkeypatch.setattr(ray, "get", get)
    jobs = [{"name": n, "kind": "search", "condition": "c", "method": n} for n in "abc"]
    done = []

    def on_done(job, result):
        done.append(result["job"])
        return [{"name": f"{job['name']}-seeds", "kind": "seeds", "condition": "c",
                 "method": job["name"]}] if job["kind"] == "search" else []

    sweep_plan.run_jobs(jobs, {"concurrency": 2, "task": {"num_cpus": 0}}, on_done)
    assert sorted(done) == ["a", "a-seeds", "b", "b-seeds", "c", "c-seeds"]
    assert launches[:2] == [("a", 2), ("b", 2)]  # two jobs at a time, each may fill both
    launches.clear()
    sweep_plan.run_jobs(jobs, {"concurrency": 2, "task": {"num_cpus": 0}}, lambda j, r: [])
    assert launches == [("a", 2), ("b", 2), ("c", 2)]  # c starts once a has ended
    launches.clear()
    sweep_plan.run_jobs(jobs[:1], {"concurrency": 2, "task": {"num_cpus": 0}}, lambda j, r: [])
    assert launches == [("a", 2)]  # a job alone gets both slots


def test_sweep_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tune.sweep_name(_args(name="mine")) == "mine"
    assert tune.sweep_name(_args()) == "vcr-default"
    (tmp_path / "runs" / "vcr-default").mkdir(parents=True)
    (tmp_path / "runs" / "vcr-default" / "optuna.db").write_text("")
    second = tune.sweep_name(_args())
    assert second.startswith("vcr-default-") and second != "vcr-default"
    (tmp_path / "runs" / second).mkdir()
    (tmp_path / "runs" / second / "optuna.db").write_text("")
    old = time.time() - 100
    os.utime(tmp_path / "runs" / "vcr-default", (old, old))
    assert tune.sweep_name(_args(resume=True)) == second  # the latest one


def test_local_ray_runs_without_preemption_watcher(monkeypatch):
    """A local Ray (no --address) cannot be preempted: Ray Train's per-run preemption
    watcher is turned off unless the user set it; a cluster address keeps Ray's default."""
    import types

    import ray

    from cliptd.cli.common import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    # set, then unset: monkeypatch then restores the original state whatever init_ray does
    for var in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_ADDRESS", "CLIPTD_LOCAL_RAY",
                "RAY_GCS_SERVER_PORT"):  # what a local start exports, never left to later tests
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    init_ray(types.SimpleNamespace(address="ray://head:10001"))
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    init_ray(types.SimpleNamespace(address=None))
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert calls[1]["dashboard_host"] == "127.0.0.1"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # the user's choice wins
    init_ray(types.SimpleNamespace(address=None))
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


def test_the_cluster_address_is_never_a_commands_own_local_instance(monkeypatch):
    """$RAY_ADDRESS names a cluster (``ray job submit`` sets it) unless it is the local
    instance a cliptd command started and its children inherited."""
    import types

    from cliptd.cli.common import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CLIPTD_LOCAL_RAY", raising=False)
    none = types.SimpleNamespace(address=None)
    assert cluster_address(none) is None
    assert cluster_address(types.SimpleNamespace(address="10.0.0.1:6379")) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert cluster_address(none) == "10.0.0.2:6379"
    monkeypatch.setenv("CLIPTD_LOCAL_RAY", "10.0.0.2:6379")
    assert cluster_address(none) is None


def _gpu_yaml() -> dict:
    from pathlib import Path

    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[2] / "clusters" / "gpu.yaml")
                          .read_text())


def test_autoscaling_cluster_at_zero_gpus_plans_what_it_can_grow_to(cluster):
    """clusters/gpu.yaml freshly up: the head only, both GPU types at min_workers 0."""
    cluster({"CPU": 8.0, "cliptd_driver": 8.0})
    plan = sweep_plan.plan_resources(_args(gpus_per_worker=1, cpus_per_worker=3),
                                     SimpleNamespace(max_concurrent=0), config=_gpu_yaml())
    # 2 on-demand + 4 spot g5.xlarge, capped by the file's max_workers: 4
    assert plan["concurrency"] == 4 and plan["autoscaling"]
    assert plan["worker"] == {"CPU": 3.0, "GPU": 1.0}
    two = sweep_plan.plan_resources(_args(workers=2, gpus_per_worker=1),
                                    SimpleNamespace(max_concurrent=0), config=_gpu_yaml())
    assert two["concurrency"] == 2


def test_a_trial_the_cluster_can_never_hold_is_refused(cluster):
    from cliptd.core.errors import SweepError

    cluster({"CPU": 8.0, "cliptd_driver": 8.0})
    with pytest.raises(SweepError, match=r"needs 5 × 1.0 GPUs; the cluster has 0 and can "
                                         r"grow to 4"):
        sweep_plan.plan_resources(_args(workers=5, gpus_per_worker=1.0),
                                  SimpleNamespace(max_concurrent=0), config=_gpu_yaml())
    # enough GPUs in all, but no g5.xlarge (4 vCPUs) holds a worker asking for 8 CPUs
    with pytest.raises(SweepError, match=r"node types hold 0 at most"):
        sweep_plan.plan_resources(_args(gpus_per_worker=1, cpus_per_worker=8),
                                  SimpleNamespace(max_concurrent=0), config=_gpu_yaml())
    # no autoscaler: what is up is all there is
    with pytest.raises(SweepError, match="no autoscaler to add any"):
        sweep_plan.plan_resources(_args(gpus_per_worker=1), SimpleNamespace(max_concurrent=0),
                                  config=None)


def test_scale_for_asks_the_autoscaler_and_waits(monkeypatch):
    import ray
    import ray.autoscaler.sdk as sdk

    asked, nodes = [], [[], [], [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}]]
    monkeypatch.setattr(sdk, "request_resources", lambda **kw: asked.append(kw))
    monkeypatch.setattr(ray, "nodes", lambda: nodes.pop(0) if len(nodes) > 1 else nodes[0])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 12.0, "GPU": 1.0})
    plan = {"autoscaling": True, "worker": {"CPU": 3.0, "GPU": 1.0}, "workers": 1,
            "concurrency": 4}
    lines = []
    waited = sweep_plan.scale_for(plan, timeout_s=30, poll_s=0.01, log=lines.append)
    assert asked == [{"bundles": [{"CPU": 3.0, "GPU": 1.0}] * 4}]
    assert waited >= 0 and "asked the autoscaler for 4 trial(s)" in lines[0]
    assert lines[-1].startswith("[cliptd] nodes up after")
    nodes[:] = [[]]
    with pytest.raises(Exception, match="did not provide one trial's resources within 0 s"):
        sweep_plan.scale_for(plan, timeout_s=0, poll_s=0.01, log=lines.append)


def test_joining_a_cluster_passes_its_address_and_settings_to_its_processes(monkeypatch):
    """The trial drivers, Train controllers and workers start from their node's raylet:
    what they must know (the GCS address for Train's helpers, the worker-group timeout)
    goes in the job's runtime env."""
    import types

    import ray

    from cliptd.cli.common import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    monkeypatch.delenv("CLIPTD_LOCAL_RAY", raising=False)
    init_ray(types.SimpleNamespace(address="10.231.0.1:6379"))
    env = calls[0]["runtime_env"]["env_vars"]
    assert calls[0]["address"] == "10.231.0.1:6379"
    assert env["RAY_ADDRESS"] == "10.231.0.1:6379"
    assert env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "900"
    assert "CLIPTD_TRACKING_BUFFER" not in env  # a host path stays each node's own
