"""Sweeps: for every data condition × method, an Optuna search with ASHA early stopping over
``cliptd/sweep/spaces/<task>.yaml``; then each best config re-run over seeds; then the comparison.

    python -m cliptd.tune --task vcr                    # the embedded synthetic world
    python -m cliptd.tune --task vcr --budget small     # a first look (~minutes)
    python -m cliptd.tune --task vcr --resume           # continue a killed sweep
    python -m cliptd.tune --task vcr --budget small --num-samples 50   # trials per search
    python -m cliptd.tune --task vcr --tracking-uri http://127.0.0.1:5000 \
        --storage-path s3://bucket/cliptd --workers 2 --gpus-per-worker 1   # on a cluster

Each trial is a function (``train_driver_fn``). With one worker it trains in its own process
(``--trial-kind light``, the default for ``--workers 1``: Tune checkpoints, ``tune.report``,
Tune's restarts, no Ray Train processes); otherwise it launches a Ray Train ``TorchTrainer``
(the same run ``python -m cliptd.train`` does) and reports through ``TuneReportCallback``
(``--trial-kind train``). Every trial is one MLflow child run under the sweep's parent run,
found again by its trial id.

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
import os
import sys
import time
from pathlib import Path

import yaml

from cliptd.cli.common import (
    add_common_args,
    add_data_args,
    die,
    init_ray,
    positive_int,
    reachable_tracking_uri,
    resolve_storage,
    setup_embedded,
    user_run_config,
)
from cliptd.core.atomic import atomic_write
from cliptd.core.config import PRIMARY_METRIC, resolve_config
from cliptd.core.env import package_versions
from cliptd.core.errors import DataError, SweepError
from cliptd.core.invocation import prog
from cliptd.sweep.driver import TRIAL_KINDS, condition_name, trial_kind
from cliptd.sweep.plan import plan_resources, release_scale_request, run_jobs, scale_for
from cliptd.sweep.space import SpaceError, apply_sample, describe, load_space
from cliptd.tracking.table import (
    comparison_rows,
    paired_rows,
    qtype_metrics,
    to_csv,
    to_markdown,
)


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
    atomic_write(path, yaml.safe_dump(cfg, sort_keys=True))
    return path


def log_best_student(out: Path, sweep: str, condition: str, method: str, result: dict,
                     uri: str, experiment_id: str, parent: str) -> tuple[Path | None, str | None]:
    """The search's best student (its best trial's last checkpoint) exported as a
    transformers folder under ``out/best/`` and logged as an MLflow model of that trial's
    run, and listed among the sweep's parent run's outputs; once per sweep (a resumed sweep
    finds it logged). (None, None) when the best trial kept no checkpoint."""
    from cliptd.tracking import runs as tracking

    if result.get("checkpoint") is None:
        return None, None
    folder = out / "best" / f"{condition}-{method}-student"
    tag = f"cliptd.best_model.{condition}.{method}"
    c = tracking.client(uri)
    logged = tracking.patiently(lambda: c.get_run(parent).data.tags.get(tag),
                                "reading the sweep's parent run")
    if logged and folder.is_dir():
        return folder, logged
    from cliptd.training.checkpoint import export_finetuned

    export_finetuned(result["checkpoint"], folder)

    def log() -> str:
        from mlflow.entities import LoggedModelOutput

        model_name = tracking.model_name(f"{sweep}-{condition}-{method}-student")
        # safe to call again: a model logged by a call that then failed is found, not redone
        found = c.search_logged_models([experiment_id], max_results=1, filter_string=(
            f"name = '{model_name}' AND status = 'READY'"))
        if found:
            model_id = found[0].model_id
        else:
            run = c.search_runs([experiment_id], filter_string=(
                f"tags.`cliptd.trial_id` = '{result['best_trial']}'"), max_results=1)
            source = run[0].info.run_id if run else parent
            model_id = tracking.log_student(uri, source, folder, name=model_name,
                                            step=result["best_epoch"])
        c.log_outputs(parent, models=[LoggedModelOutput(model_id, step=result["best_epoch"])])
        c.set_tag(parent, tag, model_id)
        return model_id

    return folder, tracking.patiently(log, f"logging the best student of {condition}/{method}")


def override_conditions(space, shots: str | None, presets: str | None):
    """The space with ``--shots`` / ``--presets`` in place of its conditions, checked as a
    space file's are."""
    from cliptd.core.config import parse_shots
    from cliptd.data.subsets import DOMAIN_PRESETS

    new = {}
    if shots:
        new["shots"] = [s if s.startswith("k") else _as_number(s) for s in shots.split(",")]
        for s in new["shots"]:
            try:
                parse_shots(s)
            except ValueError as exc:
                raise SpaceError(f"--shots: {exc}") from None
    if presets:
        new["presets"] = presets.split(",")
        for p in new["presets"]:
            if p not in DOMAIN_PRESETS:
                raise SpaceError(f"--presets: unknown preset {p!r}; known: "
                                 f"{sorted(DOMAIN_PRESETS)}")
    return dataclasses.replace(space, **new)


