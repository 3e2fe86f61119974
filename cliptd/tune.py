"""Sweeps: for every data condition × method, an Optuna search with ASHA early stopping over
``tune_spaces/<task>.yaml``; then each best config re-run over seeds; then the comparison.

    python -m cliptd.tune --task vcr                    # the embedded synthetic world
    python -m cliptd.tune --task vcr --budget small     # a first look (~minutes)
    python -m cliptd.tune --task vcr --resume           # continue a killed sweep
    python -m cliptd.tune --task vcr --budget small --num-samples 50   # trials per search
    python -m cliptd.tune --task vcr --tracking-uri http://127.0.0.1:5000 \\
        --storage-path s3://bucket/cliptd --workers 2 --gpus-per-worker 1   # on a cluster

Each trial is a function (``train_driver_fn``) that launches a Ray Train ``TorchTrainer``
(the same run ``cliptd.train`` does) and reports through ``TuneReportCallback``. Every trial
is one MLflow child run under the sweep's parent run, found again by its trial id.

Every search (and every seed re-run job) is its own ``Tuner``, run as a Ray task; as many run
at once as the cluster has trial slots, so one search's early-stopped trials leave no slot
idle. The search's best trial, when it ran every epoch, is also seed 0 of the comparison: its
last epoch is evaluated on the whole eval split (earlier epochs on the ``eval_limit`` sample
that ASHA compares on), exactly as a re-run would be.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml

from cliptd.cli import (
    add_common_args,
    die,
    init_ray,
    reachable_tracking_uri,
    resolve_storage,
    setup_embedded,
)
from cliptd.config import PRIMARY_METRIC, resolve_config
from cliptd.errors import DataError
from cliptd.launch import make_trainer
from cliptd.space import SpaceError, apply_sample, describe, load_space, to_tune
from cliptd.table import comparison_rows, to_csv, to_markdown


def condition_name(shots, preset: str) -> str:
    return f"{preset}-shots{shots}"


def train_driver_fn(config: dict, meta: dict) -> None:
    """One Tune trial: resolve its config, open (or find) its MLflow run, fit a TorchTrainer.

    ``config`` holds only what Tune samples (the searched knobs, or the seed); ``meta`` (given
    through ``tune.with_parameters``) holds the sweep's fixed settings and the base config."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cliptd import tracking

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
        run_id, _ = tracking.patiently(lambda: tracking.find_or_create_trial_run(
            meta["tracking_uri"], meta["experiment_id"], meta["parent_run_id"], trial_id,
            name=f"{meta['condition']}/{cfg['distill']['method']}/{ctx.get_trial_name()}",
            tags=tags, params={**cfg, "searcher_seed": meta["searcher_seed"],
                               "versions": meta["versions"]}),
            f"opening the MLflow run of trial {trial_id}")
        cfg["tracking"] = {"uri": meta["tracking_uri"], "run_id": run_id}
    trainer = make_trainer(
        cfg, name=f"{meta['sweep_id']}-{ctx.get_trial_id()}".replace("/", "-"),
        storage_path=meta["storage_path"], workers=meta["workers"],
        gpus_per_worker=meta["gpus_per_worker"], cpus_per_worker=meta["cpus_per_worker"],
        max_failures=meta["max_failures"], callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error


def package_versions() -> dict:
    from importlib.metadata import version

    names = ("cliptd", "ray", "torch", "torchvision", "transformers", "open_clip_torch",
             "optuna", "mlflow", "pyarrow")
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except Exception:  # noqa: BLE001 - a missing optional package is just absent
            out[n] = "absent"
    return out


class SweepError(RuntimeError):
    """A sweep cannot go on (every trial of a search failed, ...): reported, exit 2."""


def plan_resources(args, budget) -> dict:
    """Trial slots and per-trial resources from what the cluster actually has.

    A trial is its driver (a Tune function, tiny) plus its Ray Train workers; ``slots`` trials
    fit at once. Searches share the slots (see ``run_jobs``), so Ray's own resource
    accounting is what keeps the cluster full and never oversubscribed."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
    on_head = res.get("cliptd_driver", 0) > 0  # keep trial drivers off GPU workers
    if args.gpus_per_worker > 0:
        if gpus < args.gpus_per_worker * args.workers:
            die(f"a trial needs {args.workers} × {args.gpus_per_worker} GPUs; the cluster has "
                f"{gpus:g}")
        slots = int(gpus // (args.workers * args.gpus_per_worker))
        cpus_per_worker = args.cpus_per_worker or 1
        driver_cpu = 0.5
    else:
        slots = max(1, int(cpus // args.workers))
        per_trial = cpus / slots
        # a trial driver only waits on its TorchTrainer: a sliver of CPU, with room for a
        # second (waiting) driver per slot, see run_jobs
        driver_cpu = min(0.5, per_trial * 0.025)
        cpus_per_worker = args.cpus_per_worker or (per_trial - 2 * driver_cpu) / args.workers
    if budget.max_concurrent:
        slots = min(slots, budget.max_concurrent)
    driver = {"CPU": driver_cpu}
    task = {"num_cpus": 0}
    if on_head:
        driver["cliptd_driver"] = 0.01
        task["resources"] = {"cliptd_driver": 0.001}
    return {"concurrency": max(1, slots), "driver": driver, "task": task,
            "cpus_per_worker": round(cpus_per_worker, 3)}


def run_tuner(name: str, storage: str, param_space: dict, tune_config, resources: dict,
              meta: dict, resume: bool):
    import ray.tune

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(train_driver_fn, meta=meta), resources["driver"])
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
                                   failure_config=ray.tune.FailureConfig(max_failures=1)))
    return tuner.fit()


def search(job: dict, concurrency: int) -> dict:
    """Optuna (TPE, seeded, study in SQLite) + ASHA on `epoch` for one (condition, method).

    Returns the best sample, the trials' records, and the best trial's record when it ran
    every epoch: its last epoch evaluated on the whole eval split with seed 0, exactly what a
    seed-0 re-run would give, so it stands as seed 0 of the comparison."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space, budget, meta, args = job["space"], job["budget"], job["meta"], job["args"]
    condition, method = job["condition"], job["method"]
    knobs = space.knobs_for(method)
    study = f"{meta['sweep_id']}-{condition}-{method}"
    params = to_tune(knobs)
    searcher = None
    if params:
        searcher = ConcurrencyLimiter(OptunaSearch(
            metric="score", mode="max", seed=args.searcher_seed, study_name=study,
            storage=optuna.storages.RDBStorage(job["study_url"]),
            sampler=optuna.samplers.TPESampler(seed=args.searcher_seed)),
            max_concurrent=concurrency)
    scheduler = ASHAScheduler(time_attr="epoch", metric="score", mode="max",
                              max_t=budget.epochs, grace_period=budget.grace_period,
                              reduction_factor=budget.reduction_factor)
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                  num_samples=budget.num_samples if params else 1,
                                  max_concurrent_trials=None if searcher else concurrency)
    meta = {**meta, "condition": condition, "method": method, "phase": "search",
            "base": job["base"]}
    grid = run_tuner(f"{meta['sweep_id']}-search-{condition}-{method}", args.storage_path,
                     params, tune_config, job["resources"], meta, args.resume)
    ok = [r for r in grid if r.error is None and r.metrics and "score" in r.metrics
          and not math.isnan(r.metrics["score"])]
    if not ok:
        raise SweepError(f"every trial of {condition}/{method} failed: see "
                         f"{args.storage_path}/{meta['sweep_id']}-search-{condition}-{method}")
    best = max(ok, key=lambda r: (r.metrics.get("epoch", 0) >= budget.epochs,
                                  r.metrics["score"]))
    records = close_runs(grid, meta, "search")
    # The search ran with the base seed (= its subset seed): its best trial, if it ran every
    # epoch, is that seed's run of the best config, so it is not run twice.
    base = resolve_config(job["base"])
    reused = None
    if best.metrics.get("epoch", 0) >= budget.epochs and base["seed"] == base["subset_seed"]:
        reused = next(r for r in records if r["metrics"].get("trial_id") ==
                      best.metrics.get("trial_id"))
        reused["seed"] = base["seed"]
        mark_compared(meta, reused)
    return {"sample": dict(best.config), "trials": len(grid), "reused": reused}


