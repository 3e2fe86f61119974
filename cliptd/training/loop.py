"""The fine-tuning loop, on one worker of a run: ``train_loop(config, runtime)``.

Data-parallel under Ray Train (gloo on CPU, NCCL on GPU; ``cliptd.training.runtime``), bf16
autocast on GPU, gradient accumulation, low-shot epochs stretched to ``min_steps``, one
self-describing checkpoint per epoch and exact resume from the latest one, rank-0 evaluation
(a fixed sample before the last epoch, the whole split at the last) and MLflow logging.
``cliptd.training.launch`` starts it on Ray Train; ``LocalRuntime`` runs it in-process.
"""

from __future__ import annotations

import copy
import os
import time

import torch
from torch.utils.data import DataLoader, RandomSampler

from cliptd.core.config import PRIMARY_METRIC, resolve_config
from cliptd.core.env import peak_rss_mb
from cliptd.core.schedule import lr_scheduler, warmup_linear
from cliptd.objective.task import CLIPTDTask
from cliptd.training.checkpoint import (
    CHECKPOINT_FORMAT,
    rng_state,
    seed_everything,
    set_rng_state,
)
from cliptd.training.cost import run_cost
from cliptd.training.run import build_run, evaluate, to_device

COST_INSTANCES = 32  # eval problems the end-of-run inference-cost measurement forwards


class PassShuffle(RandomSampler):
    """A new permutation per pass, drawn from the loader's generator once, when the pass
    starts. ``RandomSampler`` draws one more at the end of a pass that is read to its end,
    and loader workers read ahead (to its end or not, by timing): the shuffles, and so the
    results, would depend on how many workers there are."""

    def __iter__(self):
        return iter(torch.randperm(len(self.data_source), generator=self.generator).tolist())


def _uint8_images(collate):
    """The training collator, its images left uint8 (scaled on the device, ``to_device``)."""
    out = copy.copy(collate)
    out.uint8_images = True
    return out


def epoch_batches(loader, n_batches: int, epoch: int):
    """``n_batches`` batches, cycling the loader (a new shuffle per pass) when it is shorter."""
    done, rep = 0, 0
    while done < n_batches:
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch * 1000 + rep)  # DistributedSampler's shuffle seed
        if getattr(loader, "persistent_workers", False) and loader.generator is not None \
                and getattr(loader, "_iterator", None) is not None:
            # Every new pass of a loader draws its workers' base seed from its generator,
            # except one whose persistent workers are reused: drawn here, so the shuffles
            # (and so the results) are the same with and without loader workers
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        for batch in loader:
            yield batch
            done += 1
            if done == n_batches:
                return
        rep += 1


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
    # JPEG decode, resize and tokenizing in worker processes, so that the GPU is fed (one
    # photo-sized image costs 16 ms of a core, docs/scaling.md); the batches and their
    # order are the same with or without them (the sampler stays in this process)
    workers = rt.loader_workers(cfg["loader_workers"])
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shuffle = torch.Generator().manual_seed(cfg["seed"])
    loader = rt.prepare_loader(DataLoader(
        parts.train, batch_size=per_worker, sampler=PassShuffle(parts.train, generator=shuffle),
        collate_fn=_uint8_images(parts.collate_train), generator=shuffle, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=rt.device.type == "cuda"))
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
    sched = lr_scheduler(opt, warmup_linear(warm, total_steps))
    start_epoch, step = 0, 0
    # patience: stop once the (sampled) validation score has not improved for that many
    # epochs (those after `patience_after`); the run then ends as if that epoch were its last
    # (whole-split evaluation)
    early = {"best": float("-inf"), "since": 0, "stopped": False}
    state = rt.resume(CHECKPOINT_FORMAT)
    if state is not None:  # resume exactly: weights, optimizer, schedule, every RNG
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        module.generator.set_state(state["select_rng"])
        if getattr(loader, "generator", None) is not None:
            loader.generator.set_state(state["loader_rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        early = state.get("early_stop", early)
        if early["stopped"]:  # the run had ended: a restart trains no further
            start_epoch = epochs
        if start_epoch >= epochs:
            # The run had ended, but whoever restarted it (Tune restoring a sweep whose
            # driver died between a trial's last report and its end) needs its result
            # again: a trial that reports nothing fails Tune's metric check. Reported as
            # it was, without a new checkpoint; MLflow already has it (logged once per epoch).
            rt.report_again(state["metrics"], state["epoch"] + 1)
    tracker = rt.tracker(cfg["tracking"])
    # Epochs this run already logged before a crash or a killed driver: a restart from an
    # earlier checkpoint re-runs them (exactly: same values), and MLflow must not get them
    # twice.
    logged = tracker.logged_steps() if tracker else set()
    device = rt.device
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
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
                rt.fault_point(cfg["fault"], step)
        train_seconds = time.time() - t0
        metrics = {"epoch": epoch + 1, "step": step, "train/seconds": train_seconds,
                   "train/loader_workers": workers,
                   "train/samples_per_s": seen * rt.world / max(train_seconds, 1e-9),
                   "train/effective_batch": per_worker * rt.world * cfg["grad_accum"],
                   "train/workers": rt.world, "train/nodes": rt.nodes,
                   **{f"train/{k}": v for k, v in logs.items()}}
        if epoch == start_epoch:
            metrics["time/setup_s"] = setup_seconds
        final = epoch + 1 == epochs
        primary = f"val/id/{PRIMARY_METRIC[cfg['task']]}"
        t_eval = time.time()
        if rt.rank == 0:
            metrics.update(evaluate(module, parts, cfg, device, sample=not final))
        if cfg["patience"] and not final:
            score = metrics.get(primary, float("-inf"))
            if rt.rank == 0 and score > early["best"]:
                early["best"], early["since"] = score, 0
            elif rt.rank == 0 and epoch + 1 > cfg["patience_after"]:
                early["since"] += 1
            # rank 0 alone evaluated: every rank follows its decision
            final = early["stopped"] = rt.agree(early["since"] >= cfg["patience"])
            if final and rt.rank == 0:  # the last epoch: scored on the whole split
                metrics.update(evaluate(module, parts, cfg, device, sample=False))
        if rt.rank == 0:
            metrics["time/eval_s"] = time.time() - t_eval
            if final:  # what the trained student costs at inference
                metrics.update(run_cost(module.student, to_device(parts.collate_eval(
                    parts.eval[:COST_INSTANCES]), device)))
            if cfg["patience"]:
                metrics["train/stopped_early"] = float(early["stopped"])
        metrics["score"] = metrics.get(primary, float("nan"))
        # per trial in MLflow: a sweep's memory growth shows as a trend across its trials
        metrics["sys/peak_rss_mb"] = peak_rss_mb()

        def state(epoch=epoch, step=step, metrics=metrics) -> dict:  # a checkpoint that describes itself
            return {
                "format": CHECKPOINT_FORMAT, "model": module.state_dict(),
                "student_config": vars(module.student.cfg),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": rng_state(), "select_rng": module.generator.get_state(),
                "loader_rng": loader.generator.get_state()
                if getattr(loader, "generator", None) is not None
                else torch.Generator().get_state(),
                "config": cfg, "epoch": epoch, "step": step, "metrics": metrics,
                "early_stop": dict(early),
            }

        rt.checkpoint_and_report(metrics, epoch + 1, state=state, tokenizer=parts.tokenizer,
                                 tracker=tracker, log=epoch + 1 not in logged)
        if final:
            break
    if tracker:
        tracker.close()
