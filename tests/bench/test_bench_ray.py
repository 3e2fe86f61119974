"""The arithmetic of ``bench ray``'s figures, on hand-made results (the benchmark itself is a
program that prints figures, not a test)."""

from __future__ import annotations

import pandas as pd
import pytest

from cliptd.bench import _trial_figures, start_costs


class _Result:
    def __init__(self, rows):
        self.metrics_dataframe = pd.DataFrame(rows)


def test_start_cost_is_the_gap_between_trials_less_the_first_epochs_loop():
    first = _Result([{"epoch": 1, "timestamp": 100, "train/seconds": 20, "time/eval_s": 5}])
    # its first result 40 s after the previous trial's last, 30 s of which its own epoch
    second = _Result([{"epoch": 2, "timestamp": 150, "train/seconds": 9, "time/eval_s": 1},
                      {"epoch": 1, "timestamp": 140, "train/seconds": 25, "time/eval_s": 5}])
    third = _Result([{"epoch": 1, "timestamp": 170, "train/seconds": 12, "time/eval_s": 6}])
    assert start_costs([first, second, third]) == [10.0, 2.0]


def test_trial_figures_split_the_wall_time():
    # launched at 100; epoch 1 reported at 150 after 30 s of steps and 5 of evaluation
    rows = [{"timestamp": 150, "train/seconds": 30, "time/eval_s": 5, "time/setup_s": 4},
            {"timestamp": 190, "train/seconds": 30, "time/eval_s": 5, "time/setup_s": None}]
    f = _trial_figures(rows, launch=100)
    assert f["wall_s"] == 90 and f["first_result_s"] == 50 and f["first_step_s"] == 15
    assert f["train_share"] == pytest.approx(60 / 90)
    assert f["loop_share"] == pytest.approx(70 / 90)
    assert f["other_s"] == pytest.approx(90 - 60 - 10 - 4)
