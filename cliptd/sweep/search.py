"""One search (Optuna + ASHA) or one seed re-run job, each its own Tuner."""

from __future__ import annotations

import math

from cliptd.core.config import resolve_config
from cliptd.core.errors import SweepError
from cliptd.sweep.driver import reuse_actors, train_driver_fn, trial_resources, tune_run_options
from cliptd.sweep.records import close_runs, keep_best, kept_best, mark_compared
from cliptd.sweep.space import to_tune


def live_tracking(meta: dict) -> list:
    """The callback that logs every trial's results to MLflow from this process (on the
    head), as they arrive (``cliptd.sweep.live``)."""
    if not meta.get("tracking_uri"):
        return []
    from cliptd.sweep.live import LiveTracking

    return [LiveTracking(meta)]


def run_tuner(name: str, storage: str, param_space: dict, tune_config, resources: dict,
              meta: dict, resume: bool):
    import ray.tune

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(train_driver_fn, meta=meta),
        trial_resources(meta, resources["driver"]))
    # Tune registers trainables by name, cluster-wide per job: the sweep's jobs run at once,
    # so each needs its own name or one job's trials would run with another's ``meta``.
    trainable.__name__ = f"train_driver_fn_{meta['phase']}_{meta['condition']}_{meta['method']}"
    path = f"{storage.rstrip('/')}/{name}"
    if resume and ray.tune.Tuner.can_restore(path):
        print(f"[cliptd] resuming {path}")
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                       param_space=param_space)
    else:
        tuner = ray.tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                               run_config=ray.tune.RunConfig(
                                   name=name, storage_path=storage, verbose=1,
                                   callbacks=live_tracking(meta), **tune_run_options(meta)))
    return tuner.fit()


def final_checkpoint(result):
    """A trial's last checkpoint: the student of the epoch its final metrics (the whole eval
    split, which the search ranked it by) come from; None when it kept none.

    A light trial's checkpoints are Tune's own (``result.checkpoint``, the latest); a
    ``train`` trial's are Ray Train's, which Tune knows only by the ``checkpoint_path``
    each report carried (``TuneReportCallback``; a finished run restarted by a restored
    sweep re-reports its last result with it, ``RayRuntime.report_again``)."""
    from ray.tune import Checkpoint

    if result.checkpoint is not None:
        return result.checkpoint
    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df:
        return None
    rows = df.dropna(subset=["checkpoint_path"])
    if not len(rows):
        return None
    last = rows.sort_values("epoch")["checkpoint_path"].iloc[-1]
    return Checkpoint(last, filesystem=result.filesystem)


def finished(metrics: dict, epochs: int) -> bool:
    """Whether a trial's run ended on its own: it ran every epoch, or patience ended it
    (``train/stopped_early``). Either way its last score is on the whole eval split and is
    what a re-run with its seed would give. A trial ASHA stopped at a rung did not end: its
    last score is on the eval sample, mid-training."""
    return metrics.get("epoch", 0) >= epochs or metrics.get("train/stopped_early") == 1


def pick_best(ok: list, epochs: int, kept: str | None, sweep_id: str):
    """The search's best trial: a finished one (``finished``) before one ASHA stopped, then
    the higher score, ties to the lower trial id, so that the choice does not depend on the
    order a restored Tuner lists its trials in. ``kept``, the trial this search already
    chose (its seeds may be running with its config), stands when it is among ``ok``."""
    for r in ok:
        if f"{sweep_id}/{r.metrics['trial_id']}" == kept:
            return r
    ordered = sorted(ok, key=lambda r: r.metrics["trial_id"])
    return max(ordered, key=lambda r: (finished(r.metrics, epochs), r.metrics["score"]))


