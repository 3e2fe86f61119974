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
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cliptd import data as data_mod
from cliptd.config import HEAD, METHODS, PRIMARY_METRIC, DistillConfig, parse_shots, resolve_config
from cliptd.dataset import EVAL_SPLIT, Collator, ImageStore, Problem, problems_from_table
from cliptd.errors import DataError
from cliptd.inference_cost import run_cost
from cliptd.launch import make_trainer
from cliptd.metrics import accuracy, vcr_metrics, vqa_accuracy
from cliptd.student import StudentConfig, VLStudent, build_word_tokenizer, load_student
from cliptd.task import CLIPTDTask
from cliptd.teacher_cache import load_cache

CHECKPOINT_FORMAT = "cliptd-checkpoint-v1"
COST_INSTANCES = 32  # eval problems the end-of-run inference-cost measurement forwards


# --------------------------------------------------------------------------------------
# Building a run: data → student → task module. Shared by the loop, bench and tests.


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
    manifest = data_mod.load_manifest(data)
    if manifest["task"] != task:
        raise DataError(f"{data} holds {manifest['task']} data, not {task}")
    preset = data_mod.domain_preset(cfg["preset"])
    preset.check(manifest)
    eval_split = cfg["eval_split"] or preset.eval_split or EVAL_SPLIT[task]
    train_table = data_mod.read_split(data, "train")
    # the answer vocabulary comes from the whole train split, whatever the shot level
    vocab = data_mod.answer_vocab(train_table, cfg["vqa_vocab"]) if task == "vqa" else None
    ids = set(data_mod.subset_ids(data, "train", seed=cfg["subset_seed"],
                                  **parse_shots(cfg["shots"])))
    keep = np.array([i in ids for i in train_table.column("id").to_pylist()]) & \
        preset.train_mask(train_table)
    train_table = train_table.filter(keep)
    if train_table.num_rows == 0:
        raise DataError(f"no training rows for shots={cfg['shots']} preset={cfg['preset']}")
    eval_table = data_mod.read_split(data, eval_split)
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
    if (Path(student_ref) / "student_config.json").exists():
        student, tokenizer = load_student(Path(student_ref), task_head=head, num_outputs=outputs)
    else:  # from scratch: a word vocabulary over this dataset
        words = {w for p in train + evals for w in p.query + [w for c in p.candidates
                                                              for w in c[0]]}
        tokenizer = build_word_tokenizer(words)
        student = VLStudent(StudentConfig.from_name(
            student_ref, vocab_size=len(tokenizer), task_head=head, num_outputs=outputs))
    distill = DistillConfig.from_dict(cfg["distill"])
    if distill.method == "clip_features":  # CLIP inside the student (cliptd.clip_regions)
        from cliptd.clip_regions import with_run_clip

        student = with_run_clip(student, cfg["teacher_cache"])
    teacher = None
    teacher_dim = 1
    if distill.lam > 0:
        if not cfg["teacher_cache"]:
            raise ValueError(f"method {distill.method!r} needs a teacher cache (teacher_cache)")
        teacher = load_cache(Path(cfg["teacher_cache"]), {p.key for p in train})
        missing = [p.key for p in train if p.key not in teacher]
        if missing:
            raise DataError(f"teacher cache {cfg['teacher_cache']} lacks {len(missing)} "
                            f"training problems (e.g. {missing[0]}): rebuild it")
        teacher_dim = next(iter(teacher.values()))["pooled"].shape[-1]
    images = ImageStore(student.cfg.image_size)
    num_outputs = outputs if task == "vqa" else 0
    return RunParts(
        task=CLIPTDTask(student, distill, teacher_dim), tokenizer=tokenizer, train=train,
        eval=evals, eval_groups=groups, eval_sample=sample,
        collate_train=Collator(tokenizer, images, max_length=cfg["max_length"],
                               num_outputs=num_outputs, teacher=teacher),
        collate_eval=Collator(tokenizer, images, max_length=cfg["max_length"],
                              num_outputs=num_outputs),
        vocab=vocab)


def to_device(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
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
    return metrics


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


# --------------------------------------------------------------------------------------
# The loop.


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32),
                         state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])


