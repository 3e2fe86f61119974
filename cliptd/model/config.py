"""The student's architecture as a dataclass; shipped architectures are JSON files in ``cliptd/model_configs/student-*.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

# Shipped inside the package (the wheel holds them too), read through importlib.resources.
CONFIG_DIR = resources.files("cliptd") / "model_configs"
# transformers ``model_type`` → the student architecture that wraps it
ARCHS = {"visual_bert": "visualbert", "lxmert": "lxmert"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# what every checkpoint's config.json must give, per model type
REQUIRED = {"visual_bert": ("hidden_size", "num_hidden_layers", "num_attention_heads",
                            "intermediate_size", "max_position_embeddings", "vocab_size",
                            "visual_embedding_dim"),
            "lxmert": ("hidden_size", "l_layers", "x_layers", "r_layers",
                       "num_attention_heads", "intermediate_size", "max_position_embeddings",
                       "vocab_size", "visual_feat_dim", "visual_pos_dim")}


def read_checkpoint_config(folder: Path) -> dict:
    """A downloaded VisualBERT / LXMERT folder's ``config.json``, checked: a folder that is
    no such checkpoint, or lacks its weights, is refused naming the file and the field."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such student folder")
    if not path.exists():
        raise ValueError(f"{folder}: not a student checkpoint (no config.json, and no "
                         "student_config.json of a cliptd export)")
    try:
        enc = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    kind = enc.get("model_type") if isinstance(enc, dict) else None
    if kind not in ARCHS:
        raise ValueError(f"{path}: field 'model_type' is {kind!r}: not a VisualBERT or LXMERT "
                         f"checkpoint (expected one of {sorted(ARCHS)})")
    # transformers' defaults fill fields an old config.json leaves out (VisualBERT's
    # visual_embedding_dim defaults to 512, as its VCR checkpoints use)
    from transformers import AutoConfig

    full = AutoConfig.from_pretrained(folder).to_dict()
    missing = [k for k in REQUIRED[kind] if k not in full]
    if missing:
        raise ValueError(f"{path}: lacks field(s) {missing}")
    if kind == "lxmert" and full["visual_pos_dim"] != 4:
        raise ValueError(f"{path}: field 'visual_pos_dim' is {full['visual_pos_dim']}; the "
                         "student feeds LXMERT 4 box coordinates (x1, y1, x2, y2)")
    if not any((folder / w).exists() for w in WEIGHT_FILES):
        raise ValueError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")
    return full


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
    # the encoder's own transformers config (``config.to_dict()``) when it came from a
    # checkpoint: rebuilds the same architecture from a checkpoint file alone
    encoder_config: dict | None = None
    # the region features the encoder takes (VisualBERT ``visual_embedding_dim``, LXMERT
    # ``visual_feat_dim``: a detector's 512 / 1024 / 2048); 0 = hidden_size
    visual_dim: int = 0
    # BERT's segment embeddings (query A, candidate B), as the checkpoint was pretrained
    # with; the students pre-trained here never used them
    segments: bool = False
    task_head: str = "multiple_choice"  # multiple_choice | classify | vqa
    num_outputs: int = 1  # classes (SNLI-VE: 3) or answer vocabulary size (VQA)
    # backbone=clip: the CLIP image tower's architecture and preprocessing (its weights are
    # in student.pt), from cliptd.model.clip_regions.clip_tower_config
    clip: dict | None = None

    @property
    def region_dim(self) -> int:
        """The size of the region features the backbone emits and the encoder takes."""
        return self.visual_dim or self.hidden_size

    @classmethod
    def from_checkpoint(cls, folder: str | Path, base: StudentConfig | None = None,
                        **overrides) -> StudentConfig:
        """A pretrained VisualBERT / LXMERT folder as downloaded (``config.json`` + weights):
        the encoder's shape from its ``config.json``; the region backbone, image size and
        RoI size from ``base`` (a shipped or JSON student config)."""
        folder = Path(folder)
        enc = read_checkpoint_config(folder)
        kind = enc["model_type"]
        base = base or cls()
        fields_from = {
            "arch": ARCHS[kind], "hidden_size": enc["hidden_size"],
            "num_attention_heads": enc["num_attention_heads"],
            "intermediate_size": enc["intermediate_size"],
            "max_position_embeddings": enc["max_position_embeddings"],
            "hidden_dropout_prob": enc.get("hidden_dropout_prob", base.hidden_dropout_prob),
            "vocab_size": enc["vocab_size"], "checkpoint": str(folder.resolve()),
            "encoder_config": enc, "segments": True,
            "visual_dim": enc["visual_embedding_dim"] if kind == "visual_bert"
            else enc["visual_feat_dim"],
            "num_hidden_layers": enc["num_hidden_layers"] if kind == "visual_bert"
            else enc["l_layers"]}
        return cls(**{**asdict(base), **fields_from, **overrides})

    @classmethod
    def from_name(cls, name: str, **overrides) -> StudentConfig:
        """``name`` is a shipped config (``visualbert-tiny``) or a path to a JSON file."""
        path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"student-{name}.json"
        if not path.is_file():
            known = sorted(p.name.removeprefix("student-").removesuffix(".json")
                           for p in CONFIG_DIR.iterdir()
                           if p.name.startswith("student-") and p.name.endswith(".json"))
            raise ValueError(f"unknown student config {name!r}; shipped: {known}")
        data = json.loads(path.read_text())
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"{path}: unknown student config keys {sorted(unknown)}")
        return cls(**{**data, **overrides})
