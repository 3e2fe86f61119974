"""The student: an existing vision-language encoder (VisualBERT or LXMERT from transformers)
over text tokens and image-region tokens, with its own region-feature backbone and task head.

Nothing here knows about distillation: this module is the whole exported model. The one
place CLIP can enter is ``backbone="clip"`` (the ``clip_features`` baseline): a frozen CLIP
image tower as the region backbone (``cliptd.clip_regions``), exported with the student.
Architectures are small JSON files in ``cliptd/model_configs/student-*.json`` mapped onto
``StudentConfig``; a user's own checkpoint is a transformers folder (``checkpoint``).

``StudentOutput`` is the thin adapter contract the objective needs: text states, region
states and the pooled state, whatever the architecture.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import roi_align
from transformers import (
    LxmertConfig,
    LxmertModel,
    PreTrainedTokenizerFast,
    VisualBertConfig,
    VisualBertModel,
)

CONFIG_DIR = Path(__file__).parent / "model_configs"
# VisualBERT warns on every forward in which a region has no aligned word (the usual case);
# the division it guards is handled, so the warning is noise.
logging.getLogger("transformers.models.visual_bert.modeling_visual_bert").setLevel(logging.ERROR)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class StudentConfig:
    arch: str = "visualbert"  # visualbert (single-stream) | lxmert (two-stream)
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 96
    hidden_dropout_prob: float = 0.1
    backbone: str = "tiny"  # tiny | resnet18 | resnet50 | clip (cliptd.clip_regions)
    backbone_weights: str | None = None  # torchvision state dict file for resnet backbones
    image_size: int = 64  # images are resized to image_size × image_size
    roi_size: int = 7
    vocab_size: int = 0  # taken from the tokenizer
    checkpoint: str | None = None  # transformers folder of a pretrained VisualBERT / LXMERT
    task_head: str = "multiple_choice"  # multiple_choice | classify | vqa
    num_outputs: int = 1  # classes (SNLI-VE: 3) or answer vocabulary size (VQA)
    # backbone=clip: the CLIP image tower's architecture and preprocessing (its weights are
    # in student.pt), from cliptd.clip_regions.clip_tower_config
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


@dataclass
class StudentOutput:
    text_states: torch.Tensor  # N × L × H
    region_states: torch.Tensor  # N × R × H
    pooled: torch.Tensor  # N × H
    logits: torch.Tensor = field(default=None)  # task head output


def box_geometry(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Boxes N×R×4 in pixels of a size×size image → N×R×5: corners in [0, 1] and area."""
    b = boxes / size
    return torch.cat([b, ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[..., None]], -1)


class RegionEncoder(nn.Module):
    """Region features: a CNN trunk, RoIAlign over the boxes, a head, plus box geometry.

    The tiny trunk stops at stride 2 and RoIAlign samples 7×7 cells, so a 12 px object still
    spans several cells (a stride-4 trunk with a 3×3 RoI could not tell shapes apart in the
    feasibility study).
    """

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.roi_size = cfg.roi_size
        if cfg.backbone == "tiny":
            def block(i, o, s):
                return [nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.ReLU(inplace=True)]
            self.trunk = nn.Sequential(*block(3, 32, 2), *block(32, 64, 1))
            self.scale, trunk_out = 0.5, 64
            self.head = nn.Sequential(*block(64, 128, 1), *block(128, 128, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            head_out = 128
        elif cfg.backbone in ("resnet18", "resnet50"):
            net = getattr(torchvision.models, cfg.backbone)(weights=None)
            if cfg.backbone_weights:
                net.load_state_dict(torch.load(cfg.backbone_weights, map_location="cpu",
                                               weights_only=True))
            self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1,
                                       net.layer2, net.layer3)
            self.scale, trunk_out = 1 / 16, net.layer3[-1].conv1.in_channels
            self.head = nn.Sequential(net.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            head_out = net.fc.in_features
            del trunk_out
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r} (tiny, resnet18, resnet50, "
                             "clip)")
        self.proj = nn.Linear(head_out, cfg.hidden_size)
        self.geometry = nn.Linear(5, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """images N×3×S×S (normalized), boxes N×R×4 in pixels of the S×S image → N×R×H."""
        n, r, _ = boxes.shape
        feats = self.trunk(images)
        rois = torch.cat([torch.arange(n, device=boxes.device, dtype=boxes.dtype)
                          .repeat_interleave(r)[:, None], boxes.reshape(-1, 4)], dim=1)
        pooled = roi_align(feats, rois, self.roi_size, spatial_scale=self.scale,
                           sampling_ratio=2, aligned=True)
        x = self.proj(self.head(pooled)).view(n, r, -1)
        return self.norm(x + self.geometry(box_geometry(boxes, images.shape[-1])))


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
            from cliptd.clip_regions import ClipRegionEncoder  # imports this module

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
        image_index (see ``cliptd.dataset.collate``)."""
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


# ---------------------------------------------------------------------------------------
# Tokenizer and export.


def build_word_tokenizer(words, max_length: int = 64) -> PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer over a closed vocabulary (the synthetic world's).

    Real students bring their own WordPiece tokenizer in their checkpoint folder.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)


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


def resize_boxes(boxes: torch.Tensor, width: int, height: int, size: int) -> torch.Tensor:
    scale = boxes.new_tensor([size / width, size / height, size / width, size / height])
    return boxes * scale
