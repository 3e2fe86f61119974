"""Sweeps: for every data condition × method, an Optuna search with ASHA early stopping over
``tune_spaces/<task>.yaml``; then each best config re-run over seeds; then the comparison.

    python -m cliptd.tune --task vcr                    # the embedded synthetic world
    python -m cliptd.tune --task vcr --budget small     # a first look (~minutes)
    python -m cliptd.tune --task vcr --resume           # continue a killed sweep
    python -m cliptd.tune --task vcr --tracking-uri http://127.0.0.1:5000 \\
        --storage-path s3://bucket/cliptd --workers 2 --gpus-per-worker 1   # on a cluster

Each trial is a function (``train_driver_fn``) that launches a Ray Train ``TorchTrainer``
(the same run ``cliptd.train`` does) and reports through ``TuneReportCallback``. Every trial
is one MLflow child run under the sweep's parent run, found again by its trial id.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml

from cliptd.cli import add_common_args, die, init_ray, resolve_storage, setup_embedded
from cliptd.errors import DataError
from cliptd.space import Space, SpaceError, apply_sample, describe, load_space, to_tune
from cliptd.table import comparison_rows, to_csv, to_markdown
from cliptd.train import PRIMARY_METRIC, make_trainer, resolve_config

META = "_cliptd"  # the trial config key holding sweep metadata (not a searched knob)


def condition_name(shots, preset: str) -> str:
    return f"{preset}-shots{shots}"


def train_driver_fn(config: dict) -> None:
    """One Tune trial: resolve its config, open (or find) its MLflow run, fit a TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cliptd import tracking

    meta = config[META]
    sample = {k: v for k, v in config.items() if k != META}
    cfg = resolve_config(apply_sample(meta["base"], sample))
    ctx = ray.tune.get_context()
    trial_id = f"{meta['sweep_id']}/{ctx.get_trial_id()}"
    tags = {"task": cfg["task"], "condition": meta["condition"], "shots": cfg["shots"],
            "preset": cfg["preset"], "method": cfg["distill"]["method"], "seed": cfg["seed"],
            "subset_seed": cfg["subset_seed"], "phase": meta["phase"],
            "sweep": meta["sweep_id"]}
    if meta.get("tracking_uri"):
        run_id, _ = tracking.find_or_create_trial_run(
            meta["tracking_uri"], meta["experiment_id"], meta["parent_run_id"], trial_id,
            name=f"{meta['condition']}/{cfg['distill']['method']}/{ctx.get_trial_name()}",
            tags=tags, params={**cfg, "searcher_seed": meta["searcher_seed"],
                               "versions": meta["versions"]})
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


def plan_resources(args, budget) -> dict:
    """Trial concurrency and per-trial resources from what the cluster actually has."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
    on_head = res.get("cliptd_driver", 0) > 0  # keep trial drivers off GPU workers
    if args.gpus_per_worker > 0:
        if gpus < args.gpus_per_worker * args.workers:
            die(f"a trial needs {args.workers} × {args.gpus_per_worker} GPUs; the cluster has "
                f"{gpus:g}")
        concurrency = int(gpus // (args.workers * args.gpus_per_worker))
        cpus_per_worker = args.cpus_per_worker or 1
        driver_cpu = 0.5
    else:
        concurrency = max(1, int(cpus // args.workers))
        per_trial = cpus / concurrency
        driver_cpu = min(0.5, per_trial * 0.2)
        cpus_per_worker = args.cpus_per_worker or (per_trial - driver_cpu) / args.workers
    if budget.max_concurrent:
        concurrency = min(concurrency, budget.max_concurrent)
    driver = {"CPU": driver_cpu}
    if on_head:
        driver["cliptd_driver"] = 0.01
    return {"concurrency": max(1, concurrency), "driver": driver,
            "cpus_per_worker": round(cpus_per_worker, 3)}


def run_tuner(name: str, storage: str, param_space: dict, tune_config, resources: dict,
              resume: bool):
    import ray.tune

    trainable = ray.tune.with_resources(train_driver_fn, resources["driver"])
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


def search(space: Space, budget, base: dict, meta: dict, condition: str, method: str,
           args, resources: dict, out: Path):
    """Optuna (TPE, seeded, study in SQLite) + ASHA on `epoch`; returns the best sample."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    knobs = space.knobs_for(method)
    study = f"{meta['sweep_id']}-{condition}-{method}"
    storage_url = f"sqlite:///{(out / 'optuna.db').resolve()}"
    params = to_tune(knobs)
    searcher = None
    if params:
        searcher = ConcurrencyLimiter(OptunaSearch(
            metric="score", mode="max", seed=args.searcher_seed, study_name=study,
            storage=optuna.storages.RDBStorage(storage_url),
            sampler=optuna.samplers.TPESampler(seed=args.searcher_seed)),
            max_concurrent=resources["concurrency"])
    scheduler = ASHAScheduler(time_attr="epoch", metric="score", mode="max",
                              max_t=budget.epochs, grace_period=budget.grace_period,
                              reduction_factor=budget.reduction_factor)
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                  num_samples=budget.num_samples if params else 1,
                                  max_concurrent_trials=resources["concurrency"])
    meta = {**meta, "condition": condition, "phase": "search", "base": base}
    grid = run_tuner(f"{meta['sweep_id']}-search-{condition}-{method}", args.storage_path,
                     {**params, META: meta}, tune_config, resources, args.resume)
    ok = [r for r in grid if r.error is None and r.metrics and "score" in r.metrics
          and not math.isnan(r.metrics["score"])]
    if not ok:
        die(f"every trial of {condition}/{method} failed: see {args.storage_path}")
    best = max(ok, key=lambda r: (r.metrics.get("epoch", 0) >= budget.epochs,
                                  r.metrics["score"]))
    sample = {k: v for k, v in best.config.items() if k != META}
    return sample, grid