def load_checkpoint_file(path: Path, fmt: str = CHECKPOINT_FORMAT) -> dict:
    """Load one of our checkpoints; anything else (foreign, truncated, pickled code) is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a loadable checkpoint"
        detail = (str(exc).splitlines() or ["empty or truncated file"])[0][:200]
        raise ValueError(f"{path}: not a loadable cliptd checkpoint ({type(exc).__name__}: "
                         f"{detail})") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"{path}: not a cliptd checkpoint (format != {fmt})")
    return state


class RayRuntime:
    """The loop's view of Ray Train: rank, device, DDP wrapping, checkpoints, reports."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # nodes the run spans (Ray Train places the same number of workers on each node)
        self.nodes = self.world // max(1, ctx.get_local_world_size())
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        # Parts of the task module sit idle in some runs (the distillation heads under
        # `none`, a modality whose selection ratio is 0): DDP must not wait for their grads.
        return self._torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def prepare_loader(self, loader):
        return self._torch.prepare_data_loader(loader, move_to_device=False)

    @contextmanager
    def latest_checkpoint(self):
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            yield None
        else:
            with ckpt.as_directory() as d:
                yield Path(d)

    def report(self, metrics: dict, folder: Path | None, epoch: int, unit: str = "epoch"
               ) -> None:
        ckpt = self._train.Checkpoint.from_directory(folder) if folder else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{unit}-{epoch:03d}")


class LocalRuntime:
    """The same loop in this process, one worker: benchmarks and quick experiments."""

    def __init__(self, device: str = "cpu", resume_from: Path | None = None,
                 keep_dir: Path | None = None):
        self.rank, self.world, self.nodes, self.device = 0, 1, 1, torch.device(device)
        self.resume_from, self.keep_dir = resume_from, keep_dir
        self.history: list[dict] = []

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    @contextmanager
    def latest_checkpoint(self):
        yield self.resume_from

    def report(self, metrics: dict, folder: Path | None, epoch: int, unit: str = "epoch"
               ) -> None:
        self.history.append(metrics)
        if folder and self.keep_dir:
            shutil.copytree(folder, self.keep_dir / f"{unit}-{epoch:03d}", dirs_exist_ok=True)


