"""The student's vision-language pre-training loop, as VisualBERT / LXMERT are pretrained
before any task: ``pretrain_loop(config, runtime)`` on one worker of a Ray Train run (the
``python -m cliptd.pretrain`` command), or in this process (``pretrain_student``, the
embedded default's path).

Data-parallel (each rank samples its own batches), a self-describing checkpoint every
``checkpoint_every`` steps with every rank's RNG state, exact resume, rank-0 MLflow logging;
the objectives are ``cliptd.objective.pretrain_task.PretrainTask``'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cliptd.core.atomic import atomic_dir
from cliptd.core.env import peak_rss_mb
from cliptd.core.schedule import lr_scheduler, warmup_cosine
from cliptd.data.corpus import load_corpus
from cliptd.model.config import StudentConfig
from cliptd.model.student import VLStudent, save_student
from cliptd.model.tokenizers import build_word_tokenizer
from cliptd.objective.pretrain_batch import make_batch
from cliptd.objective.pretrain_task import CHOICE_KINDS, LOSSES, PretrainConfig, PretrainTask
from cliptd.training.checkpoint import PRETRAIN_FORMAT
from cliptd.training.runtime import LocalRuntime


def pretrain_loop(config: dict, rt) -> PretrainTask | None:
    """The pre-training loop on one worker (``rt``: ``cliptd.training.runtime.RayRuntime`` or
    ``LocalRuntime``). ``config``: the ``PretrainConfig`` fields plus ``corpus``, ``words``
    (the closed vocabulary), ``attribute_groups`` (the region label vocabularies the
    attribute objective classifies into; none: no attribute objective), and optionally
    ``threads``, ``tracking``, ``progress``, ``fault``.
    Returns the task module on rank 0 (the caller exports ``task.student``)."""
    cfg = PretrainConfig(**{f.name: config[f.name] for f in fields(PretrainConfig)
                            if f.name in config})
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    tokenizer = build_word_tokenizer(config["words"])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    groups = tuple(tuple(g) for g in config.get("attribute_groups") or ())
    scfg = StudentConfig.from_name(cfg.student, vocab_size=len(tokenizer))
    task = PretrainTask(VLStudent(scfg), len(tokenizer), tuple(len(g) for g in groups))
    items = load_corpus(Path(config["corpus"]), scfg.image_size, groups)
    model = rt.prepare_model(task)
    module: PretrainTask = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_scheduler(opt, warmup_cosine(cfg.warmup, cfg.steps))
    # each rank samples its own batches; global batch = batch_size
    per_worker = max(1, cfg.batch_size // rt.world)
    rng = np.random.default_rng([cfg.seed, rt.rank])
    torch.manual_seed(cfg.seed * 1000 + rt.rank)  # dropout differs per rank, like the data
    step, history = 0, []
    state = rt.resume(PRETRAIN_FORMAT)
    if state is not None:  # exact resume: weights, optimizer, schedule, sampling RNGs
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"][rt.rank]["numpy"]
        torch.set_rng_state(state["rng"][rt.rank]["torch"])
        step, history = state["step"], state["history"]
    tracker = rt.tracker(config.get("tracking"))
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain student",
               disable=not config.get("progress") or rt.rank != 0,
               position=config.get("bar_position", 0))
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # steps that logged each loss (MLM may have nothing masked)
    n, t0 = 0, time.time()
    model.train()
    while step < cfg.steps:
        batch = make_batch(items, tokenizer, rng, replace(cfg, batch_size=per_worker),
                           attribute_groups=groups)
        loss, logs = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        n += 1
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v.item()
            counts[k] = counts.get(k, 0) + 1
        bar.update(1)
        rt.fault_point(config.get("fault"), step)
        if step % cfg.checkpoint_every and step < cfg.steps:
            continue
        # averages over the steps since the last report (this rank's batches)
        # (the per-kind choice sums, "choice_hits/<kind>", are divided by their own count)
        metrics = {"step": step, **{f"pretrain/{k}": v / counts[k] for k, v in sums.items()
                                    if "/" not in k},
                   **_choice_accuracy_by_kind(sums),
                   "pretrain/lr": sched.get_last_lr()[0],
                   "pretrain/samples_per_s": n * per_worker * rt.world / (time.time() - t0),
                   "pretrain/workers": rt.world, "sys/peak_rss_mb": peak_rss_mb()}
        history.append({k: round(v, 5) for k, v in metrics.items()})
        bar.set_postfix({k.split("/")[1]: f"{v:.2f}" for k, v in metrics.items()
                         if k.count("/") == 1 and k.startswith("pretrain/")
                         and k.split("/")[1] in LOSSES})
        rngs = _gather_rng(rng)  # every rank's sampling state, for an exact resume
        rt.checkpoint_and_report(metrics, step, unit="step", tracker=tracker,
                                 tokenizer=tokenizer, state=lambda rngs=rngs, step=step: {
            "format": PRETRAIN_FORMAT, "model": module.state_dict(),
            "student_config": asdict(scfg), "config": asdict(cfg),
            "corpus": str(config["corpus"]), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": rngs, "step": step, "history": history})
        sums, counts, n, t0 = {}, {}, 0, time.time()
    bar.close()
    if tracker:
        tracker.close()
    return module if rt.rank == 0 else None


def _choice_accuracy_by_kind(sums: dict[str, float]) -> dict[str, float]:
    """``pretrain/choice_acc/<kind>`` from the summed hits and groups of each kind since the
    last report (a kind that did not occur is left out, not reported as 0)."""
    return {f"pretrain/choice_acc/{name}": sums[f"choice_hits/{name}"] / seen
            for name in CHOICE_KINDS if (seen := sums.get(f"choice_seen/{name}", 0))}


def _gather_rng(rng: np.random.Generator) -> list[dict]:
    """Every rank's RNG states (numpy sampler, torch), indexed by rank."""
    mine = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, mine)
        return out
    return [mine]


def pretrain_student(corpus: Path, out_dir: Path, words, cfg: PretrainConfig | None = None,
                     *, attribute_groups=(), progress: bool = True, log=None,
                     bar_position: int = 0) -> Path:
    """Pre-train in this process (the embedded default's path: same loop, one worker) and
    export the student folder atomically."""
    cfg = cfg or PretrainConfig()
    start = time.time()
    rt = LocalRuntime()
    if log:
        keep = rt.report
        rt.report = lambda metrics, folder, step, unit: (keep(metrics, folder, step, unit),
                                                        log(metrics))
    task = pretrain_loop({**asdict(cfg), "corpus": str(corpus), "words": sorted(words),
                          "attribute_groups": [list(g) for g in attribute_groups],
                          "progress": progress, "bar_position": bar_position}, rt)
    history = [{k: round(v, 5) for k, v in r.items()} for r in rt.history]
    with atomic_dir(Path(out_dir)) as tmp:
        save_student(task.student.eval(), build_word_tokenizer(words), tmp,
                     extra={"pretrain": asdict(cfg), "corpus": str(corpus)})
        (tmp / "pretrain.json").write_text(json.dumps(
            {"config": asdict(cfg), "seconds": round(time.time() - start, 1),
             "history": history}, indent=2))
    return Path(out_dir)
