"""One Tune trial: its config resolved, then trained one of two ways.

- ``light`` (one worker): the trial trains in its own process: the loop runs inside the Tune
  function (``cliptd.training.launch.train_in_tune_trial``) with Tune checkpoints,
  ``ray.tune.report`` and Tune's ``FailureConfig`` for restarts. Ray starts one process for
  the trial and nothing else.
- ``train`` (any number of workers): the trial is a driver that fits a Ray Train
  ``TorchTrainer`` (its controller, worker group and workers are processes of their own)
  and forwards its reports with ``TuneReportCallback``.

Both keep the same guarantees: checkpoints on the storage path, exact resume after a
killed sweep driver (``Tuner.restore``), restarts after a worker crash from the latest
checkpoint, ASHA on the reported ``epoch``, and one MLflow run per trial (opened and logged
by the search's process: ``cliptd.sweep.live``). ``auto`` picks
``light`` for one worker (with or without a GPU) and ``train`` otherwise.
"""

from __future__ import annotations

from cliptd.core.config import resolve_config
from cliptd.core.errors import SweepError
from cliptd.sweep.space import apply_sample

TRIAL_KINDS = ("auto", "light", "train")


def condition_name(shots, preset: str) -> str:
    return f"{preset}-shots{shots}"


def trial_kind(requested: str, workers: int) -> str:
    """``light`` or ``train`` for ``--trial-kind`` (auto|light|train) and ``--workers``."""
    if requested not in TRIAL_KINDS:
        raise SweepError(f"--trial-kind: {requested!r} is not one of {', '.join(TRIAL_KINDS)}")
    if requested == "auto":
        return "light" if workers == 1 else "train"
    if requested == "light" and workers != 1:
        raise SweepError(f"--trial-kind light trains in the trial's own process, one worker; "
                         f"--workers {workers} needs --trial-kind train")
    return requested


def kind_of(meta: dict) -> str:
    return meta.get("trial_kind") or trial_kind("auto", meta["workers"])


def trial_resources(meta: dict, driver: dict) -> dict:
    """What one trial asks Tune for: a light trial holds its one worker's CPUs (and GPU)
    itself; a ``train`` trial's driver holds ``driver`` (a sliver: its workers ask Ray Train
    for theirs, see ``cliptd.sweep.plan.plan_resources``)."""
    if kind_of(meta) != "light":
        return driver
    res = {"CPU": meta["cpus_per_worker"]}
    if meta["gpus_per_worker"]:
        res["GPU"] = meta["gpus_per_worker"]
    return res


def tune_run_options(meta: dict) -> dict:
    """The Tuner's FailureConfig and CheckpointConfig for this kind of trial.

    A light trial *is* its worker: a crash restarts the trial, from its latest Tune
    checkpoint, up to ``max_failures`` times (as Ray Train restarts a ``train`` trial's
    workers), and Tune keeps its checkpoints as Ray Train would (the 2 best by score, and
    always the latest). A ``train`` trial's driver gets one restart of its own; its
    checkpoints are Ray Train's."""
    import ray.tune

    if kind_of(meta) == "light":
        return {"failure_config": ray.tune.FailureConfig(max_failures=meta["max_failures"]),
                "checkpoint_config": ray.tune.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute="score",
                    checkpoint_score_order="max")}
    return {"failure_config": ray.tune.FailureConfig(max_failures=1)}


def reuse_actors(meta: dict) -> bool:
    """Whether a search's trials reuse their Tune actors: light trials do. A light trial's
    actor is its worker: Ray's worker start, torch, transformers and the loop's imports, and
    the images and teacher targets the last trial decoded and read (``ImageStore.shared``,
    ``cliptd.training.run.last_cache_load``) stay for the next trial instead of being paid
    again. Tune resets a function trial's actor only once its function has ended (a stopped
    trial ends at its next report: Tune reports synchronously), and starts a new one when it
    cannot; every trial still seeds, resumes and reports on its own. A ``train`` trial's
    driver is cheap to start, and its workers are Ray Train's, started per run anyway."""
    return kind_of(meta) == "light"


def train_driver_fn(config: dict, meta: dict) -> None:
    """One Tune trial: resolve its config, train.

    ``config`` holds only what Tune samples (the searched knobs, or the seed); ``meta`` (given
    through ``tune.with_parameters``) holds the sweep's fixed settings and the base config.
    A trial never talks to MLflow: on a cluster it may run on a node that cannot reach a
    server on the head's loopback. The search's own process, on the head, opens its run and
    logs every result it reports (``cliptd.sweep.live``). Nothing here imports torch: a
    ``train`` trial's driver never needs it, and a light trial imports the loop inside
    ``train_in_tune_trial``."""
    import ray.tune

    cfg = resolve_config(apply_sample(meta["base"], config))
    cfg["tracking"] = None
    ctx = ray.tune.get_context()
    if kind_of(meta) == "light":
        from cliptd.training.launch import train_in_tune_trial

        train_in_tune_trial(cfg)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from cliptd.training.launch import make_trainer

    trainer = make_trainer(
        cfg, name=f"{meta['sweep_id']}-{ctx.get_trial_id()}".replace("/", "-"),
        storage_path=meta["storage_path"], workers=meta["workers"],
        gpus_per_worker=meta["gpus_per_worker"], cpus_per_worker=meta["cpus_per_worker"],
        max_failures=meta["max_failures"], callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error