def rerun_seeds(job: dict, concurrency: int) -> dict:
    """The best config re-run with each seed the search did not already provide."""
    from ray import tune

    meta = {**job["meta"], "condition": job["condition"], "method": job["method"],
            "phase": "seeds", "base": job["base"]}
    space = {**job["sample"], "seed": tune.grid_search(job["seeds"]),
             "subset_seed": tune.sample_from(lambda spec: spec.config["seed"])}
    grid = run_tuner(f"{meta['sweep_id']}-seeds-{job['condition']}-{job['method']}",
                     job["args"].storage_path, space,
                     tune.TuneConfig(max_concurrent_trials=concurrency), job["resources"],
                     meta, job["args"].resume)
    records = close_runs(grid, meta, "seeds")
    for rec in records:
        if rec["error"] is None:
            mark_compared(meta, rec)
    return {"records": records}


def run_job(job: dict, concurrency: int) -> dict:
    """One search or seeds job, run as a Ray task so that several share the cluster."""
    from cliptd import tracking

    tracking.fail_fast(timeout_s=30)  # its MLflow calls retry through tracking.patiently
    return search(job, concurrency) if job["kind"] == "search" else \
        rerun_seeds(job, concurrency)


def run_jobs(jobs: list[dict], resources: dict, on_done) -> None:
    """Run the sweep's jobs as Ray tasks, as many at once as there are trial slots.

    Each running job gets ``slots // running`` concurrent trials, and the last job in the
    queue gets up to ``slots``: when the others end it can use their slots at once instead
    of leaving them idle while its own trials run one by one. A trial beyond the free slots
    waits for its workers, holding only its driver's sliver of CPU (``plan_resources``
    reserves room for up to ``2 × slots`` drivers, the cap on trials in flight here), so
    the workers never oversubscribe the machine and no trial can block another's workers.
    ``on_done(job, result)`` may return follow-up jobs (a search's seed re-runs)."""
    from collections import deque

    import ray

    slots = resources["concurrency"]
    task = ray.remote(max_retries=0, **resources["task"])(run_job)
    queue, running = deque(jobs), {}
    while queue or running:
        parallel = min(slots, len(queue) + len(running))
        while queue and len(running) < parallel:
            job = queue.popleft()
            in_flight = sum(c for _, c in running.values())
            wanted = slots if not queue else slots // parallel
            concurrency = max(1, min(wanted, 2 * slots - in_flight))
            running[task.remote(job, concurrency)] = (job, concurrency)
        done, _ = ray.wait(list(running), num_returns=1)
        job, _ = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
            for ref in running:
                ray.cancel(ref, force=True)
            die(f"{job['kind']} {job['condition']}/{job['method']}: "
                f"{type(cause).__name__}: {cause}")
        queue.extend(on_done(job, result) or [])


