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
from cliptd.model.config import StudentConfig
from cliptd.model.regions import RegionEncoder
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
        common = dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                      intermediate_size=cfg.intermediate_size,
                      hidden_dropout_prob=cfg.hidden_dropout_prob,
                      attention_probs_dropout_prob=cfg.hidden_dropout_prob,
                      vocab_size=cfg.vocab_size)
        if cfg.arch == "visualbert":
            if cfg.checkpoint:
                self.encoder = VisualBertModel.from_pretrained(cfg.checkpoint)
            else:
                self.encoder = VisualBertModel(VisualBertConfig(
                    **common, num_hidden_layers=cfg.num_hidden_layers,
                    max_position_embeddings=cfg.max_position_embeddings,
                    visual_embedding_dim=cfg.hidden_size))
        elif cfg.arch == "lxmert":
            if cfg.checkpoint:
                self.encoder = LxmertModel.from_pretrained(cfg.checkpoint)
            else:
                layers = max(1, cfg.num_hidden_layers)
                self.encoder = LxmertModel(LxmertConfig(
                    **common, l_layers=layers, x_layers=layers, r_layers=1,
                    max_position_embeddings=cfg.max_position_embeddings,
                    visual_feat_dim=cfg.hidden_size, visual_pos_dim=4))
        else:
            raise ValueError(f"unknown student arch {cfg.arch!r} (visualbert, lxmert)")
        hidden = self.encoder.config.hidden_size
        if cfg.hidden_size != hidden:
            raise ValueError(f"student hidden_size {cfg.hidden_size} != checkpoint's {hidden}")
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
               region_mask, box_geometry) -> StudentOutput:
        vis = region_feats[image_index]
        vmask = region_mask[image_index].long()
        L = input_ids.shape[1]
        # Grounding, as VL-BERT and R2C do: a word that refers to a region ("[2]" rendered
        # as "square") carries that region's feature in its input embedding. Passed through
        # the models' own ``inputs_embeds`` input: the architectures are unchanged.
        emb = self.encoder.embeddings.word_embeddings(input_ids)
        ground = torch.gather(vis, 1, token_regions.clamp(min=0)[..., None].expand(
            -1, -1, vis.shape[-1]))
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
                               visual_embeds=vis, visual_attention_mask=vmask,
                               image_text_alignment=alignment)
            seq = out.last_hidden_state
            return StudentOutput(seq[:, :L], seq[:, L:], out.pooler_output)
        out = self.encoder(inputs_embeds=emb, attention_mask=attention_mask, visual_feats=vis,
                           visual_pos=box_geometry[image_index],
                           visual_attention_mask=vmask)
        return StudentOutput(out.language_output, out.vision_output, out.pooled_output)

    def forward(self, batch: dict) -> StudentOutput:
        """``batch``: images, boxes, region_mask, input_ids, attention_mask, token_regions,
        image_index (see ``cliptd.data.problems.Collator``)."""
        feats = self.region_features(batch["images"], batch["boxes"])
        out = self.encode(batch["input_ids"], batch["attention_mask"], batch["token_regions"],
                          batch["image_index"], feats, batch["region_mask"],
                          batch["boxes"] / batch["images"].shape[-1])
        out.logits = self.head(out.pooled)
        return out

    def scores(self, out: StudentOutput, num_candidates: int) -> torch.Tensor:
        """Task logits: B×C for multiple choice (one row per candidate), else B×K."""
        if self.cfg.task_head == "multiple_choice":
            return out.logits.view(-1, num_candidates)
        return out.logits


def save_student(model: VLStudent, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """Export: the student alone (config, weights, tokenizer) — no teacher, no loss heads.
    A ``clip`` backbone's CLIP image tower is part of the student, so it is exported too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "student_config.json").write_text(json.dumps(
        {"student": asdict(model.cfg), **(extra or {})}, indent=2))
    torch.save(model.state_dict(), folder / "student.pt")
    tokenizer.save_pretrained(folder / "tokenizer")


def load_student(folder: Path, **overrides) -> tuple[VLStudent, PreTrainedTokenizerFast]:
    """Load an exported student; ``overrides`` may swap the task head (pretrained → task)."""
    folder = Path(folder)
    cfg = StudentConfig(**json.loads((folder / "student_config.json").read_text())["student"])
    head_changed = any(getattr(cfg, k) != v for k, v in overrides.items())
    for k, v in overrides.items():
        setattr(cfg, k, v)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
    model = VLStudent(cfg)
    state = torch.load(folder / "student.pt", map_location="cpu", weights_only=True)
    if head_changed:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
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
