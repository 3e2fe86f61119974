"""The CLIP-TD objective (../shared/SPEC.md section 2), every reconstructed choice a knob.

    L = L_task + λ(step) · mean_n w_n · [ mean_{j∈S_v(n)} d(P_v h_v[j], t_v[j])
                                        + mean_{i∈S_t(n)} d(P_t h_t[i], t_t[i]) ]

``Distiller`` holds the projection heads P_v, P_t (training only, never exported) and
computes the bracket from the student's states and the cached teacher targets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("none", "naive", "cliptd")
CHOICES = {
    "method": METHODS,
    "select_by": ("relevance", "random", "all"),
    "weighting": ("confidence", "threshold", "uniform"),
    "weight_norm": ("none", "batch_mean"),
    "schedule": ("constant", "linear", "cosine", "warmup"),
    "distance": ("cosine", "l2", "l1", "smooth_l1"),
    "text_target": ("pooled", "tokens"),
    "modalities": ("both", "visual", "text"),
}


@dataclass(frozen=True)
class DistillConfig:
    method: str = "cliptd"
    select_by: str = "relevance"
    select_ratio_v: float = 0.5  # ρ for region tokens
    select_ratio_t: float = 0.5  # ρ for text tokens
    weighting: str = "confidence"
    # Confidence weights average well below 1 with a mediocre teacher, which silently
    # shrinks λ; "batch_mean" rescales them to mean 1 so λ keeps its meaning.
    weight_norm: str = "batch_mean"
    lam: float = 1.0
    schedule: str = "constant"
    warmup_frac: float = 0.1  # for schedule=warmup: share of steps ramping λ up
    distance: str = "cosine"
    text_target: str = "pooled"
    modalities: str = "both"

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"distill.{name}={getattr(self, name)!r}; choose from {allowed}")
        for name in ("select_ratio_v", "select_ratio_t"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"distill.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.lam < 0 or not 0 <= self.warmup_frac < 1:
            raise ValueError("distill.lam must be >= 0 and distill.warmup_frac in [0, 1)")

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown distill knobs {sorted(unknown)}; known: {sorted(allowed)}")
        return cls(**data).resolved()

    def resolved(self) -> DistillConfig:
        """Apply the method presets: ``none`` has no teacher term, ``naive`` distils every
        token with uniform weight and constant λ, ``cliptd`` uses the knobs as given."""
        if self.method == "naive":
            return replace(self, select_by="all", weighting="uniform", schedule="constant",
                           weight_norm="none")
        if self.method == "none":
            return replace(self, lam=0.0)
        return self

    def as_dict(self) -> dict:
        return asdict(self)


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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return (values * m).sum(1) / m.sum(1).clamp(min=1)


class Distiller(nn.Module):
    """Projection heads + the distillation term. Training-only: dropped at export."""

    def __init__(self, hidden: int, teacher_dim: int, cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.proj_v = nn.Linear(hidden, teacher_dim)
        self.proj_t = nn.Linear(hidden, teacher_dim)

    def forward(self, region_states: torch.Tensor, text_states: torch.Tensor, targets: dict,
                progress: float, generator: torch.Generator | None = None) -> tuple[
                    torch.Tensor, dict]:
        """``targets`` (for the gold row of each instance): region_emb N×R×D, region_mask,
        rel_v N×R, token_target N×L×D (per-token or pooled, already aligned), token_mask,
        rel_t N×L, gold_prob N, correct N."""
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
            d_v = distance(self.proj_v(region_states), targets["region_emb"], cfg.distance)
            per_instance = per_instance + _masked_mean(d_v, sel_v)
            logs["distill/visual"] = float(_masked_mean(d_v, sel_v).mean().detach())
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
