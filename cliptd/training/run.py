"""Assembling one fine-tuning run (data → student → task module) and evaluating it as the official code scores it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cliptd.core.config import HEAD, PRIMARY_METRIC, DistillConfig, parse_shots
from cliptd.core.errors import DataError
from cliptd.data.metrics import accuracy, vcr_metrics, vqa_accuracy
from cliptd.data.prepare import answer_vocab, load_manifest, read_split
from cliptd.data.problems import EVAL_SPLIT, Collator, ImageStore, Problem, problems_from_table
from cliptd.data.subsets import domain_preset, subset_ids
from cliptd.model.student import VLStudent, open_student, with_clip_regions
from cliptd.objective.task import CLIPTDTask
from cliptd.teacher.cache import cache_format, load_cache


@dataclass
class RunParts:
    task: CLIPTDTask
    tokenizer: object
    train: list[Problem]
    eval: list[Problem]
    eval_groups: dict[str, set[str]]  # "id" / "shift" → instance ids
    # eval_limit: the fixed sample that the epochs before the last evaluate on (None: all)
    eval_sample: set[str] | None
    collate_train: Collator
    collate_eval: Collator
    vocab: list[str] | None


def build_run(cfg: dict) -> RunParts:
    task = cfg["task"]
    data = Path(cfg["data"])
    manifest = load_manifest(data)
    if manifest["task"] != task:
        raise DataError(f"{data} holds {manifest['task']} data, not {task}")
    preset = domain_preset(cfg["preset"])
    preset.check(manifest)
    eval_split = cfg["eval_split"] or preset.eval_split or EVAL_SPLIT[task]
    train_table = read_split(data, "train")
    # the answer vocabulary comes from the whole train split, whatever the shot level
    vocab = answer_vocab(train_table, cfg["vqa_vocab"]) if task == "vqa" else None
    ids = set(subset_ids(data, "train", seed=cfg["subset_seed"],
                                  **parse_shots(cfg["shots"])))
    keep = np.array([i in ids for i in train_table.column("id").to_pylist()]) & \
        preset.train_mask(train_table)
    train_table = train_table.filter(keep)
    if train_table.num_rows == 0:
        raise DataError(f"no training rows for shots={cfg['shots']} preset={cfg['preset']}")
    eval_table = read_split(data, eval_split)
    eval_ids = eval_table.column("id").to_pylist()
    sample = None
    if cfg["eval_limit"] and eval_table.num_rows > cfg["eval_limit"]:
        # a fixed random sample (seed 0, not the run's seed): every trial sees the same rows
        keep = np.random.default_rng(0).permutation(eval_table.num_rows)[:cfg["eval_limit"]]
        sample = {eval_ids[i] for i in keep}
    groups = {"id": {i for i, m in zip(eval_ids, preset.train_mask(eval_table), strict=True) if m}}
    if cfg["preset"] != "none":
        groups["shift"] = {i for i, m in zip(eval_ids, preset.eval_mask(eval_table),
                                             strict=True) if m}
    root = Path(manifest["image_root"])
    train = problems_from_table(task, train_table, root, vocab)
    evals = [p for p in problems_from_table(task, eval_table, root, vocab) if p.label >= 0
             or task == "vqa"]
    head, outputs = HEAD[task]
    outputs = len(vocab) if task == "vqa" else outputs
    student_ref = str(cfg["student"])
    student, tokenizer = open_student(
        student_ref, task_head=head, num_outputs=outputs, tokenizer=cfg["tokenizer"],
        student_config=cfg["student_config"],
        # from scratch: a word vocabulary over this dataset
        words=lambda: {w for p in train + evals for w in p.query + [
            w for c in p.candidates for w in c[0]]})
    distill = DistillConfig.from_dict(cfg["distill"])
    if distill.method == "clip_features":  # CLIP inside the student (cliptd.model.clip_regions)
        student = with_run_clip(student, cfg["teacher_cache"])
    teacher = None
    teacher_dim = 1
    if distill.lam > 0:
        if not cfg["teacher_cache"]:
            raise ValueError(f"method {distill.method!r} needs a teacher cache (teacher_cache)")
        teacher = last_cache_load(Path(cfg["teacher_cache"]), frozenset(p.key for p in train))
        missing = [p.key for p in train if p.key not in teacher]
        if missing:
            raise DataError(f"teacher cache {cfg['teacher_cache']} lacks {len(missing)} "
                            f"training problems (e.g. {missing[0]}): rebuild it")
        teacher_dim = next(iter(teacher.values()))["pooled"].shape[-1]
        if distill.region_weighting == "confidence" and cache_format(
                Path(cfg["teacher_cache"])) < 2:
            raise DataError(f"teacher cache {cfg['teacher_cache']} predates per-region "
                            "confidence (cache format 1), which distill.region_weighting="
                            "confidence needs: rebuild it with python -m cliptd.teacher_cache")
    images = ImageStore.shared(student.cfg.image_size)
    num_outputs = outputs if task == "vqa" else 0
    return RunParts(
        task=CLIPTDTask(student, distill, teacher_dim), tokenizer=tokenizer, train=train,
        eval=evals, eval_groups=groups, eval_sample=sample,
        collate_train=Collator(tokenizer, images, max_length=cfg["max_length"],
                               num_outputs=num_outputs, teacher=teacher),
        collate_eval=Collator(tokenizer, images, max_length=cfg["max_length"],
                              num_outputs=num_outputs),
        vocab=vocab)


def last_cache_load(folder: Path, keys: frozenset[str]) -> dict[str, dict]:
    """The teacher targets of ``keys``, kept for this process's next run of the same training
    subset (a sweep's trials of one condition, one after another in a reused Tune actor).
    Read-only: the collator only reads them. A cache folder is written whole, then marked
    ``_SUCCESS``: its path and that mark's time identify its contents."""
    success = folder / "_SUCCESS"
    stamp = success.stat().st_mtime_ns if success.exists() else None
    return _cache_load(folder, stamp, keys)


@functools.lru_cache(maxsize=1)
def _cache_load(folder: Path, stamp: int | None, keys: frozenset[str]) -> dict[str, dict]:
    return load_cache(folder, set(keys))


def to_device(batch: dict, device) -> dict:
    """The batch on ``device``; images still uint8 (a loader's, ``Collator(uint8_images=
    True)``) are moved as such and scaled to [0, 1] there."""
    out = {}
    for k, v in batch.items():
        if k == "images" and isinstance(v, torch.Tensor) and v.dtype == torch.uint8:
            out[k] = v.to(device, non_blocking=True).float() / 255
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out


@torch.no_grad()
def evaluate(task_module: CLIPTDTask, parts: RunParts, cfg: dict, device,
             sample: bool = False) -> dict:
    """Task metrics on the eval split, in-domain and shifted, as the official code computes
    them (VCR Q→A, QA→R, Q→AR; SNLI-VE accuracy; VQA accuracy over 10 annotators).

    ``sample``: only the fixed ``eval_limit`` sample (cheap, for early stopping); the last
    epoch always evaluates on the whole split, so a run's final numbers never depend on it."""
    problems = parts.eval
    if sample and parts.eval_sample is not None:
        problems = [p for p in problems if p.id in parts.eval_sample]
    task_module.eval()
    loader = DataLoader(problems, batch_size=cfg["eval_batch_size"], shuffle=False,
                        collate_fn=parts.collate_eval)
    preds: dict[str, int] = {}
    for batch in loader:
        scores = task_module.predict(to_device(batch, device)).float()
        for key, pred in zip(batch["keys"], scores.argmax(-1).tolist(), strict=True):
            preds[key] = pred
    task_module.train()
    metrics = {"val/instances": len({p.id for p in problems})}
    for group, ids in parts.eval_groups.items():
        probs = [p for p in problems if p.id in ids]
        if not probs:
            continue
        for name, value in _task_metrics(cfg["task"], probs, preds, parts.vocab).items():
            metrics[f"val/{group}/{name}"] = value
        primary = PRIMARY_METRIC[cfg["task"]]
        # per question type, where the data has types (SNLI-VE's problems have none: an
        # empty type would make the key val/id/qtype//acc, which MLflow refuses)
        for qtype in sorted({p.qtype for p in probs if p.qtype}):
            sub = [p for p in probs if p.qtype == qtype]
            metrics[f"val/{group}/qtype/{qtype}/{primary}"] = _task_metrics(
                cfg["task"], sub, preds, parts.vocab)[primary]
        for name, words in cfg["eval_words"].items():
            said = mentioning(probs, words)
            sub = [p for p in probs if p.id in said]
            if sub:
                metrics[f"val/{group}/words/{name}/{primary}"] = _task_metrics(
                    cfg["task"], sub, preds, parts.vocab)[primary]
    return metrics


def mentioning(problems: list[Problem], words: list[str]) -> set[str]:
    """The instance ids whose question or gold answer (any head's; VQA: any annotator's)
    says one of ``words``."""
    wanted = {w.lower() for w in words}
    return {p.id for p in problems if wanted & {
        w.lower() for w in p.teacher_words() + [w for a in p.answers for w in a.split()]}}


def _task_metrics(task: str, problems: list[Problem], preds: dict, vocab) -> dict:
    if task == "vcr":
        qa = {p.id: p for p in problems if p.head == "qa"}
        qar = {p.id: p for p in problems if p.head == "qar"}
        ids = sorted(qa)
        return vcr_metrics([preds[qa[i].key] for i in ids], [qa[i].label for i in ids],
                           [preds[qar[i].key] for i in ids], [qar[i].label for i in ids])
    if task == "snli_ve":
        return {"acc": accuracy([preds[p.key] for p in problems], [p.label for p in problems])}
    return {"vqa_acc": float(np.mean([vqa_accuracy(vocab[preds[p.key]], p.answers)
                                      for p in problems]))}


def with_run_clip(student: VLStudent, teacher_cache: str | None) -> VLStudent:
    """``clip_features`` in a run: the run's CLIP is its teacher (the one behind its teacher
    cache), so the CLIP-inside baseline and distillation use the same CLIP."""
    from cliptd.teacher.cache import cache_teacher
    from cliptd.teacher.clip import Teacher

    if not teacher_cache:
        raise ValueError("method 'clip_features' takes its CLIP from the run's teacher cache "
                         "(teacher_cache)")
    spec = cache_teacher(Path(teacher_cache))
    return with_clip_regions(student, Teacher.load(spec).model, spec)
