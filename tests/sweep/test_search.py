"""Which trial a search calls its best: the rule, its ties, and the choice kept across a
resumed sweep (a restored Tuner lists its trials in another order; the seeds already run
used the first choice's config)."""

from __future__ import annotations

from types import SimpleNamespace

from cliptd.sweep.records import keep_best, kept_best, mark_compared
from cliptd.sweep.search import finished, pick_best


def _trial(tid, score, epoch=9, patience_stopped=None):
    metrics = {"trial_id": tid, "score": score, "epoch": epoch}
    if patience_stopped is not None:  # reported by every run of a budget with patience
        metrics["train/stopped_early"] = float(patience_stopped)
    return SimpleNamespace(metrics=metrics)


def test_a_finished_trial_wins_then_the_score():
    # ASHA stopped "a" at a rung (its score is the sample's, mid-training)
    trials = [_trial("a", 0.9, epoch=3), _trial("b", 0.7), _trial("c", 0.8)]
    assert pick_best(trials, 9, None, "s").metrics["trial_id"] == "c"
    early = [_trial("a", 0.9, epoch=3), _trial("b", 0.7, epoch=5)]
    assert pick_best(early, 9, None, "s").metrics["trial_id"] == "a"


def test_a_trial_patience_ended_is_finished_like_one_that_ran_every_epoch():
    # the VQA 5 % searches: a run patience ended at epoch 8 (41.5, scored on the whole
    # split) lost to the only one that ran all 9 epochs (37.6) before this rule
    trials = [_trial("full", 0.376, patience_stopped=0),
              _trial("patience", 0.415, epoch=8, patience_stopped=1),
              _trial("asha", 0.50, epoch=3, patience_stopped=0)]
    assert pick_best(trials, 9, None, "s").metrics["trial_id"] == "patience"
    assert finished(trials[1].metrics, 9) and finished(trials[0].metrics, 9)
    assert not finished(trials[2].metrics, 9)
    assert not finished(_trial("no-patience", 0.5, epoch=3).metrics, 9)


def test_ties_go_to_the_lower_trial_id_whatever_the_order():
    trials = [_trial("f2", 0.2), _trial("0a", 0.2), _trial("99", 0.1)]
    for order in (trials, trials[::-1], trials[1:] + trials[:1]):
        assert pick_best(order, 9, None, "s").metrics["trial_id"] == "0a"


def test_a_kept_choice_stands_when_its_trial_is_there():
    trials = [_trial("0a", 0.2), _trial("f2", 0.2)]
    assert pick_best(trials, 9, "s/f2", "s").metrics["trial_id"] == "f2"
    # a choice from another sweep, or of a trial no longer there, is not a choice
    assert pick_best(trials, 9, "other/f2", "s").metrics["trial_id"] == "0a"
    assert pick_best(trials, 9, "s/gone", "s").metrics["trial_id"] == "0a"


def _store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("cliptd-vcr")
    parent = c.create_run(exp, tags={"cliptd.kind": "sweep"}).info.run_id
    meta = {"tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent,
            "sweep_id": "s", "condition": "synthetic-shots1.0", "method": "none"}
    return c, meta


def _trial_run(c, meta, tid, method="none"):
    c.create_run(meta["experiment_id"], tags={
        "cliptd.trial_id": f"s/{tid}", "sweep": "s", "phase": "search",
        "condition": meta["condition"], "method": method})


def test_the_choice_is_kept_on_the_sweeps_parent_run(tmp_path):
    c, meta = _store(tmp_path)
    assert kept_best(meta) is None
    keep_best(meta, "s/f2")
    assert kept_best(meta) == "s/f2"
    assert kept_best({**meta, "method": "cliptd"}) is None  # per (condition, method)
    assert kept_best({**meta, "tracking_uri": None}) is None


def test_a_sweep_from_before_the_tag_keeps_its_compared_search_trial(tmp_path):
    c, meta = _store(tmp_path)
    for tid in ("0a", "f2"):
        _trial_run(c, meta, tid)
    _trial_run(c, meta, "77", method="cliptd")
    mark_compared(meta, {"trial_id": "s/77"})  # another method's: not this search's
    assert kept_best(meta) is None
    mark_compared(meta, {"trial_id": "s/f2"})
    assert kept_best(meta) == "s/f2"
