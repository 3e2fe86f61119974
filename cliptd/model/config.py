"""The student's architecture as a dataclass; shipped architectures are JSON files in ``cliptd/model_configs/student-*.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


@dataclass
class StudentConfig:
    arch: str = "visualbert"  # visualbert (single-stream) | lxmert (two-stream)
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 96
    hidden_dropout_prob: float = 0.1
    backbone: str = "tiny"  # tiny | resnet18 | resnet50 | clip (cliptd.model.clip_regions)
    backbone_weights: str | None = None  # torchvision state dict file for resnet backbones
    image_size: int = 64  # images are resized to image_size × image_size
    roi_size: int = 7
    vocab_size: int = 0  # taken from the tokenizer
    checkpoint: str | None = None  # transformers folder of a pretrained VisualBERT / LXMERT
    task_head: str = "multiple_choice"  # multiple_choice | classify | vqa
    num_outputs: int = 1  # classes (SNLI-VE: 3) or answer vocabulary size (VQA)
    # backbone=clip: the CLIP image tower's architecture and preprocessing (its weights are
    # in student.pt), from cliptd.model.clip_regions.clip_tower_config
    clip: dict | None = None

    @classmethod
    def from_name(cls, name: str, **overrides) -> StudentConfig:
        """``name`` is a shipped config (``visualbert-tiny``) or a path to a JSON file."""
        path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"student-{name}.json"
        if not path.exists():
            known = sorted(p.stem.removeprefix("student-") for p in CONFIG_DIR.glob("student-*"))
            raise ValueError(f"unknown student config {name!r}; shipped: {known}")
        data = json.loads(path.read_text())
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"{path}: unknown student config keys {sorted(unknown)}")
        return cls(**{**data, **overrides})