def close_runs(grid, meta: dict, phase: str) -> list[dict]:
    """Mark each trial's MLflow run finished (Ray does not) with its final metrics.

    First its metrics are made whole: Tune stops a trial as soon as it reports its last
    epoch, so an epoch logged while the server was away can still sit in the trial's local
    buffer (replayed here), or, on another node, only in Ray's results (filled in)."""
    from cliptd import tracking

    records = []
    uri = meta.get("tracking_uri")
    for r in grid:
        m = r.metrics or {}
        trial_id = f"{meta['sweep_id']}/{m['trial_id']}" if m.get("trial_id") else None
        cfg = r.config or {}
        records.append({"phase": phase, "metrics": m, "config": cfg,
                        "error": None if r.error is None else str(r.error),
                        "seed": cfg.get("seed", 0), "trial_id": trial_id})
        if uri is None or trial_id is None:
            continue
        tracking.patiently(lambda r=r, m=m, trial_id=trial_id: _close_run(
            uri, meta, r, m, trial_id), f"closing the MLflow run of trial {trial_id}")
    return records


def _ray_results(result) -> list[dict]:
    """Every result Ray recorded for a trial (one per epoch), [] when it has none."""
    try:
        df = result.metrics_dataframe
    except Exception:  # noqa: BLE001 - a trial that never reported has no progress file
        return []
    return [] if df is None else df.to_dict("records")


def _close_run(uri: str, meta: dict, result, m: dict, trial_id: str) -> None:
    from cliptd import tracking

    c = tracking.client(uri)
    runs = c.search_runs([meta["experiment_id"]],
                         filter_string=f"tags.`cliptd.trial_id` = '{trial_id}'")
    for run in runs:
        tracking.replay_buffer(uri, run.info.run_id)
        tracking.backfill(uri, run.info.run_id, _ray_results(result))
        status = "FAILED" if result.error else "FINISHED"
        if m.get("epoch", 0) and run.info.status == "RUNNING":
            c.set_tag(run.info.run_id, "cliptd.early_stopped",
                      str(m.get("epoch") < meta["epochs"]))
            c.set_tag(run.info.run_id, "cliptd.best_checkpoint",
                      str(result.checkpoint.path) if result.checkpoint else "")
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, status=status)


def mark_compared(meta: dict, record: dict) -> None:
    """Tag the MLflow run whose final metrics count in the comparison (``cliptd.report``)."""
    from cliptd import tracking

    if not (meta.get("tracking_uri") and record.get("trial_id")):
        return

    def tag() -> None:
        c = tracking.client(meta["tracking_uri"])
        for run in c.search_runs([meta["experiment_id"]], filter_string=(
                f"tags.`cliptd.trial_id` = '{record['trial_id']}'")):
            c.set_tag(run.info.run_id, "cliptd.compare", "true")

    tracking.patiently(tag, f"tagging trial {record['trial_id']} as compared")


