"""What a sweep's trial slots spent their time on (cliptd.tracking.slots), on a hand-built
MLflow store whose trials report known times."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from cliptd.tracking import slots  # noqa: E402


def _trials(c, trials, tmp_path):
    """One MLflow run per trial, ``trials``: (start s, [(report s, train s, eval s, setup s
    or None)]), times from a fixed origin; returns the runs as ``sweep_time`` takes them."""
    from mlflow.entities import Metric

    exp = c.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    t0 = 1_800_000_000_000  # ms
    runs = []
    for start, reports in trials:
        rid = c.create_run(exp, start_time=t0 + 1000 * start).info.run_id
        metrics = []
        for ep, (at, train, ev, setup) in enumerate(reports):
            ts = t0 + 1000 * at
            metrics += [Metric("train/seconds", train, ts, ep), Metric("time/eval_s", ev, ts, ep)]
            metrics += [Metric("time/setup_s", setup, ts, ep)] if setup is not None else []
        c.log_batch(rid, metrics=metrics)
        runs.append({"run_id": rid, "start_ms": t0 + 1000 * start})
    return runs


def test_sweep_time_from_the_trials_reports(tmp_path):
    """Where the slots' time went: each trial from its run's start to its last report, the
    slots the most trials at once, its parts what the trials reported per epoch."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    # (start s, [(report s, train s, eval s, setup s or None)])
    trials = [(0, [(10, 6.0, 2.0, 1.0), (20, 7.0, 2.0, None)]),
              (0, [(15, 10.0, 3.0, 1.5)]),
              (16, [(30, 9.0, 2.0, 0.5)])]
    runs = _trials(c, trials, tmp_path)
    t = slots.sweep_time(c, runs)
    assert (t["trials"], t["slots"], t["wall_s"], t["slot_s"]) == (3, 2, 30.0, 60.0)
    assert (t["train_s"], t["eval_s"], t["setup_s"]) == (32.0, 9.0, 3.0)
    assert t["train_share"] == pytest.approx(32 / 60) and t["other_s"] == pytest.approx(16.0)
    assert t["first_result_s"] == 14.0  # median of 10, 15, 14
    assert t["trial_s"] == 20 + 15 + 14 and t["busy_share"] == pytest.approx(49 / 60)
    assert t["train_in_trials"] == pytest.approx(32 / 49)
    assert "training steps 53%, evaluation 15%, set-up 5%" in slots.sweep_time_markdown(t)
    assert slots.sweep_time(c, []) == {}


def test_a_stopped_and_resumed_sweep(tmp_path):
    """A sweep stopped at 25 s and resumed at 1,000 s: the trial running at the stop
    restarts from its checkpoint (its report at 1,012 s carries a set-up time again), so it
    runs in two spans, [0, 20] and [1,002, 1,020]; one that Tune had started at 24 s first
    reports at 1,035 s, so it ran from 1,023 s; the 975 s with no trial running are left
    out of the wall time, and the sweep held 2 slots, not the 4 that long spans over the
    stop would have made it."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    # (start s, [(report s, train s, eval s, setup s or None)])
    trials = [(0, [(10, 6.0, 2.0, 1.0), (20, 7.0, 2.0, None),
                   (1012, 7.0, 2.0, 1.0), (1020, 7.0, 1.0, None)]),
              (5, [(25, 15.0, 2.0, 1.0)]),
              (1000, [(1030, 25.0, 2.0, 1.0)]), (24, [(1035, 10.0, 1.0, 1.0)])]
    runs = _trials(c, trials, tmp_path)
    assert slots.trial_spans(0.0, {10.0: 9.0, 20.0: 9.0, 1012.0: 10.0, 1020.0: 8.0},
                             [10.0, 1012.0]) == [(0.0, 20.0), (1002.0, 1020.0)]
    assert slots.trial_spans(24.0, {1035.0: 12.0}, [1035.0]) == [(1023.0, 1035.0)]
    t = slots.sweep_time(c, runs)
    assert (t["trials"], t["slots"], t["stopped_s"]) == (4, 2, 975.0)
    assert t["wall_s"] == 1035 - 975 and t["slot_s"] == 2 * 60
    assert t["trial_s"] == 20 + 18 + 20 + 30 + 12
    md = slots.sweep_time_markdown(t)
    assert "4 trials on 2 slot(s) over 1.0 min (leaving out 16.2 min with no trial running" in md
