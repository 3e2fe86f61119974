"""Benchmarks that print figures measured side by side in one run (ratios, not timed tests).

    python -m cliptd.bench step                  # cliptd vs none step cost, cached vs live teacher
    python -m cliptd.bench science --shots 0.05 --seeds 3     # none / naive / cliptd on VCR
    python -m cliptd.bench science --shots 0.05,0.25,1.0 --seeds 5 --out bench/results/x.json
    python -m cliptd.bench ray --epochs 2        # Ray's cost per trial: light vs TorchTrainer
                                                 # trials vs the plain loop; 1 vs 2 workers
    python -m cliptd.bench probe                 # what teacher and student know, per domain

Both use the embedded synthetic world (built on first use) and the same training loop as
Ray Train (``cliptd.training.loop.train_loop``), run in this process so that only the method
differs between the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cliptd.cli.common import add_common_args, setup_embedded
from cliptd.core.atomic import atomic_write
from cliptd.core.config import PRIMARY_METRIC, resolve_config
from cliptd.core.invocation import prog
from cliptd.embedded.world import eval_words
from cliptd.tracking.table import comparison_rows, paired_rows, qtype_metrics, to_markdown
from cliptd.training.loop import train_loop
from cliptd.training.run import build_run
from cliptd.training.runtime import LocalRuntime


def _time_interleaved(runs: dict, batch, steps: int) -> dict[str, float]:
    """Median step time (forward, backward, AdamW step) per method, the methods' steps
    interleaved so that a noisy machine slows them alike."""
    opts = {m: torch.optim.AdamW(p.task.parameters(), lr=1e-4) for m, p in runs.items()}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for i in range(steps + 2):
        for method, parts in runs.items():
            parts.task.train()
            t = time.perf_counter()
            loss, _ = parts.task(batch, progress=0.5)
            opts[method].zero_grad(set_to_none=True)
            loss.backward()
            opts[method].step()
            if i >= 2:  # the first steps warm up allocators and kernels
                times[method].append(time.perf_counter() - t)
    return {m: statistics.median(v) for m, v in times.items()}


def bench_step(base: dict, teacher_spec, steps: int, batch_size: int) -> dict:
    """Median step time of cliptd (cached teacher) vs none on the same student and batch,
    and of cliptd with the teacher computing its targets live beside the student."""
    from cliptd.teacher.cache import compute_targets, targets_as_cache_rows
    from cliptd.teacher.clip import Teacher

    out = {}
    parts = {}
    for method in ("none", "cliptd"):
        torch.manual_seed(0)
        cfg = resolve_config({**base, "distill": {"method": method}, "batch_size": batch_size})
        parts[method] = build_run(cfg)
    problems = parts["cliptd"].train[:batch_size]
    batch = parts["cliptd"].collate_train(problems)
    medians = _time_interleaved(parts, batch, steps)
    out["none_s"], out["cliptd_cached_s"] = medians["none"], medians["cliptd"]
    teacher = Teacher.load(teacher_spec)
    collate = parts["cliptd"].collate_train
    live_times = []
    opt = torch.optim.AdamW(parts["cliptd"].task.parameters(), lr=1e-4)
    for _ in range(max(3, steps // 2)):
        t = time.perf_counter()
        collate.teacher = targets_as_cache_rows(compute_targets(teacher, base["task"], problems))
        live_batch = collate(problems)
        loss, _ = parts["cliptd"].task(live_batch, progress=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        live_times.append(time.perf_counter() - t)
    out["cliptd_live_teacher_s"] = statistics.median(live_times)
    out["ratio_cached_vs_none"] = out["cliptd_cached_s"] / out["none_s"]
    out["ratio_live_vs_none"] = out["cliptd_live_teacher_s"] / out["none_s"]
    out["batch_size"] = batch_size
    return out


def bench_science(base: dict, shots: list, seeds: int, methods: list[str], epochs: int,
                  extra: dict, partial: Path | None = None, first_seed: int = 0) -> list[dict]:
    """Every (shots, seed, method) run; seeds outermost within a shot level, so a run cut
    short still holds whole seeds of every method. ``partial``: the records so far are
    rewritten there (atomically) after each run."""
    records = []
    for s in shots:
        for seed in range(first_seed, first_seed + seeds):
            for method in methods:
                cfg = resolve_config({**base, **extra, "shots": s, "seed": seed,
                                      "subset_seed": seed, "epochs": epochs,
                                      "distill": {**extra.get("distill", {}), "method": method}})
                rt = LocalRuntime()
                t = time.time()
                train_loop(cfg, rt)
                final = rt.history[-1]
                records.append({"condition": f"shots={s}", "method": method, "seed": seed,
                                "metrics": final, "seconds": time.time() - t})
                primary = PRIMARY_METRIC[cfg["task"]]
                print(f"shots={s} {method:<13} seed={seed}  in-domain {primary}="
                      f"{final['score']:.3f}  shifted {primary}="
                      f"{final.get(f'val/shift/{primary}', float('nan')):.3f}  "
                      f"steps={final['step']} epochs={final['epoch']}  "
                      f"({time.time() - t:.0f} s)", flush=True)
                if partial:
                    atomic_write(partial, json.dumps({"records": records}, indent=1,
                                                     default=str))
    return records


def _bench_tuner(cfg: dict, storage: str, name: str, kind: str, seeds: list[int],
                 cpus_per_worker: float, tune_config):
    """Trials of ``cfg``, one per seed, through the sweep's own trial function, resources
    and run options → (result grid, launch time)."""
    from ray import tune

    from cliptd.sweep.driver import train_driver_fn, trial_resources, tune_run_options

    meta = {"sweep_id": name, "tracking_uri": None, "storage_path": storage, "workers": 1,
            "gpus_per_worker": 0, "cpus_per_worker": cpus_per_worker, "max_failures": 0,
            "base": cfg, "condition": name, "phase": "bench", "searcher_seed": 0,
            "versions": {}, "trial_kind": kind}
    trainable = tune.with_resources(tune.with_parameters(train_driver_fn, meta=meta),
                                    trial_resources(meta, {"CPU": 0.2}))
    trainable.__name__ = f"train_driver_fn_{name}"
    launch = time.time()
    grid = tune.Tuner(
        trainable, param_space={"seed": tune.grid_search(seeds)}, tune_config=tune_config,
        run_config=tune.RunConfig(name=f"{name}-{int(launch)}", storage_path=storage,
                                  verbose=0, **tune_run_options(meta))).fit()
    return grid, launch


def two_concurrent_trials(cfg: dict, storage: str, name: str, kind: str = "train"):
    """Two Tune trials of ``cfg`` (seeds 0 and 1) started together as ``kind`` trials
    (``light``: the loop in the trial's process; ``train``: a 1-worker TorchTrainer) →
    (result grid, launch time)."""
    from ray import tune

    return _bench_tuner(cfg, storage, name, kind, [0, 1], 0.8,
                        tune.TuneConfig(max_concurrent_trials=2))


def sequential_trials(cfg: dict, storage: str, name: str, reuse: bool, n: int = 3):
    """``n`` light trials of ``cfg`` (seeds 0..n-1) one after another on one slot, their
    actor reused between trials or not → the result grid, in trial order."""
    from ray import tune

    grid, _ = _bench_tuner(cfg, storage, name, "light", list(range(n)), 1,
                           tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse))
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"a sequential trial failed: {errors[0]}")
    return sorted(grid, key=lambda r: r.metrics["config"]["seed"])


def start_costs(grid) -> list[float]:
    """For each trial after the first: the seconds from the previous trial's last result to
    its own first, less its first epoch's training and evaluation — what starting a trial
    costs in a long sweep (actor start or reset, imports, data and model set-up)."""
    frames = [r.metrics_dataframe.sort_values("epoch") for r in grid]
    return [float(f["timestamp"].iloc[0] - prev["timestamp"].iloc[-1]
                  - f["train/seconds"].iloc[0] - f["time/eval_s"].iloc[0])
            for prev, f in zip(frames, frames[1:], strict=False)]


def first_step_s(df, launch: float) -> float:
    """Launch → the first training step: the first result minus its epoch's training and
    evaluation time (a trial's metrics dataframe; Tune's timestamps are whole seconds)."""
    return float(df["timestamp"].min() - launch - df["train/seconds"].iloc[0]
                 - df["time/eval_s"].iloc[0])


def plain_trial(cfg_path: str, out_path: str) -> None:
    """The loop as a plain PyTorch script: no Ray, this process, one worker (the loop still
    writes its checkpoint each epoch, as in a trial). Writes each epoch's metrics with the
    wall-clock time of its report."""
    class Timed(LocalRuntime):
        def report(self, metrics, folder, epoch, unit="epoch"):
            super().report({**metrics, "timestamp": time.time()}, folder, epoch, unit)

    rt = Timed()
    train_loop(json.loads(Path(cfg_path).read_text()), rt)
    Path(out_path).write_text(json.dumps(rt.history, default=str))


def two_concurrent_plain_loops(cfg: dict, folder: Path) -> list[tuple[list[dict], float]]:
    """The same two runs (seeds 0 and 1) as plain scripts started together, each its own
    Python process (interpreter, imports and all) → [(epoch metrics, launch time)]."""
    import os
    import subprocess
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    procs = []
    for seed in (0, 1):
        cfg_path, out = folder / f"plain-{seed}.json", folder / f"plain-{seed}.out.json"
        cfg_path.write_text(json.dumps({**cfg, "seed": seed}))
        out.unlink(missing_ok=True)
        code = f"from cliptd.bench import plain_trial; plain_trial({str(cfg_path)!r}, " \
               f"{str(out)!r})"
        procs.append((subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ)),
                      out, time.time()))
    runs = []
    for proc, out, launch in procs:
        if proc.wait(timeout=3600) != 0:
            raise RuntimeError(f"the plain loop exited with {proc.returncode}")
        runs.append((json.loads(out.read_text()), launch))
    return runs


def _trial_figures(rows: list[dict], launch: float) -> dict:
    """One trial's (or plain run's) figures from its per-epoch results."""
    import pandas as pd

    df = pd.DataFrame(rows)
    wall = float(df["timestamp"].max() - launch)
    parts = {"train_s": float(df["train/seconds"].sum()),
             "eval_s": float(df["time/eval_s"].sum()),
             "setup_s": float(df["time/setup_s"].dropna().sum())}
    return {"wall_s": wall, **parts,
            "first_result_s": float(df["timestamp"].min() - launch),
            # launch → the first training step: the fixed cost of starting a trial
            "first_step_s": first_step_s(df, launch),
            # what is left beyond the loop's own parts: for a trial, Ray's (processes,
            # worker-group start-up, imports, reporting, checkpoint upload); for the plain
            # loop, the interpreter's start, its imports and the checkpoint writes
            "other_s": wall - sum(parts.values()),
            "train_share": parts["train_s"] / wall,
            "loop_share": (parts["train_s"] + parts["eval_s"]) / wall}


def _summary(trials: list[dict]) -> dict:
    return {"trials": trials,
            **{f"{k}_mean": float(np.mean([t[k] for t in trials]))
               for k in ("wall_s", "train_s", "eval_s", "setup_s", "other_s", "first_step_s",
                         "train_share", "loop_share")},
            "first_result_s": min(t["first_result_s"] for t in trials)}


def bench_ray(base: dict, args) -> dict:
    """Ray's overhead, side by side in one run: 2 concurrent Tune trials of each kind
    (``train``: a 1-worker TorchTrainer; ``light``: the loop in the trial's own process), and
    the same two runs as plain PyTorch scripts without Ray — the share of each trial's wall
    time spent in training steps, Ray's seconds per trial, launch → first step and → first
    result, and trial ÷ plain loop; then the same run on 1 and on 2 Ray Train workers
    (throughput ratio; ``--no-scaling`` skips it)."""
    import resource

    import ray

    from cliptd.cli.common import init_ray
    from cliptd.training.launch import make_trainer

    init_ray(args)
    storage = str((Path(args.storage_path) / "bench").resolve())
    # a trial as a sweep runs it: epochs before the last evaluate on a fixed sample
    cfg = resolve_config({**base, "epochs": args.epochs, "distill": {"method": "cliptd"},
                          "shots": 0.25, "threads": 1, "eval_limit": 200})
    out: dict = {"concurrent_trials": 2, "epochs": args.epochs}
    for kind in args.kinds.split(","):
        if kind == "plain":
            runs = two_concurrent_plain_loops(cfg, Path(storage) / "plain")
            out["plain"] = _summary([_trial_figures(rows, launch) for rows, launch in runs])
        else:
            grid, launch = two_concurrent_trials(cfg, storage, f"ray-overhead-{kind}", kind)
            errors = [r.error for r in grid if r.error is not None]
            if errors:
                raise RuntimeError(f"a {kind} trial failed: {errors[0]}")
            out[kind] = _summary([_trial_figures(r.metrics_dataframe.to_dict("records"),
                                                 launch) for r in grid])
        print(f"[bench] {kind}: trial wall {out[kind]['wall_s_mean']:.1f} s", flush=True)
    if "plain" in out:
        for kind in ("light", "train"):
            if kind in out:
                k, plain = out[kind], out["plain"]
                k["vs_plain"] = k["wall_s_mean"] / plain["wall_s_mean"]
                # the same, robust to a machine whose load changes between the runs: this
                # trial's own loop seconds (measured beside its fixed costs) with the plain
                # script's fixed costs instead of its own
                k["vs_plain_same_loop"] = k["wall_s_mean"] / (
                    k["wall_s_mean"] - k["other_s_mean"] + plain["other_s_mean"])
                # Ray's own seconds: a trial's time beyond the loop's parts, less the plain
                # script's (its interpreter, imports and checkpoint writes)
                k["ray_s_mean"] = k["other_s_mean"] - plain["other_s_mean"]
    if args.sequence:
        # light trials one after another, as a long sweep runs them: one epoch each on 5 %,
        # scored on the fixed sample (what matters here is the start of each trial)
        seq_cfg = {**cfg, "epochs": 1, "shots": 0.05, "eval_split": None}
        out["sequence"] = {"trials": args.sequence}
        for reuse in (False, True):
            grid = sequential_trials(seq_cfg, storage, f"ray-seq-reuse{int(reuse)}", reuse,
                                     args.sequence)
            costs = start_costs(grid)
            out["sequence"]["reused" if reuse else "fresh"] = {
                "start_s": costs, "start_s_mean": float(np.mean(costs)),
                "pids": len({r.metrics["pid"] for r in grid})}
            print(f"[bench] sequence, actors {'reused' if reuse else 'fresh'}: start "
                  f"{np.mean(costs):.1f} s per trial", flush=True)
    if not args.no_scaling:
        speeds = {}
        for workers in (1, 2):
            res = make_trainer({**cfg, "epochs": 1}, name=f"scale-{workers}-{int(time.time())}",
                               storage_path=storage, workers=workers,
                               cpus_per_worker=2 / workers).fit()
            speeds[workers] = res.metrics["train/samples_per_s"]
        out["samples_per_s"] = speeds
        out["throughput_2_vs_1_workers"] = speeds[2] / speeds[1]
    out["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["children_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    ray.shutdown()
    return out


def ray_table(res: dict) -> str:
    """The side-by-side table ``bench ray`` prints (markdown)."""
    kinds = [k for k in ("light", "train", "plain") if k in res]
    label = {"light": "light trial (loop in the Tune trial)",
             "train": "train trial (1-worker TorchTrainer)", "plain": "plain PyTorch script"}
    rows = [("trial wall time, s (mean of 2)", "wall_s_mean", "{:.1f}"),
            ("training-step share", "train_share_mean", "{:.0%}"),
            ("training + evaluation share", "loop_share_mean", "{:.0%}"),
            ("training / evaluation / set-up, s", None, None),
            ("beyond the loop's parts, s", "other_s_mean", "{:.1f}"),
            ("Ray's seconds per trial (beyond the loop, less plain's)", "ray_s_mean", "{:.1f}"),
            ("launch → first training step, s", "first_step_s_mean", "{:.1f}"),
            ("launch → first result, s (first of 2)", "first_result_s", "{:.1f}"),
            ("trial ÷ plain loop", "vs_plain", "{:.2f}"),
            ("trial ÷ plain loop, the trial's own loop seconds", "vs_plain_same_loop",
             "{:.2f}")]
    lines = ["| | " + " | ".join(label[k] for k in kinds) + " |",
             "| --- |" + " --- |" * len(kinds)]
    for name, key, fmt in rows:
        cells = []
        for k in kinds:
            r = res[k]
            if key is None:
                cells.append(f"{r['train_s_mean']:.1f} / {r['eval_s_mean']:.1f} / "
                             f"{r['setup_s_mean']:.1f}")
            else:
                cells.append(fmt.format(r[key]) if key in r else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _setup_world(args):
    """The embedded world of ``--budget``, with ``--world-steps`` pre-training steps when
    given (its own cache entries: a timing benchmark need not wait for a long pre-training)."""
    if args.world_steps is None:
        return setup_embedded(args, (args.task,))
    from dataclasses import replace

    from cliptd.cli.common import world_config
    from cliptd.core.config import TASKS
    from cliptd.embedded.world import default_cache_dir, ensure_world

    wc = world_config(args)
    wc = replace(wc, teacher=replace(wc.teacher, steps=args.world_steps),
                 student_steps=args.world_steps)
    world = ensure_world(args.cache or default_cache_dir(), wc, tasks=TASKS,
                         caches_for=(args.task,))
    return world, world.teacher_caches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog("cliptd.bench"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("step", "science", "ray", "probe"))
    add_common_args(parser)
    parser.set_defaults(budget="full")  # the benchmarks' world: full size, longer pre-training
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shots", default="0.05")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed .. first-seed + seeds - 1 (extend a run)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--min-steps", type=int, default=150,
                        help="low-shot runs train at least this many steps")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--methods", default="none,naive,cliptd")
    parser.add_argument("--config", type=Path, help="YAML of extra run-config values "
                        "(e.g. a sweep's best distill knobs)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--images", type=int, default=600,
                        help="probe: corpus images to probe (70 %% fit, 30 %% scored)")
    parser.add_argument("--kinds", default="light,train,plain",
                        help="ray: which runs to time, in this order (light, train, plain)")
    parser.add_argument("--no-scaling", action="store_true",
                        help="ray: skip the 1 vs 2 Ray Train workers run")
    parser.add_argument("--sequence", type=int, default=3, metavar="N",
                        help="ray: also N light trials one after another on one slot, actors "
                        "fresh vs reused: what starting a trial costs in a long sweep (0: skip)")
    parser.add_argument("--world-steps", type=int, default=None,
                        help="pre-training steps of the world's teacher and student (default: "
                        "the budget's). Timing benchmarks only: the step cost does not "
                        "depend on how long the models were pre-trained")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    world, caches = _setup_world(args)
    base = {"task": args.task, "data": str(world.data[args.task]),
            "student": str(world.student), "teacher_cache": str(caches[args.task]),
            "preset": "synthetic",
            "eval_words": eval_words()}
    if args.what == "probe":
        from cliptd.embedded import probe

        res = {"probes": probe.probes(world, args.images), "zero_shot": probe.zero_shot(world)}
        print(probe.to_markdown(res["probes"], res["zero_shot"]))
    elif args.what == "ray":
        res = bench_ray(base, args)
        print(json.dumps(res, indent=2))
        print(f"\n2 concurrent runs of each kind, {args.epochs} epochs, 25 % VCR "
              f"(Tune timestamps are whole seconds):\n")
        print(ray_table(res))
        if "sequence" in res:
            q = res["sequence"]
            print(f"\n{q['trials']} light trials one after another (1 epoch, 5 % VCR): "
                  f"starting each after the first costs {q['fresh']['start_s_mean']:.1f} s "
                  f"with a fresh actor, {q['reused']['start_s_mean']:.1f} s with the actor "
                  f"reused ({q['reused']['pids']} process(es) for {q['trials']} trials)")
        if "throughput_2_vs_1_workers" in res:
            print(f"\n2 vs 1 Ray Train workers throughput "
                  f"{res['throughput_2_vs_1_workers']:.2f}x")
    elif args.what == "step":
        res = bench_step(base, world.teacher, args.steps, args.batch_size)
        print(json.dumps(res, indent=2))
        print(f"\ncliptd step / none step (teacher cached): {res['ratio_cached_vs_none']:.3f}x")
        print(f"cliptd step / none step (teacher live):   {res['ratio_live_vs_none']:.3f}x")
    else:
        import yaml

        extra = yaml.safe_load(args.config.read_text()) if args.config else {}
        shots = [s if s.startswith("k") else float(s) for s in args.shots.split(",")]
        extra = {"min_steps": args.min_steps, "lr": args.lr, **(extra or {})}
        partial = args.out.with_suffix(".partial.json") if args.out else None
        if partial:
            partial.parent.mkdir(parents=True, exist_ok=True)
        records = bench_science(base, shots, args.seeds, args.methods.split(","), args.epochs,
                                extra, partial, args.first_seed)
        primary = PRIMARY_METRIC[args.task]
        metrics = {f"in-domain {primary}": f"val/id/{primary}",
                   f"shifted {primary}": f"val/shift/{primary}",
                   **qtype_metrics(records, primary)}
        rows = comparison_rows(records, metrics)
        print(to_markdown(rows))
        paired = paired_rows(records, metrics)
        print("Paired by seed: method − none, points (mean ± std, seeds ahead / pairs)")
        print(to_markdown(paired))
        res = {"records": records, "rows": rows, "paired": paired, "student": str(world.student),
               "student_pretrain": json.loads((world.student / "student_config.json")
                                              .read_text()).get("pretrain"),
               "extra_config": extra}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, default=str))
        args.out.with_suffix(".partial.json").unlink(missing_ok=True)  # superseded
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
