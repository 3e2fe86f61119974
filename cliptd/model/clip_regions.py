"""CLIP inside the model: the region encoder of the ``clip_features`` baseline.

The other way to use CLIP in a vision-language model (CLIP-ViL, Shen et al. 2021): CLIP's
image encoder supplies the visual features, so CLIP runs at inference. Here the student's
region features come from the frozen CLIP image tower instead of its own backbone: each box
(region 0 = the whole image) is cropped with RoIAlign to CLIP's input size exactly as the
teacher cache crops it (``cliptd.teacher.clip.crop_regions``), normalised with CLIP's mean / std,
encoded by the tower, and projected to the student's hidden size by a trainable linear layer
plus the box geometry and a LayerNorm, as ``cliptd.model.regions.RegionEncoder`` does.

The tower is part of the exported student: its weights are in ``student.pt`` and its
architecture in ``StudentConfig.clip``, so ``load_student`` rebuilds it with neither the
teacher folder nor open_clip's download cache.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

from cliptd.model.config import StudentConfig
from cliptd.model.regions import box_geometry
from cliptd.teacher.clip import TeacherSpec, clip_image_size, clip_mean_std


def clip_tower_config(model: nn.Module, spec: TeacherSpec, replaces: str) -> dict:
    """What rebuilds ``model.visual`` without its source: open_clip's vision config, the
    activation, the input size and normalisation. ``replaces``: the student backbone the
    tower stands in for (the architecture ``none`` exports, the inference-cost baseline)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None or "vision_cfg" not in model_cfg:
        raise ValueError(f"no open_clip config for CLIP {spec.model!r}: cannot describe its "
                         "image tower in the student's config")
    mean, std = clip_mean_std(model)
    return {
        "source": spec.describe(),
        "embed_dim": int(model_cfg["embed_dim"]),
        "vision_cfg": dict(model_cfg["vision_cfg"]),
        # a pretrained tag may switch QuickGELU on (OpenAI weights): read it off the module
        "quick_gelu": any(isinstance(m, QuickGELU) for m in model.visual.modules()),
        "image_size": clip_image_size(model),
        "mean": mean.flatten().tolist(),
        "std": std.flatten().tolist(),
        "replaces": replaces,
    }


class ClipRegionEncoder(nn.Module):
    """Frozen CLIP image tower over region crops → trainable projection to the encoder's
    region input size (``StudentConfig.region_dim``).

    Takes the images un-normalised (in [0, 1]): the crops are normalised with CLIP's own
    mean / std, not the student's ImageNet ones.
    """

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        clip = cfg.clip
        if not clip:
            raise ValueError("backbone 'clip' needs StudentConfig.clip (built by "
                             "cliptd.model.student.with_clip_regions)")
        # open_clip's own builder of CLIP's / CoCa's `visual` (plain ViT, ModifiedResNet or
        # timm tower), so any open_clip image tower's state dict loads into it
        from open_clip.model import _build_vision_tower

        self.tower = _build_vision_tower(clip["embed_dim"], clip["vision_cfg"],
                                         quick_gelu=clip["quick_gelu"])
        self.tower.requires_grad_(False).eval()
        self.clip_size = int(clip["image_size"])
        self.register_buffer("clip_mean", torch.tensor(clip["mean"]).view(1, 3, 1, 1), False)
        self.register_buffer("clip_std", torch.tensor(clip["std"]).view(1, 3, 1, 1), False)
        # trained from scratch: nothing pretrained maps CLIP's space to the student's
        self.proj = nn.Linear(clip["embed_dim"], cfg.region_dim)
        self.geometry = nn.Linear(5, cfg.region_dim)
        self.norm = nn.LayerNorm(cfg.region_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()  # frozen: no dropout, no batch-norm statistics update, ever
        return self

    @torch.no_grad()
    def clip_embeddings(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP embedding of every box crop: images N×3×S×S in [0, 1], boxes
        N×R×4 in pixels → N×R×D, the teacher cache's ``region_emb`` for the same pixels."""
        n, r, _ = boxes.shape
        rois = torch.cat([torch.arange(n, device=boxes.device, dtype=boxes.dtype)
                          .repeat_interleave(r)[:, None], boxes.reshape(-1, 4)], dim=1)
        # the crop of cliptd.teacher.clip.crop_regions, batched over images
        crops = roi_align(images.float(), rois.float(), output_size=self.clip_size,
                          spatial_scale=1.0, sampling_ratio=2, aligned=True)
        emb = self.tower((crops - self.clip_mean) / self.clip_std)
        # CLIP's embeddings are compared by cosine: their norm carries no meaning to keep
        return F.normalize(emb.float(), dim=-1).view(n, r, -1)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """images N×3×S×S in [0, 1], boxes N×R×4 in pixels of the S×S image → N×R×H."""
        emb = self.clip_embeddings(images, boxes)
        x = self.proj(emb.to(self.proj.weight.dtype))
        return self.norm(x + self.geometry(box_geometry(boxes, images.shape[-1])))


def reference_config(cfg: StudentConfig) -> StudentConfig:
    """The config ``none`` would export for this student: the clip student's own backbone
    back in place of the tower (any other student is its own reference)."""
    if cfg.backbone != "clip":
        return cfg
    return replace(cfg, backbone=cfg.clip["replaces"], clip=None)
