"""Distillation knobs for the tests of the objective's mechanics.

The tests were written on the defaults before the platform's sweeps chose them (issue 19,
``cliptd.sweep.defaults``); they keep those knobs explicitly, so that their numbers (a pinned
loss, a head count) test the mechanics whatever the defaults become."""

from __future__ import annotations

from cliptd.core.config import DistillConfig

PRE_SWEEP = dict(select_ratio_v=0.5, select_ratio_t=0.5, weighting="confidence",
                 weight_norm="batch_mean", lam=1.0, schedule="constant", distance="cosine",
                 text_target="pooled", modalities="both", visual_layer="final",
                 region_weighting="uniform")


def knobs(**kw) -> DistillConfig:
    return DistillConfig(**{**PRE_SWEEP, **kw})