def rerun_seeds(budget, base: dict, meta: dict, condition: str, method: str, sample: dict,
                args, resources: dict):
    from ray import tune

    seeds = list(range(budget.seeds))
    meta = {**meta, "condition": condition, "phase": "seeds", "base": base}
    space = {**sample, "seed": tune.grid_search(seeds), "subset_seed": tune.sample_from(
        lambda spec: spec.config["seed"]), META: meta}
    tune_config = tune.TuneConfig(max_concurrent_trials=resources["concurrency"])
    return run_tuner(f"{meta['sweep_id']}-seeds-{condition}-{method}", args.storage_path,
                     space, tune_config, resources, args.resume)


def close_runs(grid, meta: dict, phase: str) -> list[dict]:
    """Mark each trial's MLflow run finished (Ray does not) with its final metrics."""
    from cliptd import tracking

    records = []
    c = tracking.client(meta["tracking_uri"]) if meta.get("tracking_uri") else None
    for r in grid:
        m = r.metrics or {}
        trial_id = f"{meta['sweep_id']}/{m['trial_id']}" if m.get("trial_id") else None
        cfg = r.config or {}
        records.append({"phase": phase, "metrics": m, "config": cfg, "error": r.error,
                        "seed": cfg.get("seed", 0)})
        if c is None or trial_id is None:
            continue
        runs = c.search_runs([meta["experiment_id"]],
                             filter_string=f"tags.`cliptd.trial_id` = '{trial_id}'")
        for run in runs:
            status = "FAILED" if r.error else "FINISHED"
            if m.get("epoch", 0) and run.info.status == "RUNNING":
                c.set_tag(run.info.run_id, "cliptd.early_stopped",
                          str(m.get("epoch") < meta["epochs"]))
                c.set_tag(run.info.run_id, "cliptd.best_checkpoint",
                          str(r.checkpoint.path) if r.checkpoint else "")
            if run.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, status=status)
    return records


