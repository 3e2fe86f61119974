"""A worker that dies mid-epoch is restarted from the last checkpoint, and the run ends
exactly where an uninterrupted one does — for both kinds of sweep trial: a Ray Train run
(``FailureConfig(max_failures)`` of the TorchTrainer) and a light trial, whose worker is the
Tune trial itself (Tune's ``FailureConfig``, its latest Tune checkpoint). The light trial and
a one-worker TorchTrainer give the same metrics for the same config and seed."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow

# what must match exactly between runs (the timings differ, of course)
SAME = ("epoch", "step", "score", "train/loss/task", "train/loss/total", "val/id/acc",
        "val/shift/acc", "val/instances")


@pytest.fixture(scope="module")
def ray_local():
    from types import SimpleNamespace

    import ray

    from cliptd.cli.common import init_ray

    # the commands' own start-up: beside another Ray instance (another test run, a
    # cluster test) Train's helpers must still find this one
    exported = ("RAY_ADDRESS", "CLIPTD_LOCAL_RAY", "RAY_GCS_SERVER_PORT")
    before = {k: os.environ.get(k) for k in exported}
    init_ray(SimpleNamespace(address=None), num_cpus=2, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()
    for k, v in before.items():  # what init_ray exported, not left to later tests
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cfg(tiny_world):
    from cliptd.core.config import resolve_config

    return resolve_config({"task": "snli_ve", "data": str(tiny_world.data["snli_ve"]),
                           "student": str(tiny_world.student), "preset": "synthetic",
                           "epochs": 3, "batch_size": 8, "threads": 1,
                           "distill": {"method": "none"}})


@pytest.fixture(scope="module")
def clean(ray_local, cfg, tmp_path_factory):
    """The uninterrupted reference: a one-worker TorchTrainer run."""
    from cliptd.training.launch import make_trainer

    result = make_trainer(cfg, name="clean", storage_path=str(
        tmp_path_factory.mktemp("clean") / "ray")).fit()
    assert result.error is None
    return result


def sweep_trial(cfg: dict, storage: str, name: str, kind: str, max_failures: int,
                tune_config=None, param_space=None):
    """One trial through the sweep's own Tuner set-up (``cliptd.sweep.search.run_tuner``:
    the trial function, its resources, its FailureConfig and CheckpointConfig)."""
    from ray import tune

    from cliptd.sweep.search import run_tuner

    meta = {"sweep_id": name, "tracking_uri": None, "storage_path": storage, "workers": 1,
            "gpus_per_worker": 0, "cpus_per_worker": 1.0, "max_failures": max_failures,
            "base": cfg, "condition": name, "method": "none", "phase": "test",
            "searcher_seed": 0, "versions": {}, "trial_kind": kind}
    grid = run_tuner(name, storage, param_space or {},
                     tune_config or tune.TuneConfig(num_samples=1),
                     {"driver": {"CPU": 0.2}}, meta, resume=False)
    assert len(grid) == 1
    return grid[0]


def _same(a: dict, b: dict) -> None:
    for key in SAME:
        assert a[key] == b[key], (key, a[key], b[key])


def test_worker_crash_resumes_to_same_result(clean, cfg, tmp_path):
    from cliptd.training.launch import make_trainer

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


def test_light_trial_matches_a_one_worker_torchtrainer(clean, cfg, tmp_path):
    """The same config and seed: the same metrics, epoch by epoch, on both paths."""
    light = sweep_trial(cfg, str(tmp_path / "ray"), "light-clean", "light", 0)
    assert light.error is None
    _same(light.metrics, clean.metrics)
    a = light.metrics_dataframe.set_index("epoch").sort_index()
    # Ray Train's dataframe holds the results of the checkpoints it kept (the 2 best)
    b = clean.metrics_dataframe.set_index("epoch").sort_index()
    assert list(a.index) == [1, 2, 3] and len(b) >= 2 and set(b.index) <= set(a.index)
    for key in ("train/loss/task", "val/id/acc", "score"):
        assert list(a.loc[b.index, key]) == list(b[key]), key
    # the light trial's checkpoints are Tune's, on the storage path, self-describing
    from cliptd.training.checkpoint import load_checkpoint_file

    with light.checkpoint.as_directory() as d:
        state = load_checkpoint_file(f"{d}/checkpoint.pt")
    assert str(light.checkpoint.path).startswith(str(tmp_path / "ray"))
    assert state["epoch"] == 2 and state["metrics"]["epoch"] == 3


def test_light_trials_reuse_their_actor_with_the_same_results(clean, cfg, tmp_path):
    """A search's light trials one after another in one reused Tune actor (its imports,
    decoded images and teacher targets kept, ``cliptd.sweep.driver.reuse_actors``): each
    trial still ends exactly as the uninterrupted reference run does."""
    from ray import tune

    from cliptd.sweep.driver import reuse_actors
    from cliptd.sweep.search import run_tuner

    meta = {"sweep_id": "reused", "tracking_uri": None, "storage_path": str(tmp_path / "ray"),
            "workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1.0, "max_failures": 0,
            "base": cfg, "condition": "reused", "method": "none", "phase": "test",
            "searcher_seed": 0, "versions": {}, "trial_kind": "light"}
    assert reuse_actors(meta) and not reuse_actors({**meta, "trial_kind": "train"})
    grid = run_tuner("reused", str(tmp_path / "ray"), {"seed": tune.grid_search([0, 0])},
                     tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse_actors(meta)),
                     {"driver": {"CPU": 0.2}}, meta, resume=False)
    assert len(grid) == 2 and all(r.error is None for r in grid)
    assert len({r.metrics["pid"] for r in grid}) == 1, "the trials did not share their actor"
    for r in grid:
        _same(r.metrics, clean.metrics)


@pytest.mark.parametrize("kind", ["light", "train"])
def test_sweep_trial_worker_crash_resumes_to_same_result(clean, cfg, tmp_path, kind):
    """A sweep trial whose worker dies mid-epoch 2: a light trial's worker is the trial's
    own process (os._exit kills the Tune actor; Tune restarts it from its latest
    checkpoint), a train trial's is a Ray Train worker (Ray Train restarts it). Under the
    sweep's searcher and scheduler (Optuna, ASHA on ``epoch``): the restart is neither a
    new Optuna trial nor a stop, and the study closes the trial with its final score."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    marker = tmp_path / "crashed.txt"
    steps_per_epoch = clean.metrics["step"] // 3
    crashing = {**cfg, "fault": {"exit_at_step": steps_per_epoch * 2 - 1,
                                 "marker": str(marker)}}
    study = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = OptunaSearch(metric="score", mode="max", seed=0, study_name="crash",
                            storage=optuna.storages.RDBStorage(study))
    asha = ASHAScheduler(time_attr="epoch", metric="score", mode="max", max_t=3,
                         grace_period=1, reduction_factor=2)
    result = sweep_trial(crashing, str(tmp_path / "ray"), f"crashy-{kind}", kind, 1,
                         tune.TuneConfig(search_alg=searcher, scheduler=asha, num_samples=1),
                         # one value: a searched knob that leaves the run as the clean one
                         {"weight_decay": tune.choice([cfg["weight_decay"]])})
    assert marker.exists(), "the fault was never injected"
    assert result.error is None, result.error
    _same(result.metrics, clean.metrics)
    df = result.metrics_dataframe
    assert list(df["epoch"])[-1] == 3
    # resumed from the epoch-1 checkpoint, not from scratch: the epoch-2 result is the first
    # of a (re)started loop, the one that carries its set-up time. (A restarted light trial is
    # a new Tune actor; whether Tune's dataframe still holds its epoch-1 result depends on
    # when Tune wrote it before the crash, so only the last epoch-2 result is read.)
    second = df[df["epoch"] == 2].iloc[-1]
    assert second["time/setup_s"] == second["time/setup_s"], "epoch 2 did not start a loop"
    trials = optuna.load_study(study_name="crash", storage=study).trials
    assert len(trials) == 1 and trials[0].state == optuna.trial.TrialState.COMPLETE
    assert trials[0].value == clean.metrics["score"]


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


def test_light_trial_crash_beyond_max_failures_fails(ray_local, cfg, tmp_path):
    crashing = {**cfg, "epochs": 1, "fault": {"exit_at_step": 1,
                                              "marker": str(tmp_path / "m")}}
    result = sweep_trial(crashing, str(tmp_path / "ray"), "fails-light", "light", 0)
    assert (tmp_path / "m").exists()
    assert result.error is not None
    assert "actor died" in str(result.error).lower(), result.error
    assert not result.metrics or "epoch" not in result.metrics
