"""DataLoader worker processes change where images are decoded, not what a run computes:
the same seed gives the same batches, weights and metrics with 0 and 2 loader workers,
also when low-shot epochs cycle the loader several times (persistent workers)."""

from __future__ import annotations

import torch

from cliptd.core.config import resolve_config
from cliptd.training.checkpoint import load_checkpoint_file
from cliptd.training.loop import train_loop
from cliptd.training.runtime import LocalRuntime


def _run(world, cache, tmp_path, workers: int):
    cfg = resolve_config({"task": "vcr", "data": str(world.data["vcr"]),
                          "student": str(world.student), "teacher_cache": str(cache),
                          "preset": "synthetic", "epochs": 2, "batch_size": 8, "seed": 2,
                          # more steps than one pass holds: each epoch cycles the loader
                          "min_steps": 16, "loader_workers": workers,
                          "distill": {"method": "cliptd", "select_by": "random"}})
    rt = LocalRuntime(keep_dir=tmp_path / f"w{workers}")
    train_loop(cfg, rt)
    return rt, load_checkpoint_file(tmp_path / f"w{workers}" / "epoch-002" / "checkpoint.pt")


def test_loader_workers_give_identical_results(tiny_world, vcr_cache, tmp_path):
    plain, a = _run(tiny_world, vcr_cache, tmp_path, 0)
    fed, b = _run(tiny_world, vcr_cache, tmp_path, 2)
    assert [h["train/loader_workers"] for h in fed.history] == [2, 2]
    assert [h["train/loader_workers"] for h in plain.history] == [0, 0]
    assert a["step"] == b["step"] >= 16
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for key in ("train/loss/total", "val/id/q_a", "val/shift/q_a", "score"):
        assert [h[key] for h in plain.history] == [h[key] for h in fed.history], key
    assert torch.equal(torch.tensor(a["loader_rng"]), torch.tensor(b["loader_rng"]))


def test_auto_loader_workers_follow_the_cpus():
    rt = LocalRuntime()
    rt.cpus = lambda: 4.0
    assert rt.loader_workers(3) == 3 and rt.loader_workers(-1) == 0  # on CPU: none
    rt.device = torch.device("cuda")  # (only its type is read)
    assert rt.loader_workers(-1) == 3  # a g5.xlarge worker: training process + 3 decoders
    rt.cpus = lambda: 0.9
    assert rt.loader_workers(-1) == 0
