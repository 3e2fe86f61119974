"""One Tune trial: its config resolved, its MLflow run opened, its Ray Train run fitted."""

from __future__ import annotations

from cliptd.core.config import resolve_config
from cliptd.sweep.space import apply_sample
from cliptd.training.launch import make_trainer


def condition_name(shots, preset: str) -> str:
    return f"{preset}-shots{shots}"


def train_driver_fn(config: dict, meta: dict) -> None:
    """One Tune trial: resolve its config, open (or find) its MLflow run, fit a TorchTrainer.

    ``config`` holds only what Tune samples (the searched knobs, or the seed); ``meta`` (given
    through ``tune.with_parameters``) holds the sweep's fixed settings and the base config."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cliptd.tracking import runs as tracking

    cfg = resolve_config(apply_sample(meta["base"], config))
    ctx = ray.tune.get_context()
    trial_id = f"{meta['sweep_id']}/{ctx.get_trial_id()}"
    tags = {"task": cfg["task"], "condition": meta["condition"], "shots": cfg["shots"],
            "preset": cfg["preset"], "method": cfg["distill"]["method"], "seed": cfg["seed"],
            "subset_seed": cfg["subset_seed"], "phase": meta["phase"],
            "sweep": meta["sweep_id"]}
    if meta.get("tracking_uri"):
        # the server away when a trial starts: the trial waits for it (the trials already
        # running keep training, their metrics buffered), logging the gap
        tracking.fail_fast(timeout_s=30)
        tracking.patiently(lambda: tracking.find_or_create_trial_run(
            meta["tracking_uri"], meta["experiment_id"], meta["parent_run_id"], trial_id,
            name=f"{meta['condition']}/{cfg['distill']['method']}/{ctx.get_trial_name()}",
            tags=tags, params={**cfg, "searcher_seed": meta["searcher_seed"],
                               "versions": meta["versions"]}, dataset=cfg),
            f"opening the MLflow run of trial {trial_id}")
        # the workers log nothing themselves: on a cluster they cannot reach a server on
        # the head's loopback; the search's own process (on the head) logs every result
        # it receives (cliptd.sweep.live)
        cfg["tracking"] = None
    trainer = make_trainer(
        cfg, name=f"{meta['sweep_id']}-{ctx.get_trial_id()}".replace("/", "-"),
        storage_path=meta["storage_path"], workers=meta["workers"],
        gpus_per_worker=meta["gpus_per_worker"], cpus_per_worker=meta["cpus_per_worker"],
        max_failures=meta["max_failures"], callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error
