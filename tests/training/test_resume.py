"""Exact resume: a run resumed from its epoch-1 checkpoint ends in the same state as one
that never stopped (weights, optimizer, schedule, RNG streams, data order)."""

from __future__ import annotations

import pytest
import torch

from cliptd.core.config import resolve_config
from cliptd.training.checkpoint import load_checkpoint_file
from cliptd.training.loop import train_loop
from cliptd.training.runtime import LocalRuntime


def _cfg(world, cache, **kw):
    return resolve_config({"task": "vcr", "data": str(world.data["vcr"]),
                           "student": str(world.student), "teacher_cache": str(cache),
                           "preset": "synthetic", "epochs": 2, "batch_size": 8,
                           "distill": {"method": "cliptd", "select_by": "random"}, **kw})


def test_resume_matches_uninterrupted(tiny_world, vcr_cache, tmp_path):
    full = LocalRuntime(keep_dir=tmp_path / "full")
    train_loop(_cfg(tiny_world, vcr_cache), full)
    resumed = LocalRuntime(resume_from=tmp_path / "full" / "epoch-001",
                           keep_dir=tmp_path / "resumed")
    train_loop(_cfg(tiny_world, vcr_cache), resumed)
    assert len(resumed.history) == 1 and resumed.history[0]["epoch"] == 2
    a = load_checkpoint_file(tmp_path / "full" / "epoch-002" / "checkpoint.pt")
    b = load_checkpoint_file(tmp_path / "resumed" / "epoch-002" / "checkpoint.pt")
    assert a["step"] == b["step"] > 0
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["metrics"]["train/loss/total"] == b["metrics"]["train/loss/total"]
    assert a["metrics"]["val/id/q_a"] == b["metrics"]["val/id/q_a"]


def test_a_finished_run_restarted_reports_its_result_again(tiny_world, vcr_cache, tmp_path):
    """Tune restoring a sweep whose driver died after a trial's last report restarts that
    trial from its last checkpoint: it must report its result again (a trial that reports
    nothing fails Tune's metric check), train nothing and write no new checkpoint."""
    full = LocalRuntime(keep_dir=tmp_path / "full")
    train_loop(_cfg(tiny_world, vcr_cache), full)
    again = LocalRuntime(resume_from=tmp_path / "full" / "epoch-002", keep_dir=tmp_path / "re")
    train_loop(_cfg(tiny_world, vcr_cache), again)
    assert again.history == [full.history[-1]]
    assert again.history[0]["epoch"] == 2 and again.history[0]["score"] == full.history[-1]["score"]
    assert not (tmp_path / "re").exists()


def test_checkpoint_describes_itself(tiny_world, vcr_cache, tmp_path):
    rt = LocalRuntime(keep_dir=tmp_path)
    train_loop(_cfg(tiny_world, vcr_cache, epochs=1, seed=3), rt)
    state = load_checkpoint_file(tmp_path / "epoch-001" / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "rng", "config", "epoch", "step",
            "student_config", "metrics"} <= set(state)
    assert state["config"]["seed"] == 3 and state["config"]["distill"]["method"] == "cliptd"
    assert (tmp_path / "epoch-001" / "tokenizer").is_dir()


def test_loss_pinned_for_fixed_seed(tiny_world, vcr_cache):
    """The first epoch's loss for a fixed seed: any silent change to data order, init or
    objective shows up here."""
    runs = []
    for _ in range(2):
        rt = LocalRuntime()
        train_loop(_cfg(tiny_world, vcr_cache, epochs=1, seed=1), rt)
        runs.append(rt.history[0]["train/loss/total"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("task", ["vcr", "snli_ve", "vqa"])
def test_every_logged_metric_is_a_valid_mlflow_name(tiny_world, task, tmp_path):
    """MLflow refuses a batch over one malformed name (an empty question type once made
    val/id/qtype//acc for SNLI-VE): every key a run reports must pass its validation."""
    from mlflow.utils.validation import _validate_metric_name

    rt = LocalRuntime()
    train_loop(resolve_config({"task": task, "data": str(tiny_world.data[task]),
                               "student": str(tiny_world.student), "preset": "synthetic",
                               "epochs": 1, "batch_size": 8, "distill": {"method": "none"},
                               "eval_words": {"unseen": ["orange", "purple"]}}),
               rt)
    keys = set(rt.history[-1])
    assert any(k.startswith("val/id/") for k in keys)
    primary = {"vcr": "q_a", "snli_ve": "acc", "vqa": "vqa_acc"}[task]
    assert {f"val/id/words/unseen/{primary}", f"val/shift/words/unseen/{primary}"} <= keys
    for key in keys:
        _validate_metric_name(key)


def test_patience_stops_a_run_that_stopped_improving(tiny_world, vcr_cache, tmp_path):
    """With lr 0 the score never improves: patience 1 stops after epoch 2 of 6, and that
    epoch is scored on the whole eval split, as a last epoch is; a restart from its
    checkpoint trains no further."""
    from cliptd.training.checkpoint import CHECKPOINT_FORMAT

    cfg = _cfg(tiny_world, vcr_cache, epochs=6, patience=1, lr=1e-12, eval_limit=8,
               distill={"method": "none"})
    rt = LocalRuntime(keep_dir=tmp_path / "ck")
    train_loop(cfg, rt)
    assert [m["epoch"] for m in rt.history] == [1, 2]
    first, last = rt.history
    assert first["train/stopped_early"] == 0.0 and last["train/stopped_early"] == 1.0
    assert first["val/instances"] == 8 and last["val/instances"] > 8  # sample, then all
    assert "model/params" in last  # the end-of-run measurements of a last epoch
    state = load_checkpoint_file(tmp_path / "ck" / "epoch-002" / "checkpoint.pt",
                                 CHECKPOINT_FORMAT)
    assert state["early_stop"]["stopped"]
    again = LocalRuntime(resume_from=tmp_path / "ck" / "epoch-002", keep_dir=tmp_path / "re")
    train_loop(cfg, again)
    # no training, no checkpoint: the ended run's last result reported again, as it was
    assert again.history == [last] and not (tmp_path / "re").exists()
    with pytest.raises(ValueError, match="patience"):
        resolve_config({"patience": -1})


def test_patience_does_not_count_the_first_patience_after_epochs(tiny_world, vcr_cache,
                                                                 tmp_path):
    """A run flat from epoch 1 (lr 0) with patience 1 and patience_after 3: epochs 2 and 3 do
    not count, so it stops after epoch 4 instead of 2 (a run on its chance plateau during
    ASHA's grace period is ASHA's to judge)."""
    cfg = _cfg(tiny_world, vcr_cache, epochs=6, patience=1, patience_after=3, lr=1e-12,
               eval_limit=8, distill={"method": "none"})
    rt = LocalRuntime(keep_dir=tmp_path / "ck")
    train_loop(cfg, rt)
    assert [m["epoch"] for m in rt.history] == [1, 2, 3, 4]
    assert [m["train/stopped_early"] for m in rt.history] == [0.0, 0.0, 0.0, 1.0]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="patience_after"):
            resolve_config({"patience_after": bad})