def search(job: dict, concurrency: int) -> dict:
    """Optuna (TPE, seeded, study in SQLite) + ASHA on `epoch` for one (condition, method).

    Returns the best sample, the trials' records, the best trial (its id and last
    checkpoint: the sweep's student for this search), and the best trial's record when it
    finished (every epoch, or ended by patience): its last epoch evaluated on the whole eval
    split with seed 0, exactly what a seed-0 re-run would give, so it stands as seed 0 of
    the comparison."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from cliptd.sweep.study import RestorableOptunaSearch

    space, budget, meta, args = job["space"], job["budget"], job["meta"], job["args"]
    condition, method = job["condition"], job["method"]
    knobs = space.knobs_for(method)
    study = f"{meta['sweep_id']}-{condition}-{method}"
    params = to_tune(knobs)
    searcher = None
    if params:
        searcher = ConcurrencyLimiter(RestorableOptunaSearch(
            metric="score", mode="max", seed=args.searcher_seed, study_name=study,
            storage=optuna.storages.RDBStorage(job["study_url"]),
            sampler=optuna.samplers.TPESampler(seed=args.searcher_seed)),
            max_concurrent=concurrency)
    scheduler = ASHAScheduler(time_attr="epoch", metric="score", mode="max",
                              max_t=budget.epochs, grace_period=budget.grace_period,
                              reduction_factor=budget.reduction_factor)
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                  num_samples=budget.num_samples if params else 1,
                                  max_concurrent_trials=None if searcher else concurrency,
                                  reuse_actors=reuse_actors(meta))
    meta = {**meta, "condition": condition, "method": method, "phase": "search",
            "base": job["base"]}
    grid = run_tuner(f"{meta['sweep_id']}-search-{condition}-{method}", args.storage_path,
                     params, tune_config, job["resources"], meta, args.resume)
    ok = [r for r in grid if r.error is None and r.metrics and "score" in r.metrics
          and not math.isnan(r.metrics["score"])]
    if not ok:
        raise SweepError(f"every trial of {condition}/{method} failed: see "
                         f"{args.storage_path}/{meta['sweep_id']}-search-{condition}-{method}")
    best = pick_best(ok, budget.epochs, kept_best(meta), meta["sweep_id"])
    keep_best(meta, f"{meta['sweep_id']}/{best.metrics['trial_id']}")
    records = close_runs(grid, meta, "search")
    # The search ran with the base seed (= its subset seed): its best trial, if it finished,
    # is that seed's run of the best config, so it is not run twice.
    base = resolve_config(job["base"])
    reused = None
    if finished(best.metrics, budget.epochs) and base["seed"] == base["subset_seed"]:
        reused = next(r for r in records if r["metrics"].get("trial_id") ==
                      best.metrics.get("trial_id"))
        reused["seed"] = base["seed"]
        mark_compared(meta, reused)
    return {"sample": dict(best.config), "trials": len(grid), "reused": reused,
            "best_trial": f"{meta['sweep_id']}/{best.metrics['trial_id']}",
            "best_epoch": int(best.metrics.get("epoch", 0)),
            "checkpoint": final_checkpoint(best)}


def rerun_seeds(job: dict, concurrency: int) -> dict:
    """The best config re-run with each seed the search did not already provide."""
    from ray import tune

    meta = {**job["meta"], "condition": job["condition"], "method": job["method"],
            "phase": "seeds", "base": job["base"]}
    space = {**job["sample"], "seed": tune.grid_search(job["seeds"]),
             "subset_seed": tune.sample_from(lambda spec: spec.config["seed"])}
    grid = run_tuner(f"{meta['sweep_id']}-seeds-{job['condition']}-{job['method']}",
                     job["args"].storage_path, space,
                     tune.TuneConfig(max_concurrent_trials=concurrency,
                                     reuse_actors=reuse_actors(meta)), job["resources"],
                     meta, job["args"].resume)
    records = close_runs(grid, meta, "seeds")
    for rec in records:
        if rec["error"] is None:
            mark_compared(meta, rec)
    return {"records": records}


def run_job(job: dict, concurrency: int) -> dict:
    """One search or seeds job, run as a Ray task so that several share the cluster."""
    from cliptd.tracking import runs as tracking

    tracking.fail_fast(timeout_s=30)  # its MLflow calls retry through tracking.patiently
    return search(job, concurrency) if job["kind"] == "search" else \
        rerun_seeds(job, concurrency)
