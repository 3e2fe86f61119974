"""Self-describing checkpoints: every RNG's state, loading that refuses anything foreign, and
the one export of a student from a checkpoint (fine-tuning's and pre-training's alike).

A checkpoint folder holds ``checkpoint.pt`` (a dict with ``format``, ``model``,
``student_config``, ``config``, optimizer and RNG states, ...) and ``tokenizer/``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from cliptd.core.atomic import atomic_dir
from cliptd.model.config import StudentConfig
from cliptd.model.student import VLStudent, save_student

CHECKPOINT_FORMAT = "cliptd-checkpoint-v1"
PRETRAIN_FORMAT = "cliptd-pretrain-checkpoint-v1"


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


def export_student(checkpoint: Path, out_dir: Path, fmt: str, extra) -> dict:
    """Write the student alone (config, weights, tokenizer: no teacher, no projection or
    pre-training heads) from a checkpoint folder to ``out_dir``, atomically.

    ``extra(state, folder)`` gives the fields recorded beside the student's config and may
    write more files into the (temporary) export folder. Returns the checkpoint's state."""
    from transformers import PreTrainedTokenizerFast

    checkpoint = Path(checkpoint)
    state = load_checkpoint_file(checkpoint / "checkpoint.pt", fmt)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint / "tokenizer")
    cfg = StudentConfig(**state["student_config"])
    if cfg.encoder_config:  # the weights are in the checkpoint: no need of the source folder
        cfg.checkpoint = None
    student = VLStudent(cfg)
    student.load_state_dict({k.removeprefix("student."): v for k, v in state["model"].items()
                             if k.startswith("student.")})
    with atomic_dir(Path(out_dir)) as tmp:
        save_student(student.eval(), tokenizer, tmp, extra=extra(state, tmp))
    return state


def export_best(result, out_dir: Path) -> Path:
    """The fine-tuned student from a Ray Train result's best checkpoint (by ``score``)."""
    return export_finetuned(
        result.get_best_checkpoint(metric="score", mode="max") or result.checkpoint, out_dir)


def export_finetuned(checkpoint, out_dir: Path) -> Path:
    """The fine-tuned student from a Ray (Train or Tune) checkpoint, wherever it is stored,
    with the metrics and config of the epoch it was saved at."""
    with checkpoint.as_directory() as d:
        export_student(Path(d), out_dir, CHECKPOINT_FORMAT, lambda state, _: {
            "metrics": state["metrics"], "config": state["config"]})
    return Path(out_dir)


def export_pretrained(checkpoint: Path, out_dir: Path) -> Path:
    """The pretrained student from a pre-training checkpoint folder, with its
    ``pretrain.json`` (config, steps, metric history)."""
    def extra(state: dict, folder: Path) -> dict:
        (folder / "pretrain.json").write_text(json.dumps(
            {"config": state["config"], "steps": state["step"], "history": state["history"]},
            indent=2))
        return {"pretrain": state["config"], "corpus": state["corpus"]}

    export_student(checkpoint, out_dir, PRETRAIN_FORMAT, extra)
    return Path(out_dir)
