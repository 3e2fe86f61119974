"""cliptd's default knobs come from the sweeps' best configs (issue 19), by a rule that is
tested here, and the shipped defaults are that rule applied to the best configs kept under
bench/results/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cliptd import report
from cliptd.core.config import DistillConfig
from cliptd.sweep import defaults

ROOT = Path(__file__).resolve().parents[2]
KEPT = sorted(ROOT.glob("bench/results/v2-*-sweep/*-cliptd.yaml"))


def _cfg(**distill):
    return {"distill": {**DistillConfig().as_dict(), **distill}}


def test_the_rule():
    """A choice knob: the most chosen value, a tie going to the one CHOICES lists first; a
    number: the lower median, to two significant digits."""
    got = defaults.derive([_cfg(weighting="uniform", distance="l2", lam=0.112),
                           _cfg(weighting="threshold", distance="l2", lam=0.5558),
                           _cfg(weighting="uniform", distance="cosine", lam=0.881),
                           _cfg(weighting="threshold", distance="cosine", lam=2.0)],
                          ["weighting", "distance", "lam"])
    assert got == {"weighting": "threshold", "distance": "cosine", "lam": 0.56}
    assert defaults.derive([_cfg(select_ratio_v=0.3172)], ["select_ratio_v"]) == {
        "select_ratio_v": 0.32}
    with pytest.raises(ValueError, match="no best configs"):
        defaults.derive([])


def test_the_knobs_are_those_the_spaces_search():
    knobs = defaults.searched_knobs()
    assert {"lam", "select_ratio_v", "weighting", "visual_layer", "region_weighting"} <= \
        set(knobs)
    assert "method" not in knobs and "select_by" not in knobs


def test_best_configs_refuses_other_files(tmp_path):
    (tmp_path / "a-none.yaml").write_text(yaml.safe_dump(_cfg(method="none")))
    with pytest.raises(ValueError, match="no cliptd best config"):
        defaults.best_configs([tmp_path])
    with pytest.raises(ValueError, match=r"a-none.yaml: not a cliptd best config"):
        defaults.best_configs([tmp_path / "a-none.yaml"])
    with pytest.raises(FileNotFoundError, match="nope"):
        defaults.best_configs([tmp_path / "nope"])


def test_shipped_defaults_are_the_sweeps_result(capsys):
    """DistillConfig's defaults are the rule applied to every kept sweep's best cliptd
    config: a new cell under bench/results/ that moves a knob fails here until the default
    moves with it (``python -m cliptd.report defaults bench/results/v2-*-sweep`` shows
    where)."""
    assert len(KEPT) >= 3
    derived = defaults.derive(list(defaults.best_configs(KEPT).values()))
    shipped = DistillConfig().as_dict()
    assert {k: shipped[k] for k in derived} == derived
    assert report.main(["defaults", *map(str, KEPT)]) == 0
    assert "the shipped defaults are the derived ones" in capsys.readouterr().out
