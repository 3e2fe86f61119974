"""The comparison paired by seed: the mean of within-seed differences, their spread and the
sign count, per condition, metric and question type — the effect the unpaired ± hides."""

from __future__ import annotations

import pytest

from cliptd.tracking.table import paired_rows, qtype_metrics, to_markdown


def _rec(method, seed, acc, qa_color, cond="c"):
    return {"condition": cond, "method": method, "seed": seed,
            "metrics": {"val/id/q_a": acc, "val/id/qtype/colour/q_a": qa_color}}


def test_paired_difference_spread_and_sign_count():
    # seeds differ by 20 points, the method is ahead by 2-4 points in every seed
    records = [_rec("none", s, a, 0.5) for s, a in ((0, 0.40), (1, 0.60), (2, 0.50))]
    records += [_rec("cliptd", s, a, c) for s, a, c in
                ((0, 0.42, 0.6), (1, 0.64, 0.4), (2, 0.53, 0.4))]
    records += [_rec("naive", 0, 0.30, 0.5)]  # one seed only: one pair
    metrics = {"in-domain q_a": "val/id/q_a", **qtype_metrics(records, "q_a")}
    assert metrics == {"in-domain q_a": "val/id/q_a",
                       "in-domain q_a [colour]": "val/id/qtype/colour/q_a"}
    rows = {r["metric"]: r for r in paired_rows(records, metrics)}
    top = rows["in-domain q_a"]
    assert top["cliptd_mean"] == pytest.approx(3.0) and top["cliptd_std"] == pytest.approx(1.0)
    assert top["cliptd"] == "+3.0 ± 1.0 (3/3)"
    assert top["naive"] == "-10.0 ± 0.0 (0/1)"
    assert rows["in-domain q_a [colour]"]["cliptd"] == "-3.3 ± 11.5 (1/3)"
    md = to_markdown(list(rows.values()))
    assert "| condition | metric | naive | cliptd |" in md


def test_pairs_only_seeds_both_ran():
    records = [_rec("none", 0, 0.5, 0.5), _rec("cliptd", 0, 0.6, 0.5),
               _rec("cliptd", 1, 0.9, 0.5), _rec("none", 0, 0.5, 0.5, cond="other")]
    rows = paired_rows(records, {"q_a": "val/id/q_a"})
    assert [(r["condition"], r["cliptd_n"]) for r in rows] == [("c", 1)]
