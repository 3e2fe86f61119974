"""The CLIP-TD objective (../shared/SPEC.md section 2), every reconstructed choice a knob.

    L = L_task + λ(step) · mean_n w_n · [ mean_{j∈S_v(n)} d(P_v h_v[j], t_v[j])
                                        + mean_{i∈S_t(n)} d(P_t h_t[i], t_t[i]) ]

(``region_weighting=confidence``: the visual mean over S_v(n) weighted by each region's
teacher confidence c_j, Σ c_j d_j / Σ c_j.)

``Distiller`` holds the projection heads P_v, P_t (training only, never exported) and
computes the bracket from the student's states and the cached teacher targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cliptd.core.config import DistillConfig


def lambda_at(cfg: DistillConfig, progress: float) -> float:
    """λ(step) with progress = step / total_steps in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "linear":
        return cfg.lam * (1 - p)
    if cfg.schedule == "cosine":
        return cfg.lam * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "warmup":
        return cfg.lam * min(1.0, p / cfg.warmup_frac) if cfg.warmup_frac > 0 else cfg.lam
    return cfg.lam


def select_tokens(relevance: torch.Tensor, valid: torch.Tensor, ratio: float, select_by: str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per instance keep the top ceil(ratio · n_valid) valid tokens → bool mask N×T."""
    if select_by == "all":
        return valid
    if select_by == "random":
        scores = torch.rand(relevance.shape, generator=generator, device="cpu").to(
            relevance.device)
    else:
        scores = relevance.float()
    scores = scores.masked_fill(~valid, float("-inf"))
    # float64 and a tolerance: in float32, 25 × 0.6 is 15.000001 and would keep 16 tokens
    k = torch.ceil(valid.sum(1).double() * ratio - 1e-9).long()  # N
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # position of each token
    return (rank < k[:, None]) & valid


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise-reduced distance over the last dim between normalized vectors."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    if kind == "cosine":
        return 1 - (a * b).sum(-1)
    if kind == "l2":
        return (a - b).pow(2).sum(-1)
    if kind == "l1":
        return (a - b).abs().sum(-1)
    return F.smooth_l1_loss(a, b, reduction="none", beta=0.1).sum(-1)


def instance_weights(cfg: DistillConfig, gold_prob: torch.Tensor,
                     correct: torch.Tensor) -> torch.Tensor:
    if cfg.weighting == "confidence":
        w = gold_prob.float()
    elif cfg.weighting == "threshold":
        w = correct.float()
    else:
        w = torch.ones_like(gold_prob, dtype=torch.float)
    if cfg.weight_norm == "batch_mean":
        w = w / w.mean().clamp(min=1e-6)
    return w


def _masked_mean(values: torch.Tensor, mask: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    m = mask.float() if weights is None else mask.float() * weights.float()
    # clamp: an instance whose selected tokens all weigh 0 contributes 0, not NaN
    return (values * m).sum(1) / m.sum(1).clamp(min=1 if weights is None else 1e-6)


class Distiller(nn.Module):
    """Projection heads + the distillation term. Training-only: dropped at export."""

    def __init__(self, hidden: int, teacher_dim: int, cfg: DistillConfig,
                 region_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.proj_v = nn.Linear(hidden, teacher_dim)
        self.proj_t = nn.Linear(hidden, teacher_dim)
        if cfg.visual_layer != "final":  # a head for the region encoder's own features
            self.proj_f = nn.Linear(region_dim or hidden, teacher_dim)

    def forward(self, region_states: torch.Tensor, text_states: torch.Tensor, targets: dict,
                progress: float, generator: torch.Generator | None = None,
                region_features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """``targets`` (for the gold row of each instance): region_emb N×R×D, region_mask,
        rel_v N×R, region_conf N×R, token_target N×L×D (per-token or pooled, already
        aligned), token_mask, rel_t N×L, gold_prob N, correct N. ``region_features``: the region encoder's
        output for each instance's image (N×R×F), for ``visual_layer`` features / both."""
        cfg = self.cfg
        lam = lambda_at(cfg, progress)
        zero = region_states.sum() * 0.0
        if lam == 0.0:
            return zero, {"distill/lambda": 0.0}
        logs = {"distill/lambda": lam}
        per_instance = torch.zeros(region_states.shape[0], device=region_states.device)
        if cfg.modalities in ("both", "visual"):
            sel_v = select_tokens(targets["rel_v"], targets["region_mask"], cfg.select_ratio_v,
                                  cfg.select_by, generator)
            d_v = 0.0
            if cfg.visual_layer in ("final", "both"):
                d_v = distance(self.proj_v(region_states), targets["region_emb"], cfg.distance)
            if cfg.visual_layer in ("features", "both"):
                d_v = d_v + distance(self.proj_f(region_features), targets["region_emb"],
                                     cfg.distance)
            conf = targets["region_conf"] if cfg.region_weighting == "confidence" else None
            visual = _masked_mean(d_v, sel_v, conf)
            per_instance = per_instance + visual
            logs["distill/visual"] = float(visual.mean().detach())
            logs["distill/frac_regions"] = float(sel_v.sum() / targets["region_mask"].sum()
                                                 .clamp(min=1))
        if cfg.modalities in ("both", "text"):
            sel_t = select_tokens(targets["rel_t"], targets["token_mask"], cfg.select_ratio_t,
                                  cfg.select_by, generator)
            d_t = distance(self.proj_t(text_states), targets["token_target"], cfg.distance)
            per_instance = per_instance + _masked_mean(d_t, sel_t)
            logs["distill/text"] = float(_masked_mean(d_t, sel_t).mean().detach())
        w = instance_weights(cfg, targets["gold_prob"], targets["correct"]).to(per_instance)
        logs["distill/weight_mean"] = float(w.mean())
        return lam * (w * per_instance).mean(), logs
