"""bench/answer_prior.py: the text-only floor that per-type accuracy is compared with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "answer_prior", Path(__file__).parents[2] / "bench" / "answer_prior.py")
answer_prior = importlib.util.module_from_spec(spec)
spec.loader.exec_module(answer_prior)


def _row(qtype, candidates, label):
    return {"qtype": qtype, "candidates": [c.split() for c in candidates], "label": label}


def test_prior_picks_the_most_frequent_gold_per_type_and_splits_ties():
    train = [_row("count", ["one", "two", "three", "none"], 0)] * 3 + \
        [_row("count", ["two", "one", "three", "none"], 0)] + \
        [_row("shape", ["a circle", "a square", "a cross", "a star"], 1)] * 2
    evals = [_row("count", ["two", "one", "none", "three"], 1),  # "one" is the prior: right
             _row("count", ["two", "one", "none", "three"], 0),  # wrong
             _row("shape", ["a star", "a cross", "a diamond", "a circle"], 2)]  # 4-way tie
    assert answer_prior.prior_accuracy(train, evals) == {"count": 50.0, "shape": 25.0}


def test_prior_on_the_embedded_world_is_near_chance(tiny_world):
    """The world's answers are balanced per type: no text-only rule is far above chance."""
    prior = answer_prior.answer_prior(tiny_world.data["vcr"], "synthetic")
    assert set(prior) == {"id", "shift"}
    assert set(prior["id"]) == {"color", "count", "position", "shape"}
    assert all(0 <= v <= 45 for per_type in prior.values() for v in per_type.values()), prior
