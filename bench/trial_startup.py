"""Launch → first training step of 2 tiny Tune trials started together (each a 1-worker
TorchTrainer): the fixed cost Ray adds to every trial, with almost no training in it.

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

from cliptd.cli import init_ray, setup_embedded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    out = parser.parse_args().out
    args = SimpleNamespace(task="vcr", budget="full", cache=None, address=None)
    world, caches = setup_embedded(args, ("vcr",))
    base = {"task": "vcr", "data": str(world.data["vcr"]), "student": str(world.student),
            "teacher_cache": str(caches["vcr"]), "preset": "synthetic", "epochs": 2,
            "min_steps": 4, "shots": 0.01, "eval_limit": 20, "threads": 1,
            "distill": {"method": "cliptd"}}
    init_ray(args)
    from ray import tune

    from cliptd.tune import train_driver_fn

    storage = str(Path("runs/bench").resolve())
    meta = {"sweep_id": "startup", "tracking_uri": None, "storage_path": storage,
            "workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 0.8, "max_failures": 0,
            "base": base, "condition": "startup", "phase": "bench", "searcher_seed": 0,
            "versions": {}}
    launch = time.time()
    grid = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_driver_fn, meta=meta), {"CPU": 0.2}),
        param_space={"seed": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name=f"startup-{int(launch)}", storage_path=storage,
                                  verbose=0)).fit()
    first = []
    for r in grid:
        df = r.metrics_dataframe
        first_step = float(df["timestamp"].min() - launch - df["train/seconds"].iloc[0]
                           - df["time/eval_s"].iloc[0])
        first.append(first_step)
        print(f"trial {r.config['seed']}: launch → first training step {first_step:.1f} s "
              f"(loop set-up {df['time/setup_s'].iloc[0]:.1f} s)")
    print(f"both trials done in {time.time() - launch:.1f} s")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"first_step_s": first}, indent=2))


if __name__ == "__main__":
    main()