def sweep_name(args) -> str:
    """``--name``, else ``<task>-<budget>``: a new sweep when that one exists (so running
    the main job twice never mixes two sweeps' runs), the latest one with ``--resume``."""
    if args.name:
        return args.name
    base = f"{args.task}-{args.budget}"
    if args.out is not None:
        return base
    runs = Path("runs")
    taken = sorted((p for p in runs.glob(f"{base}*") if (p / "optuna.db").exists()),
                   key=lambda p: p.stat().st_mtime)
    if args.resume:
        return taken[-1].name if taken else base
    return base if not (runs / base).exists() else f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_best(out: Path, condition: str, method: str, base: dict, sample: dict) -> Path:
    cfg = resolve_config(apply_sample(base, sample))
    cfg.pop("tracking", None)
    path = out / "best" / f"{cfg['task']}-{condition}-{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=True))
    os.replace(tmp, path)
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into a usage message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cliptd.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--space", type=Path, help="search space YAML (default "
                        "tune_spaces/<task>.yaml)")
    parser.add_argument("--name", help="sweep name (default <task>-<budget>); reuse to resume")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--searcher-seed", type=int, default=0)
    parser.add_argument("--max-failures", type=int, default=1,
                        help="Ray Train restarts per trial (worker failures)")
    parser.add_argument("--data", type=Path, help="a prepared dataset (python -m cliptd.data "
                        "prepare); default: the embedded synthetic world")
    parser.add_argument("--student", help="pretrained student folder (with --data)")
    parser.add_argument("--teacher-cache", type=Path, help="teacher cache folder (with --data)")
    parser.add_argument("--methods", help="comma-separated subset of the space's methods")
    parser.add_argument("--num-samples", type=positive_int, metavar="N",
                        help="trials per search (overrides the budget's num_samples)")
    parser.add_argument("--out", type=Path, help="local output folder (default runs/<name>)")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        space = load_space(args.space or args.task)
        if space.task != args.task:
            raise SpaceError(f"{space.path}: task: {space.task!r} but --task {args.task}")
        budget = space.budgets[args.budget]
        if args.num_samples is not None:  # recorded with the budget in the sweep's sweep.json
            budget = dataclasses.replace(budget, num_samples=args.num_samples)
        methods = args.methods.split(",") if args.methods else \
            (budget.methods or space.methods)
        for m in methods:
            if m not in space.methods:
                raise SpaceError(f"--methods: {m!r} is not in {space.path}'s methods")
    except SpaceError as exc:
        die(str(exc))
    from cliptd import tracking

    uri = reachable_tracking_uri(args)
    name = sweep_name(args)
    out = (args.out or Path("runs") / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.storage_path = resolve_storage(args.storage_path)
    try:
        if args.data:
            if not (args.student and (args.teacher_cache or methods == ["none"])):
                raise ValueError("--data needs --student and --teacher-cache")
            base = {"task": args.task, "data": str(args.data), "student": args.student,
                    "teacher_cache": str(args.teacher_cache) if args.teacher_cache else None}
        else:
            world, caches = setup_embedded(args, (args.task,))
            base = {"task": args.task, "data": str(world.data[args.task]),
                    "student": str(world.student), "teacher_cache": str(caches[args.task])}
    except (ValueError, DataError, FileNotFoundError) as exc:
        die(str(exc))
    init_ray(args)
    # after Ray's start, so that its workers keep MLflow's defaults until they call it too
    tracking.fail_fast(timeout_s=30)
    resources = plan_resources(args, budget)
    versions = package_versions()
    experiment_id = tracking.patiently(lambda: tracking.get_experiment(
        uri, f"cliptd-{args.task}"), "opening the experiment")
    parent = tracking.patiently(lambda: tracking.find_or_create_parent(
        uri, experiment_id, name, name, {"task": args.task, "budget": args.budget,
                                         "space": str(space.path)}),
        "opening the sweep's parent run")
    meta = {"sweep_id": name, "tracking_uri": uri, "experiment_id": experiment_id,
            "parent_run_id": parent, "storage_path": args.storage_path,
            "workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
            "cpus_per_worker": resources["cpus_per_worker"], "max_failures": args.max_failures,
            "searcher_seed": args.searcher_seed, "versions": versions, "epochs": budget.epochs}
    c = tracking.client(uri)
    tracking.patiently(lambda: c.log_dict(parent, {
        "space": str(space.path), "budget": vars(budget), "resources": resources,
        "versions": versions, "base": base, "args": {
            k: str(v) for k, v in vars(args).items()}}, "sweep.json"), "logging sweep.json")
    print(f"[cliptd] sweep {name}: {len(space.conditions())} condition(s) × {len(methods)} "
          f"method(s), {budget.num_samples} trials each, then {budget.seeds} seed(s); "
          f"{resources['concurrency']} trial(s) at once, {args.workers} worker(s) each")
    study_url = f"sqlite:///{out / 'optuna.db'}"  # every search's Optuna study
    jobs = []
    for shots, preset in space.conditions():
        condition = condition_name(shots, preset)
        cbase = {**base, **space.fixed, "shots": shots, "preset": preset,
                 "epochs": budget.epochs, "min_steps": budget.min_steps,
                 "eval_limit": budget.eval_limit,
                 # one intra-op thread per CPU the worker holds: no oversubscription
                 "threads": max(1, int(resources["cpus_per_worker"]))}
        for method in methods:
            mbase = {**cbase, "distill": {**(cbase.get("distill") or {}), "method": method}}
            jobs.append({"kind": "search", "condition": condition, "method": method,
                         "base": mbase, "space": space, "budget": budget, "meta": meta,
                         "args": args, "resources": resources, "study_url": study_url})
    records, summary = [], []

    def on_done(job: dict, result: dict) -> list[dict]:
        condition, method = job["condition"], job["method"]
        if job["kind"] == "seeds":
            records.extend({**rec, "condition": condition, "method": method}
                           for rec in result["records"])
            print(f"[cliptd] {condition}/{method}: seed re-runs done")
            return []
        best_path = write_best(out, condition, method, job["base"], result["sample"])
        summary.append({"condition": condition, "method": method, "best": best_path,
                        "trials": result["trials"], "sample": result["sample"]})
        seeds = list(range(budget.seeds))
        reused = result["reused"]
        if reused is not None and reused["seed"] in seeds:
            records.append({**reused, "condition": condition, "method": method})
            seeds.remove(reused["seed"])
        print(f"[cliptd] {condition}/{method}: search done ({result['trials']} trials), "
              f"best config → {best_path}"
              + (f"; re-running seeds {seeds}" if seeds else ""))
        return [{**job, "kind": "seeds", "sample": result["sample"], "seeds": seeds}] \
            if seeds else []

    # The Optuna study database, created here once: the searches open it at the same time,
    # and concurrent first opens race on creating its tables.
    import optuna

    optuna.storages.RDBStorage(study_url)
    run_jobs(jobs, resources, on_done)
    order = {(j["condition"], j["method"]): i for i, j in enumerate(jobs)}
    summary.sort(key=lambda s: order[(s["condition"], s["method"])])
    primary = PRIMARY_METRIC[args.task]
    metric_rows = {f"in-domain {primary}": f"val/id/{primary}",
                   f"shifted {primary}": f"val/shift/{primary}"}
    if args.task == "vcr":
        metric_rows |= {"in-domain qa_r": "val/id/qa_r", "in-domain q_ar": "val/id/q_ar"}
    rows = comparison_rows(records, metric_rows)
    md, csv_text = to_markdown(rows), to_csv(rows)
    (out / "comparison.md").write_text(md)
    (out / "comparison.csv").write_text(csv_text)
    def close_parent() -> None:
        c.log_artifact(parent, str(out / "comparison.md"))
        c.log_artifact(parent, str(out / "comparison.csv"))
        c.set_terminated(parent, status="FINISHED")

    tracking.patiently(close_parent, "closing the sweep's parent run")
    print("\n== Trials (search) ==")
    for s in summary:
        knobs = ", ".join(f"{k}={describe(v)}" for k, v in sorted(s["sample"].items()))
        print(f"{s['condition']:<24} {s['method']:<13} trials={s['trials']}  best: {knobs}")
        print(f"{'':<32}replay: python -m cliptd.train --task {args.task} --config {s['best']}")
    print(f"\n== Comparison over {budget.seeds} seed(s) (mean ± std, %) ==")
    print(md)
    print(f"MLflow: {tracking.ui_command(uri)}   (experiment cliptd-{args.task}, "
          f"parent run {parent})")
    print(f"Optuna: optuna-dashboard {study_url} --host 127.0.0.1")
    print(f"Outputs: {out}   wall time {time.time() - start:.0f} s")
    (out / "summary.json").write_text(json.dumps(
        {"summary": [{**s, "best": str(s["best"])} for s in summary],
         "seconds": time.time() - start}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
