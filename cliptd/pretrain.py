"""Student vision-language pre-training, as VisualBERT / LXMERT are pretrained before any
task: masked language modelling conditioned on the image, image-text matching, and
word-region grounding, over an image-caption corpus, with the region backbone trained too.

    python -m cliptd.pretrain --corpus world/corpus/student.parquet --out DIR
    python -m cliptd.pretrain --corpus C.parquet --out DIR --workers 2 --steps 2000
    python -m cliptd.pretrain --corpus C.parquet --out DIR --vocab-from PREPARED_DATASET

The CLI runs on Ray Train (data-parallel, a self-describing checkpoint every
``checkpoint_every`` steps, exact resume after a worker dies, ``--name`` resumes a killed
run) and records the run in MLflow (experiment ``cliptd-pretrain``). The embedded default
runs the same loop in-process (``pretrain_student``), beside the teacher's pre-training.

Objectives (``PretrainTask``): MLM conditioned on the image; image-text matching with hard
negatives; a 4-way choice between a true grounded statement and minimally false ones;
word-region alignment toward the objects a word refers to; region attribute classification
on the backbone's region features (BUTD-style). The statements come from the corpus's own
boxes and region captions (``grounded_statements``, ``statement_choices``).

The embedded default pre-trains on the synthetic world's *student* corpus: source domain
only, fewer scenes — narrower than the teacher's corpus, as VL-BERT's few million captions
are narrower than CLIP's 400M web pairs. Users with a real VisualBERT / LXMERT checkpoint
skip this stage (``StudentConfig.checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from cliptd.core.env import package_versions
from cliptd.core.invocation import prog
from cliptd.data.corpus import check_corpus, corpus_words, dataset_words
from cliptd.model.config import StudentConfig
from cliptd.objective.pretrain_task import PretrainConfig
from cliptd.synthetic.corpus import attribute_groups
from cliptd.training.checkpoint import export_pretrained


def main(argv=None) -> int:
    from cliptd.cli.common import (
        add_launch_args,
        die,
        init_ray,
        reachable_tracking_uri,
        resolve_storage,
    )

    parser = argparse.ArgumentParser(prog=prog("cliptd.pretrain"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True,
                        help="image-caption corpus (Parquet, cliptd.synthetic.corpus.SCHEMA)")
    parser.add_argument("--out", type=Path, required=True, help="exported student folder")
    parser.add_argument("--vocab-from", type=Path, action="append", default=[],
                        help="prepared dataset(s) whose words join the vocabulary (the tasks "
                             "the student will be fine-tuned on)")
    for f in fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                            default=f.default)
    parser.add_argument("--name", help="Ray Train run name; the same name resumes")
    add_launch_args(parser, max_failures=2, cpus_per_worker=1)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    try:
        StudentConfig.from_name(cfg.student)
        if cfg.steps < 1 or cfg.batch_size < args.workers or cfg.checkpoint_every < 1:
            raise ValueError("--steps and --checkpoint-every must be >= 1 and --batch-size "
                             ">= --workers")
        check_corpus(args.corpus)
        words = corpus_words(args.corpus)
        for folder in args.vocab_from:
            words |= dataset_words(folder)
    except (ValueError, FileNotFoundError) as exc:
        die(str(exc))
    from cliptd.tracking import runs as tracking

    uri = reachable_tracking_uri(args)
    name = args.name or f"pretrain-{cfg.student}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = tracking.get_experiment(uri, "cliptd-pretrain")
    # found again by name on a resumed run, like a sweep's parent run
    run_id = tracking.find_or_create_parent(uri, experiment, name, name, {
        "cliptd.kind": "pretrain", "corpus": str(args.corpus.resolve())})
    c = tracking.client(uri)
    # the region label vocabularies of the attribute objective: the synthetic world's words
    # that this corpus's captions ("a <size> <colour> <shape>") use
    resolved = {**asdict(cfg), "corpus": str(args.corpus.resolve()), "words": sorted(words),
                "attribute_groups": [list(g) for g in attribute_groups(args.corpus)],
                "tracking": {"uri": uri, "run_id": run_id}, "threads": max(
                    1, int(args.cpus_per_worker)), "progress": True}
    c.log_dict(run_id, {"config": asdict(cfg), "corpus": resolved["corpus"],
                        "vocabulary": len(words), "workers": args.workers,
                        "versions": package_versions()}, "pretrain.json")
    if not c.get_run(run_id).data.params:
        for k, v in {**asdict(cfg), "workers": args.workers}.items():
            c.log_param(run_id, k, v)
    init_ray(args)
    from ray.train import TrainingFailedError

    from cliptd.training.launch import make_trainer, pretrain_fn_per_worker

    storage = resolve_storage(args.storage_path)
    trainer = make_trainer(resolved, name=name, storage_path=storage, workers=args.workers,
                           gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                           train_fn=pretrain_fn_per_worker, keep_checkpoints=1,
                           score_attribute=None, step_key="step")
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        c.set_terminated(run_id, status="FAILED")
        die(f"pre-training failed after {args.max_failures} restart(s): "
            f"{str(exc).splitlines()[0]} (checkpoints: {storage}/{name}; rerun with --name "
            f"{name} to resume)", code=1)
    tracking.replay_buffer(uri, run_id)  # what Train's controller could not send yet
    with result.checkpoint.as_directory() as d:
        out = export_pretrained(Path(d), args.out)
    c.log_artifact(run_id, str(out / "pretrain.json"))
    c.set_terminated(run_id, status="FINISHED")
    last = result.metrics
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()
                      if k.startswith(("pretrain/", "step"))}, indent=2))
    print(f"student written to {out}; fine-tune it with "
          f"python -m cliptd.train --config <yaml with student: {out}>")
    print(f"MLflow: {tracking.ui_command(uri)}   (experiment cliptd-pretrain, run {run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
