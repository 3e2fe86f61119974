"""One fine-tuning run on Ray Train — the same code path a Tune trial takes.

    python -m cliptd.train --task vcr --method cliptd --shots 0.05
    python -m cliptd.train --task vcr --config runs/best/vcr-synthetic-0.05-cliptd.yaml
    python -m cliptd.train --task snli_ve --method none --workers 2

With no ``--data`` it runs on the embedded synthetic world (built and cached on first use);
``--data PREPARED --student FOLDER --teacher MODEL[:PRETRAINED]`` runs on your own. Every
run is an MLflow run (experiment ``cliptd-<task>``): params, per-epoch metrics, the resolved
config, the dataset, the source commit and the exported student as its logged model.
``train_fn_per_worker`` is the whole loop: data-parallel (gloo on CPU, NCCL on GPU), bf16
autocast on GPU, gradient accumulation, one self-describing checkpoint per epoch, exact
resume from the latest one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
    from cliptd.cli.common import (
        add_common_args,
        add_data_args,
        die,
        init_ray,
        reachable_tracking_uri,
        resolve_storage,
        setup_embedded,
        user_run_config,
    )

    parser = argparse.ArgumentParser(prog=prog("cliptd.train"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, max_failures=2)
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--shots", default=None, help="fraction in (0, 1] or k<N>")
    parser.add_argument("--config", type=Path, help="a YAML config (e.g. a sweep's best)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--name", help="run name; the same name resumes (its MLflow run too)")
    parser.add_argument("--export", type=Path, help="export the best student here (default: "
                        "<storage>/<name>/student); it is also the MLflow run's logged model")
    add_data_args(parser)
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
        checked = resolve_config(overrides)  # refuse bad input before building anything
    except (ValueError, DataError, FileNotFoundError) as exc:
        die(str(exc))
    uri = reachable_tracking_uri(args)
    try:
        if args.data:
            needs = checked["distill"]["lam"] > 0 or checked["distill"]["method"] == \
                "clip_features"
            overrides.update(user_run_config(args, needs_teacher=needs))
        elif not overrides.get("data"):
            world, cache = setup_embedded(args, (args.task,))
            overrides = {**embedded_run_config(args.task, world, cache[args.task]), **overrides}
        cfg = resolve_config(overrides)
    except (ValueError, DataError, FileNotFoundError) as exc:
        die(str(exc))
    name = args.name or (f"train-{args.task}-{cfg['distill']['method']}-{cfg['shots']}-"
                         f"s{cfg['seed']}-{time.strftime('%Y%m%d-%H%M%S')}")
    storage = resolve_storage(args.storage_path)
    run_id = open_run(uri, name, cfg)
    cfg["tracking"] = {"uri": uri, "run_id": run_id}
    init_ray(args)
    trainer = make_trainer(cfg, name=name, storage_path=storage, workers=args.workers,
                           gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker or 1,
                           max_failures=args.max_failures)
    from ray.train import TrainingFailedError

    from cliptd.tracking import runs as tracking

    c = tracking.client(uri)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        c.set_terminated(run_id, status="FAILED")
        die(f"training failed after {args.max_failures} restart(s): "
            f"{str(exc).splitlines()[0]} (logs and checkpoints: {storage}/{name}; "
            f"rerun with --name {name} to resume)", code=1)
    # what Train's controller could not send before the run ended, and any epoch
    # only Ray recorded, before the run is closed
    tracking.replay_buffer(uri, run_id)
    tracking.backfill(uri, run_id, result.metrics_dataframe.to_dict("records")
                      if result.metrics_dataframe is not None else [])
    export = args.export or (Path(storage) / name / "student" if "://" not in storage else None)
    if export is not None:
        export_best(result, export)
        model_id = tracking.log_student(uri, run_id, export, name=f"{name}-student",
                                        step=int(result.metrics.get("epoch", 0)))
        print(f"exported student: {export} (MLflow logged model {model_id})")
    c.set_terminated(run_id, status="FINISHED")
    metrics = {k: v for k, v in result.metrics.items() if k.startswith("val/") and
               "/qtype/" not in k}
    print(json.dumps({"name": name, "mlflow_run_id": run_id,
                      "epoch": result.metrics.get("epoch"), **metrics}, indent=2))
    experiment = c.get_run(run_id).info.experiment_id
    print(f"MLflow: {tracking.ui_command(uri, experiment)}   (experiment cliptd-{args.task}, "
          f"run {run_id})")
    return 0


def open_run(uri: str, name: str, cfg: dict) -> str:
    """The run's MLflow record, found again by name when a run is resumed: params (the
    resolved config, seeds, package versions), tags, the resolved config as an artifact,
    the dataset input and the source commit."""
    from cliptd.core.env import package_versions
    from cliptd.tracking import runs as tracking

    experiment = tracking.get_experiment(uri, f"cliptd-{cfg['task']}")
    versions = package_versions()
    run_id, created = tracking.find_or_create_trial_run(
        uri, experiment, None, f"train/{name}", name=name, kind="train",
        tags={"task": cfg["task"], "method": cfg["distill"]["method"], "shots": cfg["shots"],
              "seed": cfg["seed"], "subset_seed": cfg["subset_seed"], "preset": cfg["preset"]},
        params={**cfg, "versions": versions}, dataset=cfg)
    if created:
        tracking.client(uri).log_dict(run_id, {"config": cfg, "versions": versions},
                                      "run.json")
    else:
        tracking.client(uri).update_run(run_id, status="RUNNING")
    return run_id


if __name__ == "__main__":
    sys.exit(main())
