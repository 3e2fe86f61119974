"""The student: an existing vision-language encoder (VisualBERT or LXMERT from transformers)
over text tokens and image-region tokens, with its own region-feature backbone and task head.

Nothing here knows about distillation: this module is the whole exported model. The one
place CLIP can enter is ``backbone="clip"`` (the ``clip_features`` baseline): a frozen CLIP
image tower as the region backbone (``cliptd.model.clip_regions``), exported with the student.
Architectures are small JSON files in ``cliptd/model_configs/student-*.json`` mapped onto
``StudentConfig``; a user's own checkpoint is a transformers folder (``checkpoint``).

``StudentOutput`` is the thin adapter contract the objective needs: text states, region
states and the pooled state, whatever the architecture.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
from transformers import (
    LxmertConfig,
    LxmertModel,
    PreTrainedTokenizerFast,
    VisualBertConfig,
    VisualBertModel,
)

from cliptd.model.clip_regions import clip_tower_config
from cliptd.model.config import StudentConfig, read_checkpoint_config
from cliptd.model.regions import RegionEncoder
from cliptd.model.tokenizers import load_checkpoint_tokenizer
from cliptd.teacher.clip import TeacherSpec

# VisualBERT warns on every forward in which a region has no aligned word (the usual case);
# the division it guards is handled, so the warning is noise.
logging.getLogger("transformers.models.visual_bert.modeling_visual_bert").setLevel(logging.ERROR)


@dataclass
class StudentOutput:
    text_states: torch.Tensor  # N × L × H
    region_states: torch.Tensor  # N × R × H
    pooled: torch.Tensor  # N × H
    logits: torch.Tensor = field(default=None)  # task head output
    region_features: torch.Tensor = field(default=None)  # images × R × region_dim


class VLStudent(nn.Module):
    """VisualBERT or LXMERT + region encoder + task head. Inputs are flattened sequences:
    N = batch × candidates rows; the region features are computed once per image and
    repeated for each candidate row (``image_index`` maps rows to images).
    """

    IMAGE_MEAN = (0.485, 0.456, 0.406)
    IMAGE_STD = (0.229, 0.224, 0.225)

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "clip":
            from cliptd.model.clip_regions import ClipRegionEncoder

            self.regions = ClipRegionEncoder(cfg)
        else:
            self.regions = RegionEncoder(cfg)
        self.encoder = build_encoder(cfg)
        hidden = self.encoder.config.hidden_size
        if cfg.hidden_size != hidden:
            raise ValueError(f"student hidden_size {cfg.hidden_size} != checkpoint's {hidden}")
        # region features reach the words that refer to them at the encoder's hidden size
        self.ground = nn.Identity() if cfg.region_dim == hidden else nn.Linear(
            cfg.region_dim, hidden)
        if cfg.task_head == "multiple_choice":
            self.head = nn.Sequential(nn.Dropout(cfg.hidden_dropout_prob), nn.Linear(hidden, 1))
        elif cfg.task_head in ("classify", "vqa"):
            self.head = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                      nn.LayerNorm(2 * hidden), nn.Linear(2 * hidden,
                                                                          cfg.num_outputs))
        else:
            raise ValueError(f"unknown task head {cfg.task_head!r}")
        self.register_buffer("mean", torch.tensor(self.IMAGE_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(self.IMAGE_STD).view(1, 3, 1, 1), False)

    def region_features(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if self.cfg.backbone == "clip":  # normalises its crops with CLIP's own mean / std
            return self.regions(images, boxes)
        return self.regions((images - self.mean) / self.std, boxes)

    def encode(self, input_ids, attention_mask, token_regions, image_index, region_feats,
               region_mask, box_geometry, token_type_ids=None) -> StudentOutput:
        vis = region_feats[image_index]
        vmask = region_mask[image_index].long()
        L = input_ids.shape[1]
        # Grounding, as VL-BERT and R2C do: a word that refers to a region ("[2]" rendered
        # as "square") carries that region's feature in its input embedding. Passed through
        # the models' own ``inputs_embeds`` input: the architectures are unchanged.
        emb = self.encoder.embeddings.word_embeddings(input_ids)
        ground = torch.gather(vis, 1, token_regions.clamp(min=0)[..., None].expand(
            -1, -1, vis.shape[-1]))
        ground = self.ground(ground)
        segments = token_type_ids if self.cfg.segments else None
        emb = emb + ground * (token_regions >= 0)[..., None].to(emb.dtype)
        if self.cfg.arch == "visualbert":
            # VisualBERT's own grounding too: a region gets the position embedding of the
            # words that refer to it (image_text_alignment).
            R = vis.shape[1]
            pos = torch.arange(L, device=input_ids.device).expand_as(token_regions)
            match = token_regions[:, None, :] == torch.arange(R, device=input_ids.device)[
                None, :, None]
            alignment = torch.where(match, pos[:, None, :], torch.full_like(match, -1,
                                                                             dtype=torch.long))
            k = int(match.sum(-1).max().clamp(min=1))
            alignment = alignment.sort(dim=-1, descending=True).values[..., :k]
            out = self.encoder(inputs_embeds=emb, attention_mask=attention_mask,
                               token_type_ids=segments, visual_embeds=vis,
                               visual_attention_mask=vmask, image_text_alignment=alignment)
            seq = out.last_hidden_state
            return StudentOutput(seq[:, :L], seq[:, L:], out.pooler_output)
        out = self.encoder(inputs_embeds=emb, attention_mask=attention_mask,
                           token_type_ids=segments, visual_feats=vis,
                           visual_pos=box_geometry[image_index], visual_attention_mask=vmask)
        return StudentOutput(out.language_output, out.vision_output, out.pooled_output)

    def forward(self, batch: dict) -> StudentOutput:
        """``batch``: images, boxes, region_mask, input_ids, attention_mask, token_regions,
        image_index (see ``cliptd.data.problems.Collator``)."""
        feats = self.region_features(batch["images"], batch["boxes"])
        out = self.encode(batch["input_ids"], batch["attention_mask"], batch["token_regions"],
                          batch["image_index"], feats, batch["region_mask"],
                          batch["boxes"] / batch["images"].shape[-1],
                          batch.get("token_type_ids"))
        out.logits = self.head(out.pooled)
        out.region_features = feats
        return out

    def scores(self, out: StudentOutput, num_candidates: int) -> torch.Tensor:
        """Task logits: B×C for multiple choice (one row per candidate), else B×K."""
        if self.cfg.task_head == "multiple_choice":
            return out.logits.view(-1, num_candidates)
        return out.logits


ENCODER_CLASSES = {"visualbert": (VisualBertModel, VisualBertConfig),
                   "lxmert": (LxmertModel, LxmertConfig)}


def build_encoder(cfg: StudentConfig) -> nn.Module:
    """The transformers encoder: loaded from ``cfg.checkpoint`` (a downloaded folder or an
    export), else built from ``cfg.encoder_config`` (a checkpoint's own config: the weights
    then come from a cliptd checkpoint), else from the small-config fields."""
    if cfg.arch not in ENCODER_CLASSES:
        raise ValueError(f"unknown student arch {cfg.arch!r} ({', '.join(ENCODER_CLASSES)})")
    model_cls, config_cls = ENCODER_CLASSES[cfg.arch]
    if cfg.checkpoint:
        from transformers.utils import logging as hf_logging

        # the checkpoint's pre-training / task heads (cls.*, obj_predict_head.*) are left
        # out on purpose: transformers' table of them is noise; missing weights are not
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            encoder, info = model_cls.from_pretrained(cfg.checkpoint, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(level)
        if info["missing_keys"] or info.get("mismatched_keys"):
            raise ValueError(f"{cfg.checkpoint}: weights do not fit its config.json "
                             f"(missing {sorted(info['missing_keys'])[:5]}, mismatched "
                             f"{[k for k, *_ in info.get('mismatched_keys', [])][:5]})")
        return encoder
    if cfg.encoder_config:
        return model_cls(config_cls.from_dict(cfg.encoder_config))
    common = dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                  intermediate_size=cfg.intermediate_size,
                  hidden_dropout_prob=cfg.hidden_dropout_prob,
                  attention_probs_dropout_prob=cfg.hidden_dropout_prob,
                  vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings)
    if cfg.arch == "visualbert":
        return model_cls(config_cls(**common, num_hidden_layers=cfg.num_hidden_layers,
                                    visual_embedding_dim=cfg.region_dim))
    layers = max(1, cfg.num_hidden_layers)
    return model_cls(config_cls(**common, l_layers=layers, x_layers=layers, r_layers=1,
                                visual_feat_dim=cfg.region_dim, visual_pos_dim=4))


def save_student(model: VLStudent, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """Export: the student alone — no teacher, no loss heads — as a transformers folder.

    The encoder is ``save_pretrained`` into the folder itself (``config.json`` +
    ``model.safetensors``: ``AutoModel.from_pretrained(folder)`` loads it, and so does
    ``AutoTokenizer`` the tokenizer saved beside it); the region encoder, the grounding
    projection and the task head are ``student.pt`` (a ``clip`` backbone's frozen CLIP tower
    too), described by ``student_config.json``. ``load_student`` rebuilds the whole
    student from the folder alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = replace(model.cfg, checkpoint=None)  # the folder holds the encoder itself
    model.encoder.save_pretrained(folder)
    (folder / "student_config.json").write_text(json.dumps(
        {"student": asdict(cfg), "source_checkpoint": model.cfg.checkpoint, **(extra or {})},
        indent=2))
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")},
               folder / "student.pt")
    tokenizer.save_pretrained(folder)