def _as_number(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # parse_shots refuses it, naming it


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog("cliptd.tune"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--space", type=Path, help="search space YAML (default "
                        "the shipped cliptd/sweep/spaces/<task>.yaml)")
    parser.add_argument("--name", help="sweep name (default <task>-<budget>); reuse to resume")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--searcher-seed", type=int, default=0)
    parser.add_argument("--methods", help="comma-separated subset of the space's methods")
    parser.add_argument("--shots", help="comma-separated shot levels instead of the space's "
                        "(fractions in (0, 1] or k<N>), e.g. 0.01,0.05,1.0")
    parser.add_argument("--presets", help="comma-separated domain presets instead of the "
                        "space's (none, vcr-qtype, vqa-cp, synthetic)")
    parser.add_argument("--num-samples", type=positive_int, metavar="N",
                        help="trials per search (overrides the budget's num_samples)")
    parser.add_argument("--out", type=Path, help="local output folder (default runs/<name>)")
    add_data_args(parser)
    parser.add_argument("--trial-kind", choices=TRIAL_KINDS, default="auto",
                        help="light: a one-worker trial trains in its own Tune process; "
                        "train: every trial fits a Ray Train TorchTrainer; auto (default): "
                        "light for --workers 1, else train")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        space = load_space(args.space or args.task)
        if space.task != args.task:
            raise SpaceError(f"{space.path}: task: {space.task!r} but --task {args.task}")
        if args.shots or args.presets:  # conditions of one's own data, checked as the space's
            space = override_conditions(space, args.shots, args.presets)
        budget = space.budgets[args.budget]
        if args.num_samples is not None:  # recorded with the budget in the sweep's sweep.json
            budget = dataclasses.replace(budget, num_samples=args.num_samples)
        methods = args.methods.split(",") if args.methods else \
            (budget.methods or space.methods)
        for m in methods:
            if m not in space.methods:
                raise SpaceError(f"--methods: {m!r} is not in {space.path}'s methods")
        kind = trial_kind(args.trial_kind, args.workers)
    except (SpaceError, SweepError) as exc:
        die(str(exc))
    from cliptd.tracking import runs as tracking

    uri = reachable_tracking_uri(args)
    try:  # the user's own inputs refused before anything is written or started
        if args.data:
            base = user_run_config(args, needs_teacher=methods != ["none"])
        elif args.student or args.teacher or args.teacher_cache or args.tokenizer:
            raise ValueError("--student, --tokenizer, --teacher and --teacher-cache go with "
                             "--data (without it the embedded world brings its own)")
    except (ValueError, DataError, FileNotFoundError) as exc:
        die(str(exc))
    name = sweep_name(args)
    out = (args.out or Path("runs") / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.storage_path = resolve_storage(args.storage_path)
    try:
        if not args.data:
            from cliptd.embedded.world import eval_words

            world, caches = setup_embedded(args, (args.task,))
            base = {"task": args.task, "data": str(world.data[args.task]),
                    "student": str(world.student), "teacher_cache": str(caches[args.task]),
                    "eval_words": eval_words()}
    except (ValueError, DataError, FileNotFoundError) as exc:
        die(str(exc))
    init_ray(args)
    # after Ray's start, so that its workers keep MLflow's defaults until they call it too
    tracking.fail_fast(timeout_s=30)
    try:
        resources = plan_resources(args, budget)
        # GPU nodes at zero on an autoscaling cluster: ask for them, wait for one trial's
        scale_for(resources, timeout_s=float(os.environ.get("CLIPTD_SCALE_TIMEOUT_S", 1800)))
    except SweepError as exc:
        die(str(exc))
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
            "searcher_seed": args.searcher_seed, "versions": versions, "epochs": budget.epochs,
            "trial_kind": kind}
    c = tracking.client(uri)
    tracking.patiently(lambda: c.log_dict(parent, {
        "space": str(space.path), "budget": vars(budget), "resources": resources,
        "versions": versions, "base": base, "args": {
            k: str(v) for k, v in vars(args).items()}}, "sweep.json"), "logging sweep.json")
    print(f"[cliptd] sweep {name}: {len(space.conditions())} condition(s) × {len(methods)} "
          f"method(s), {budget.num_samples} trials each, then {budget.seeds} seed(s); "
          f"{resources['concurrency']} trial(s) at once, {args.workers} worker(s) each "
          f"({kind} trials)")
    study_url = f"sqlite:///{out / 'optuna.db'}"  # every search's Optuna study
    jobs = []
    for shots, preset in space.conditions():
        condition = condition_name(shots, preset)
        cbase = {**base, **space.fixed, "shots": shots, "preset": preset,
                 "epochs": budget.epochs, "min_steps": budget.min_steps,
                 "eval_limit": budget.eval_limit, "patience": budget.patience,
                 "patience_after": budget.patience_after,
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
        student, model_id = log_best_student(out, name, condition, method, result, uri,
                                             experiment_id, parent)
        summary.append({"condition": condition, "method": method, "best": best_path,
                        "trials": result["trials"], "sample": result["sample"],
                        "student": student, "model_id": model_id})
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
    try:
        run_jobs(jobs, resources, on_done)
    except SweepError as exc:
        die(str(exc))
    finally:
        release_scale_request(resources)
    order = {(j["condition"], j["method"]): i for i, j in enumerate(jobs)}
    summary.sort(key=lambda s: order[(s["condition"], s["method"])])
    primary = PRIMARY_METRIC[args.task]
    metric_rows = {f"in-domain {primary}": f"val/id/{primary}",
                   f"shifted {primary}": f"val/shift/{primary}"}
    if args.task == "vcr":
        metric_rows |= {"in-domain qa_r": "val/id/qa_r", "in-domain q_ar": "val/id/q_ar"}
    rows = comparison_rows(records, metric_rows)
    paired = paired_rows(records, {**metric_rows, **qtype_metrics(records, primary)})
    md, paired_md = to_markdown(rows), to_markdown(paired)
    files = [atomic_write(out / "comparison.md", md),
             atomic_write(out / "comparison.csv", to_csv(rows)),
             atomic_write(out / "paired.md", paired_md),
             atomic_write(out / "paired.csv", to_csv(paired))]

    def close_parent() -> None:
        for f in files:
            c.log_artifact(parent, str(f))
        c.set_terminated(parent, status="FINISHED")

    tracking.patiently(close_parent, "closing the sweep's parent run")
    print("\n== Trials (search) ==")
    for s in summary:
        knobs = ", ".join(f"{k}={describe(v)}" for k, v in sorted(s["sample"].items()))
        print(f"{s['condition']:<24} {s['method']:<13} trials={s['trials']}  best: {knobs}")
        print(f"{'':<32}replay: python -m cliptd.train --task {args.task} --config {s['best']}")
        if s["student"]:
            print(f"{'':<32}student: {s['student']}  (MLflow logged model {s['model_id']})")
    print(f"\n== Comparison over {budget.seeds} seed(s) (mean ± std, %) ==")
    print(md)
    print("== Paired by seed: method − none, points (mean ± std, seeds ahead / pairs) ==")
    print(paired_md)
    print(f"MLflow: {tracking.ui_command(uri, experiment_id)}   (experiment cliptd-{args.task}, "
          f"parent run {parent})")
    print(f"Optuna: optuna-dashboard {study_url} --host 127.0.0.1")
    print(f"Outputs: {out}   wall time {time.time() - start:.0f} s")
    (out / "summary.json").write_text(json.dumps(
        {"summary": [{**s, "best": str(s["best"]), "student": str(s["student"] or "")}
                     for s in summary],
         "seconds": time.time() - start}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
