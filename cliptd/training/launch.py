"""Launching a run: the ``TorchTrainer`` of one run and the workers' entry point, or the loop
inside a Tune trial itself (the light path of a one-worker sweep trial).

Kept apart from the loops so that the processes which only *launch* a run (the sweep
driver, each Tune trial driver, Ray Train's controller) never import torch models,
transformers or the data pipeline: on a 2-core machine each of those imports costs seconds
per process per trial. Only the processes that train (Train workers, light Tune trials)
import ``cliptd.training.loop``, inside the entry points below.
"""

from __future__ import annotations


def train_fn_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker. Ray pickles this function by reference
    (``cliptd.training.launch.train_fn_per_worker``), so whoever unpickles it imports only this
    module; the loop and its models are imported here, on the worker."""
    from cliptd.training.loop import train_loop
    from cliptd.training.runtime import RayRuntime

    train_loop(config, RayRuntime())


def train_in_tune_trial(config: dict) -> None:
    """The loop in this Tune trial's own process (``cliptd.sweep.driver``'s light path): one
    worker, Tune checkpoints and ``ray.tune.report``, restarts by Tune's FailureConfig."""
    from cliptd.training.loop import train_loop
    from cliptd.training.runtime import TuneRuntime

    train_loop(config, TuneRuntime())


def pretrain_fn_per_worker(config: dict) -> None:
    """Ray Train's entry point for student pre-training (``python -m cliptd.pretrain``)."""
    from cliptd.training.pretrain_loop import pretrain_loop
    from cliptd.training.runtime import RayRuntime

    pretrain_loop(config, RayRuntime())


def make_trainer(cfg: dict, *, name: str, storage_path: str, workers: int = 1,
                 gpus_per_worker: float = 0, cpus_per_worker: float = 1, max_failures: int = 0,
                 keep_checkpoints: int = 2, callbacks=None, timeout_s: int = 120,
                 train_fn=train_fn_per_worker, score_attribute: str | None = "score",
                 step_key: str = "epoch"):
    """A TorchTrainer for one run; relaunching with the same (storage_path, name) resumes.
    Checkpoints kept: the best ``keep_checkpoints`` by ``score_attribute`` (None: the
    latest). A run config that names a tracking run (``cfg["tracking"]``) is logged, at
    each report's ``step_key``, by Train's controller on this node (``cliptd.training.live``),
    not by the workers, which get the config without it."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    callbacks = list(callbacks or [])
    if cfg.get("tracking"):
        from cliptd.training.live import TrackingCallback

        callbacks.append(TrackingCallback(cfg["tracking"], step_key=step_key))
        cfg = {**cfg, "tracking": None}

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_fn,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=timeout_s),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep_checkpoints, checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="max"),
            callbacks=callbacks),
    )
