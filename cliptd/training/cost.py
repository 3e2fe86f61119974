"""What a trained student costs at inference: parameters and forward time per instance.

Forward times of models measured in different processes are not comparable on a shared
machine (another trial, a benchmark, the OS), so every figure here is measured *side by
side*: the models' forwards interleaved on the same batch in one process, a noisy spell
slowing them alike, and each reported as a ratio to the reference model.

A training run ends by measuring its own student against the model ``none`` would export
for the same config (``run_cost``): that is the inference-cost row of the comparison table.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

from cliptd.model.student import VLStudent, count_parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_ms(models: dict[str, nn.Module], batch: dict, repeats: int = 5,
               warmup: int = 1) -> dict[str, float]:
    """Median forward time (ms) of each model on ``batch``, in eval mode, the models'
    forwards interleaved (the first ``warmup`` rounds warm up allocators and are dropped)."""
    modes = {name: m.training for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        for i in range(warmup + repeats):
            for name, m in models.items():
                device = next(m.parameters()).device
                _sync(device)
                t = time.perf_counter()
                m(batch)
                _sync(device)
                if i >= warmup:
                    times[name].append(1000 * (time.perf_counter() - t))
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return {name: statistics.median(v) for name, v in times.items()}


def instances(batch: dict) -> int:
    """Problems in a batch (a VCR problem is 4 candidate rows, one instance)."""
    return int(batch["labels"].shape[0])


def compare(models: dict[str, nn.Module], batch: dict, reference: str = "none",
            repeats: int = 5) -> dict[str, dict]:
    """Per model: params, forward ms per instance, and both as a ratio to ``reference``."""
    ms = forward_ms(models, batch, repeats=repeats)
    n = instances(batch)
    params = {name: count_parameters(m) for name, m in models.items()}
    return {name: {"params": params[name], "forward_ms_per_instance": ms[name] / n,
                   "params_vs_ref": params[name] / params[reference],
                   "forward_vs_ref": ms[name] / ms[reference]} for name in models}


def run_cost(student: VLStudent, batch: dict, repeats: int = 5) -> dict[str, float]:
    """The run's metrics ``model/*``: its student against the model ``none`` would export
    for the same config (another instance of the same architecture when the student is no
    clip student: the ratio then only shows the measurement's noise)."""
    from cliptd.model.clip_regions import reference_config

    device = next(student.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        reference = VLStudent(reference_config(student.cfg)).to(device)  # weights: irrelevant
    got = compare({"run": student, "none": reference}, batch, repeats=repeats)["run"]
    return {"model/params": float(got["params"]),
            "model/params_vs_none": got["params_vs_ref"],
            "model/forward_ms_per_instance": got["forward_ms_per_instance"],
            "model/forward_vs_none": got["forward_vs_ref"]}
