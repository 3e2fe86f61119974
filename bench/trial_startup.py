"""Launch → first training step of 2 tiny Tune trials started together, for both kinds of
trial (light: the loop in the Tune trial; train: a 1-worker TorchTrainer): the fixed cost
Ray adds to every trial, with almost no training in it.

    .venv/bin/python bench/trial_startup.py
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 .venv/bin/python bench/trial_startup.py

Uses the benchmarks' embedded world (``--budget full``, built on first use). Prints, per
trial, seconds from ``Tuner.fit()`` to the first training step (first result minus its
epoch's training and evaluation time) and the loop's own set-up (data, model, cache).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

from cliptd.cli.common import init_ray, setup_embedded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--kinds", default="light,train")
    parser.add_argument("--budget", default="full")
    cli = parser.parse_args()
    out = cli.out
    args = SimpleNamespace(task="vcr", budget=cli.budget, cache=None, address=None)
    world, caches = setup_embedded(args, ("vcr",))
    base = {"task": "vcr", "data": str(world.data["vcr"]), "student": str(world.student),
            "teacher_cache": str(caches["vcr"]), "preset": "synthetic", "epochs": 2,
            "min_steps": 4, "shots": 0.01, "eval_limit": 20, "threads": 1,
            "distill": {"method": "cliptd"}}
    init_ray(args)
    from cliptd.bench import first_step_s, two_concurrent_trials

    figures = {}
    for kind in cli.kinds.split(","):
        grid, launch = two_concurrent_trials(base, str(Path("runs/bench").resolve()),
                                             f"startup-{kind}", kind)
        first = []
        for r in grid:
            if r.error is not None:
                raise SystemExit(f"a {kind} trial failed: {r.error}")
            df = r.metrics_dataframe
            first_step = first_step_s(df, launch)
            first.append(first_step)
            print(f"{kind} trial {r.config['seed']}: launch → first training step "
                  f"{first_step:.1f} s (loop set-up {df['time/setup_s'].iloc[0]:.1f} s)")
        print(f"both {kind} trials done in {time.time() - launch:.1f} s")
        figures[kind] = {"first_step_s": first}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2))

if __name__ == "__main__":
    main()
