"""Learning-rate schedules, as multipliers of the base rate per optimizer step.

One place for every loop's schedule: fine-tuning warms up then decays linearly to zero;
the two pre-trainings (the tiny teacher's, the student's) warm up then follow a cosine.
"""

from __future__ import annotations

import math


def warmup_linear(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    return lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))


def warmup_cosine(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then a half cosine to 0 at ``total``."""
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(
        math.pi * min(1.0, s / total)))


def lr_scheduler(optimizer, schedule):
    """``torch``'s ``LambdaLR`` over one of the schedules above."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