def epoch_batches(loader, n_batches: int, epoch: int):
    """``n_batches`` batches, cycling the loader (a new shuffle per pass) when it is shorter."""
    done, rep = 0, 0
    while done < n_batches:
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch * 1000 + rep)  # DistributedSampler's shuffle seed
        for batch in loader:
            yield batch
            done += 1
            if done == n_batches:
                return
        rep += 1


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (ru_maxrss: KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def train_loop(config: dict, rt) -> None:
    launched = time.time()
    cfg = resolve_config(config)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    seed_everything(cfg["seed"])  # same init on every rank; DDP broadcasts anyway
    parts = build_run(cfg)
    model = rt.prepare_model(parts.task)
    module: CLIPTDTask = model.module if hasattr(model, "module") else model
    per_worker = max(1, cfg["batch_size"] // rt.world)
    loader = rt.prepare_loader(DataLoader(
        parts.train, batch_size=per_worker, shuffle=True, collate_fn=parts.collate_train,
        generator=torch.Generator().manual_seed(cfg["seed"])))
    # Low-shot: an epoch is at least min_steps / epochs optimizer steps (the small training
    # set is cycled), so a 1 % run still trains, and is still evaluated `epochs` times.
    epochs = cfg["epochs"]
    batches_per_epoch = max(len(loader), -(-cfg["min_steps"] * cfg["grad_accum"] // epochs))
    steps_per_epoch = max(1, batches_per_epoch // cfg["grad_accum"])
    total_steps = epochs * steps_per_epoch
    # frozen parameters (clip_features' CLIP tower) stay out of the optimizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                            weight_decay=cfg["weight_decay"])
    warm = max(1, int(cfg["warmup_frac"] * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / warm, max(0.0, (total_steps - s) / max(1, total_steps - warm))))
    start_epoch, step = 0, 0
    with rt.latest_checkpoint() as folder:
        if folder is not None:  # resume exactly: weights, optimizer, schedule, every RNG
            state = load_checkpoint_file(folder / "checkpoint.pt")
            module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            module.generator.set_state(state["select_rng"])
            if getattr(loader, "generator", None) is not None:
                loader.generator.set_state(state["loader_rng"])
            start_epoch, step = state["epoch"] + 1, state["step"]
    tracker = None
    if rt.rank == 0 and cfg["tracking"]:
        from cliptd.tracking import RunLogger

        tracker = RunLogger(cfg["tracking"]["uri"], cfg["tracking"]["run_id"])
    # Epochs this run already logged before a crash or a killed driver: a restart from an
    # earlier checkpoint re-runs them (exactly: same values), and MLflow must not get them
    # twice.
    logged = tracker.logged_steps() if tracker else set()
    device = rt.device
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    fault = cfg["fault"] or {}
    model.train()
    setup_seconds = time.time() - launched  # data, model, resume: what every (re)start pays
    for epoch in range(start_epoch, epochs):
        t0, seen, logs = time.time(), 0, {}
        for i, batch in enumerate(epoch_batches(loader, batches_per_epoch, epoch)):
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, logs = model(batch, progress=step / total_steps)
            (loss / cfg["grad_accum"]).backward()
            seen += len(batch["keys"])
            if (i + 1) % cfg["grad_accum"] == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if fault.get("exit_at_step") == step and not Path(fault["marker"]).exists():
                    Path(fault["marker"]).write_text(f"worker {rt.rank} exited at step {step}\n")
                    os._exit(1)  # a hard crash: no cleanup, no report
        train_seconds = time.time() - t0
        metrics = {"epoch": epoch + 1, "step": step, "train/seconds": train_seconds,
                   "train/samples_per_s": seen * rt.world / max(train_seconds, 1e-9),
                   "train/effective_batch": per_worker * rt.world * cfg["grad_accum"],
                   "train/workers": rt.world, "train/nodes": rt.nodes,
                   **{f"train/{k}": v for k, v in logs.items()}}
        if epoch == start_epoch:
            metrics["time/setup_s"] = setup_seconds
        if rt.rank == 0:
            t_eval = time.time()
            metrics.update(evaluate(module, parts, cfg, device, sample=epoch + 1 < epochs))
            metrics["time/eval_s"] = time.time() - t_eval
            if epoch + 1 == epochs:  # what the trained student costs at inference
                metrics.update(run_cost(module.student, to_device(parts.collate_eval(
                    parts.eval[:COST_INSTANCES]), device)))
        metrics["score"] = metrics.get(f"val/id/{PRIMARY_METRIC[cfg['task']]}", float("nan"))
        # per trial in MLflow: a sweep's memory growth shows as a trend across its trials
        metrics["sys/peak_rss_mb"] = peak_rss_mb()
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if rt.rank == 0:  # a checkpoint that describes itself
                folder = Path(tmp)
                torch.save({
                    "format": CHECKPOINT_FORMAT, "model": module.state_dict(),
                    "student_config": vars(module.student.cfg),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": rng_state(), "select_rng": module.generator.get_state(),
                    "loader_rng": loader.generator.get_state()
                    if getattr(loader, "generator", None) is not None
                    else torch.Generator().get_state(),
                    "config": cfg, "epoch": epoch, "step": step, "metrics": metrics,
                }, folder / "checkpoint.pt")
                parts.tokenizer.save_pretrained(folder / "tokenizer")
            if tracker and epoch + 1 not in logged:
                tracker.log_metrics(metrics, step=epoch + 1)
            rt.report(metrics, folder, epoch + 1)
    if tracker:
        tracker.close()


def export_best(result, out_dir: Path) -> Path:
    """The trained student alone (no teacher, no projection heads), from the best checkpoint."""
    from transformers import PreTrainedTokenizerFast

    from cliptd.student import StudentConfig, save_student

    best = result.get_best_checkpoint(metric="score", mode="max") or result.checkpoint
    with best.as_directory() as d:
        state = load_checkpoint_file(Path(d) / "checkpoint.pt")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(d) / "tokenizer")
    student = VLStudent(StudentConfig(**state["student_config"]))
    student.load_state_dict({k.removeprefix("student."): v for k, v in state["model"].items()
                             if k.startswith("student.")})
    save_student(student, tokenizer, out_dir, extra={"metrics": state["metrics"],
                                                     "config": state["config"]})
    return out_dir


# --------------------------------------------------------------------------------------
# CLI


def embedded_run_config(task: str, world, teacher_cache: Path | None) -> dict:
    return {"task": task, "data": str(world.data[task]), "student": str(world.student),
            "teacher_cache": str(teacher_cache) if teacher_cache else None,
            "preset": "synthetic"}


def main(argv=None) -> int:
    from cliptd.cli import add_common_args, die, init_ray, resolve_storage, setup_embedded

    parser = argparse.ArgumentParser(prog="python -m cliptd.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--shots", default=None, help="fraction in (0, 1] or k<N>")
    parser.add_argument("--config", type=Path, help="a YAML config (e.g. a sweep's best)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-failures", type=int, default=2)
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
