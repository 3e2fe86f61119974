"""The probes behind ``python -m cliptd.bench probe``: a linear probe finds a linearly
separable attribute and not a random one; on the tiny world every (attribute, domain) row
and every zero-shot row is well formed."""

from __future__ import annotations

import numpy as np

from cliptd.embedded import probe


def test_linear_probe_separable_vs_random():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    y = (x[:, 2] > 0).astype(int)
    assert probe.linear_probe(x[:300], y[:300], x[300:], y[300:]) >= 0.9
    noise = rng.integers(0, 2, 400)
    assert probe.linear_probe(x[:300], noise[:300], x[300:], noise[300:]) < 0.7


def test_probe_and_zero_shot_tables(tiny_world):
    rows = probe.probes(tiny_world, n_images=40)
    assert {r["domain"] for r in rows} == {"source", "target"}
    assert {"colour", "shape", "position"} <= {r["attribute"] for r in rows}
    for r in rows:
        assert 0 <= r["teacher"] <= 1 and 0 <= r["student"] <= 1 and 0 < r["chance"] <= 1
    zs = probe.zero_shot(tiny_world, limit=40)
    assert {r["split"] for r in zs} == {"train", "val"}
    assert all(0 <= r["teacher_acc"] <= 1 and r["n"] > 0 for r in zs)
    md = probe.to_markdown(rows, zs)
    assert "| colour | source |" in md and "teacher zero-shot" in md
