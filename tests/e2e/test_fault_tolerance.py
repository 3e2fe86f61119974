"""A Ray Train worker that dies mid-epoch is restarted from the last checkpoint
(FailureConfig(max_failures)), and the run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    from types import SimpleNamespace

    import ray

    from cliptd.cli.common import init_ray

    # the commands' own start-up: beside another Ray instance (another test run, a
    # cluster test) Train's helpers must still find this one
    init_ray(SimpleNamespace(address=None), num_cpus=2, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


def test_worker_crash_resumes_to_same_result(ray_local, tiny_world, tmp_path):
    from cliptd.core.config import resolve_config
    from cliptd.training.launch import make_trainer

    cfg = resolve_config({"task": "snli_ve", "data": str(tiny_world.data["snli_ve"]),
                          "student": str(tiny_world.student), "preset": "synthetic",
                          "epochs": 3, "batch_size": 8, "threads": 1,
                          "distill": {"method": "none"}})
    clean = make_trainer(cfg, name="clean", storage_path=str(tmp_path / "ray")).fit()
    assert clean.error is None
    marker = tmp_path / "crashed.txt"
    steps_per_epoch = clean.metrics["step"] // 3
    crashing = {**cfg, "fault": {"exit_at_step": steps_per_epoch * 2 - 1,
                                 "marker": str(marker)}}
    crashed = make_trainer(crashing, name="crashy", storage_path=str(tmp_path / "ray"),
                           max_failures=1).fit()
    assert marker.exists(), "the fault was never injected"
    assert crashed.error is None
    assert crashed.metrics["epoch"] == 3
    for key in ("train/loss/task", "val/id/acc", "val/shift/acc", "step"):
        assert crashed.metrics[key] == clean.metrics[key], key


def test_worker_crash_beyond_max_failures_fails(ray_local, tiny_world, tmp_path):
    from cliptd.core.config import resolve_config
    from cliptd.training.launch import make_trainer

    cfg = resolve_config({"task": "snli_ve", "data": str(tiny_world.data["snli_ve"]),
                          "student": str(tiny_world.student), "preset": "synthetic",
                          "epochs": 1, "batch_size": 8, "threads": 1,
                          "fault": {"exit_at_step": 1, "marker": str(tmp_path / "m")},
                          "distill": {"method": "none"}})
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError, match="worker"):
        make_trainer(cfg, name="fails", storage_path=str(tmp_path / "ray"),
                     max_failures=0).fit()