def write_best(out: Path, condition: str, method: str, base: dict, sample: dict) -> Path:
    cfg = resolve_config(apply_sample(base, sample))
    cfg.pop("tracking", None)
    path = out / "best" / f"{cfg['task']}-{condition}-{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=True))
    os.replace(tmp, path)
    return path


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
    parser.add_argument("--out", type=Path, help="local output folder (default runs/<name>)")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        space = load_space(args.space or args.task)
        if space.task != args.task:
            raise SpaceError(f"{space.path}: task: {space.task!r} but --task {args.task}")
        budget = space.budgets[args.budget]
        methods = space.methods if not args.methods else args.methods.split(",")
        for m in methods:
            if m not in space.methods:
                raise SpaceError(f"--methods: {m!r} is not in {space.path}'s methods")
    except SpaceError as exc:
        die(str(exc))
    from cliptd import tracking

    uri = args.tracking_uri or tracking.default_tracking_uri()
    try:
        tracking.check_reachable(uri)
    except Exception as exc:  # noqa: BLE001 - report any failure to reach MLflow clearly
        die(f"MLflow tracking at {uri} is not usable: {exc}")
    name = args.name or f"{args.task}-{args.budget}"
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
    resources = plan_resources(args, budget)
    versions = package_versions()
    experiment_id = tracking.get_experiment(uri, f"cliptd-{args.task}")
    parent = tracking.find_or_create_parent(uri, experiment_id, name, name, {
        "task": args.task, "budget": args.budget, "space": str(space.path)})
    meta = {"sweep_id": name, "tracking_uri": uri, "experiment_id": experiment_id,
            "parent_run_id": parent, "storage_path": args.storage_path,
            "workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
            "cpus_per_worker": resources["cpus_per_worker"], "max_failures": args.max_failures,
            "searcher_seed": args.searcher_seed, "versions": versions, "epochs": budget.epochs}
    c = tracking.client(uri)
    c.log_dict(parent, {"space": str(space.path), "budget": vars(budget), "resources": resources,
                        "versions": versions, "base": base, "args": {
                            k: str(v) for k, v in vars(args).items()}}, "sweep.json")
    print(f"[cliptd] sweep {name}: {len(space.conditions())} condition(s) × {len(methods)} "
          f"method(s), {budget.num_samples} trials each, then {budget.seeds} seeds; "
          f"{resources['concurrency']} concurrent trial(s), {args.workers} worker(s) each")
    records, summary = [], []
    for shots, preset in space.conditions():
        condition = condition_name(shots, preset)
        cbase = {**base, **space.fixed, "shots": shots, "preset": preset,
                 "epochs": budget.epochs, "min_steps": budget.min_steps,
                 # one intra-op thread per CPU the worker holds: no oversubscription
                 "threads": max(1, int(resources["cpus_per_worker"]))}
        for method in methods:
            mbase = {**cbase, "distill": {**(cbase.get("distill") or {}), "method": method}}
            sample, grid = search(space, budget, {**mbase, "eval_limit": budget.eval_limit},
                                  meta, condition, method, args, resources, out)
            close_runs(grid, meta, "search")
            best_path = write_best(out, condition, method, mbase, sample)
            seeds = rerun_seeds(budget, mbase, meta, condition, method, sample, args, resources)
            for rec in close_runs(seeds, meta, "seeds"):
                records.append({**rec, "condition": condition, "method": method})
            summary.append({"condition": condition, "method": method, "best": best_path,
                            "trials": len(grid), "sample": sample})
    primary = PRIMARY_METRIC[args.task]
    metric_rows = {f"in-domain {primary}": f"val/id/{primary}",
                   f"shifted {primary}": f"val/shift/{primary}"}
    if args.task == "vcr":
        metric_rows |= {"in-domain qa_r": "val/id/qa_r", "in-domain q_ar": "val/id/q_ar"}
    rows = comparison_rows(records, metric_rows)
    md, csv_text = to_markdown(rows), to_csv(rows)
    (out / "comparison.md").write_text(md)
    (out / "comparison.csv").write_text(csv_text)
    c.log_artifact(parent, str(out / "comparison.md"))
    c.log_artifact(parent, str(out / "comparison.csv"))
    c.set_terminated(parent, status="FINISHED")
    print("\n== Trials (search) ==")
    for s in summary:
        knobs = ", ".join(f"{k}={describe(v)}" for k, v in sorted(s["sample"].items()))
        print(f"{s['condition']:<24} {s['method']:<7} trials={s['trials']}  best: {knobs}")
        print(f"{'':<32}replay: python -m cliptd.train --task {args.task} --config {s['best']}")
    print(f"\n== Comparison over {budget.seeds} seed(s) (mean ± std, %) ==")
    print(md)
    print(f"MLflow: {tracking.ui_command(uri)}   (experiment cliptd-{args.task}, "
          f"parent run {parent})")
    print(f"Optuna: optuna-dashboard sqlite:///{out / 'optuna.db'} --host 127.0.0.1")
    print(f"Outputs: {out}   wall time {time.time() - start:.0f} s")
    (out / "summary.json").write_text(json.dumps(
        {"summary": [{**s, "best": str(s["best"])} for s in summary],
         "seconds": time.time() - start}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
