"""One fine-tuning run on Ray Train — the same code path a Tune trial takes.

    python -m cliptd.train --task vcr --method cliptd --shots 0.05
    python -m cliptd.train --task vcr --config runs/best/vcr-synthetic-0.05-cliptd.yaml
    python -m cliptd.train --task snli_ve --method none --workers 2

With no ``--data`` it runs on the embedded synthetic world (built and cached on first use).
``train_fn_per_worker`` is the whole loop: data-parallel (gloo on CPU, NCCL on GPU), bf16
autocast on GPU, gradient accumulation, one self-describing checkpoint per epoch, exact
resume from the latest one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cliptd.core.config import METHODS, resolve_config
from cliptd.core.errors import DataError
from cliptd.core.invocation import prog
from cliptd.training.checkpoint import export_best
from cliptd.training.launch import make_trainer


def embedded_run_config(task: str, world, teacher_cache: Path | None) -> dict:
    return {"task": task, "data": str(world.data[task]), "student": str(world.student),
            "teacher_cache": str(teacher_cache) if teacher_cache else None,
            "preset": "synthetic"}


def main(argv=None) -> int:
    from cliptd.cli.common import add_common_args, die, init_ray, resolve_storage, setup_embedded

    parser = argparse.ArgumentParser(prog=prog("cliptd.train"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, max_failures=2)
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--shots", default=None, help="fraction in (0, 1] or k<N>")
    parser.add_argument("--config", type=Path, help="a YAML config (e.g. a sweep's best)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--name", help="run name; the same name resumes")
    parser.add_argument("--export", type=Path, help="export the best student here")
    args = parser.parse_args(argv)
    try:
        import yaml

        overrides = yaml.safe_load(args.config.read_text()) if args.config else {}
        if overrides is not None and not isinstance(overrides, dict):
            raise ValueError(f"{args.config}: expected a mapping of config keys")
        overrides = dict(overrides or {})
        overrides.pop("tracking", None)
        overrides["task"] = args.task
        if args.method:
            overrides.setdefault("distill", {})["method"] = args.method
        for key in ("shots", "epochs", "seed"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        resolve_config(overrides)  # refuse bad input before building anything
        if not overrides.get("data"):
            world, cache = setup_embedded(args, (args.task,))
            overrides = {**embedded_run_config(args.task, world, cache[args.task]), **overrides}
        cfg = resolve_config(overrides)
    except (ValueError, DataError, FileNotFoundError) as exc:
        die(str(exc))
    init_ray(args)
    name = args.name or f"train-{args.task}-{cfg['distill']['method']}-{cfg['shots']}-s{cfg['seed']}"
    trainer = make_trainer(cfg, name=name, storage_path=resolve_storage(args.storage_path),
                           workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker or 1,
                           max_failures=args.max_failures)
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        die(f"training failed after {args.max_failures} restart(s): "
            f"{str(exc).splitlines()[0]} (logs and checkpoints: {args.storage_path}/{name}; "
            f"rerun the same command to resume)", code=1)
    metrics = {k: v for k, v in result.metrics.items() if k.startswith("val/") and
               "/qtype/" not in k}
    print(json.dumps({"name": name, "epoch": result.metrics.get("epoch"), **metrics}, indent=2))
    if args.export:
        print(f"exported student: {export_best(result, args.export)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