def load_student(folder: Path, **overrides) -> tuple[VLStudent, PreTrainedTokenizerFast]:
    """Load an exported student; ``overrides`` may swap the task head (pretrained → task).

    Reads both layouts: the transformers folder ``save_student`` writes, and the earlier
    one (every weight in ``student.pt``, the tokenizer in ``tokenizer/``)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    cfg = StudentConfig(**json.loads((folder / "student_config.json").read_text())["student"])
    head_changed = any(getattr(cfg, k) != v for k, v in overrides.items())
    for k, v in overrides.items():
        setattr(cfg, k, v)
    transformers_layout = (folder / "config.json").exists()
    if transformers_layout:
        cfg.checkpoint = str(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
    model = VLStudent(cfg)
    cfg.checkpoint = None  # the weights are the student's own now, not the folder's
    state = torch.load(folder / "student.pt", map_location="cpu", weights_only=True)
    if head_changed:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("head.")
           and not (transformers_layout and k.startswith("encoder."))] + list(unexpected)
    if bad:
        raise ValueError(f"{folder}/student.pt does not match its config: {bad[:5]}")
    return model, tokenizer


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_clip_regions(student: VLStudent, clip_model: nn.Module,
                      spec: TeacherSpec) -> VLStudent:
    """The student with its region backbone swapped for ``clip_model``'s frozen image tower.

    As CLIP-ViL swaps CLIP's features into a pre-trained vision-language model, the student
    keeps its pre-trained transformer (and task head); only the region projection is new.
    """
    # a clip student (re-fine-tuned from a clip_features export) gets the new tower in place
    # of its old one; the backbone it replaces stays the original student's
    replaces = student.cfg.clip["replaces"] if student.cfg.backbone == "clip" \
        else student.cfg.backbone
    cfg = replace(student.cfg, backbone="clip", backbone_weights=None,
                  clip=clip_tower_config(clip_model, spec, replaces=replaces))
    out = VLStudent(cfg)
    kept = {k: v for k, v in student.state_dict().items() if not k.startswith("regions.")}
    missing, unexpected = out.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith("regions.") for k in missing):
        raise RuntimeError(f"clip student does not match its source: {unexpected or missing}")
    out.regions.tower.load_state_dict(clip_model.visual.state_dict())  # strict
    return out.train(student.training)


def student_kind(ref: str) -> str:
    """What ``--student`` names: a cliptd ``export`` (``student_config.json``), a downloaded
    VisualBERT / LXMERT ``checkpoint`` folder (``config.json``), or a shipped / JSON student
    ``config`` trained from scratch."""
    path = Path(ref)
    if (path / "student_config.json").exists():
        return "export"
    if path.is_dir() or ("/" in ref and not ref.endswith(".json")):
        return "checkpoint"  # a folder, or a path to one that is not there (refused then)
    return "config"


def open_student(ref: str, *, task_head: str, num_outputs: int, tokenizer: str | None = None,
                 student_config: str | None = None, words=None):
    """The student a run fine-tunes and its tokenizer.

    - a cliptd export: loaded whole, its task head replaced by the run's;
    - a downloaded checkpoint: its encoder and tokenizer (``tokenizer``: a folder, when the
      checkpoint ships none), region backbone and image size from ``student_config``;
    - a student config: from scratch, with a word vocabulary over ``words()``."""
    kind = student_kind(ref)
    if kind != "checkpoint" and tokenizer:
        raise ValueError(f"--tokenizer is for a downloaded checkpoint; {ref} is a "
                         f"{'cliptd export with its own' if kind == 'export' else 'student config'}")
    if kind == "export":
        return load_student(Path(ref), task_head=task_head, num_outputs=num_outputs)
    if kind == "checkpoint":
        base = StudentConfig.from_name(student_config or "visualbert-tiny")
        cfg = StudentConfig.from_checkpoint(ref, base, task_head=task_head,
                                            num_outputs=num_outputs)
        tok = load_checkpoint_tokenizer(Path(ref), tokenizer, cfg.vocab_size)
        return VLStudent(cfg), tok
    from cliptd.model.tokenizers import build_word_tokenizer

    tok = build_word_tokenizer(words() if words else [])
    return VLStudent(StudentConfig.from_name(ref, vocab_size=len(tok), task_head=task_head,
                                             num_outputs=num_outputs)), tok


def check_student(ref: str, tokenizer: str | None = None,
                  student_config: str | None = None) -> str:
    """Refuse a student that cannot work, before anything starts (no weights are loaded):
    returns its kind, or raises ValueError naming the file and field."""
    kind = student_kind(ref)
    if kind == "checkpoint":
        enc = read_checkpoint_config(Path(ref))
        load_checkpoint_tokenizer(Path(ref), tokenizer, enc["vocab_size"])
        StudentConfig.from_name(student_config or "visualbert-tiny")
    elif tokenizer:
        raise ValueError(f"--tokenizer is for a downloaded checkpoint, not {ref}")
    elif kind == "config":
        StudentConfig.from_name(ref)
    return kind
