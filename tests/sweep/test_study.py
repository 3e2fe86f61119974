"""A search's Optuna study (SQLite) can be ahead of the searcher state a killed driver's
sweep restores: the restored searcher must neither fail on a trial the study already closed
nor leave a trial it never started RUNNING in the study (the clean-clone run of 7bb3f59
failed ``test_driver_sigkill_then_resume`` on the first)."""

from __future__ import annotations

import optuna
import pytest

from cliptd.sweep.study import RestorableOptunaSearch

State = optuna.trial.TrialState
SPACE = {"lam": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _searcher(url):
    return RestorableOptunaSearch(space=SPACE, metric="score", mode="max", study_name="s",
                                  storage=optuna.storages.RDBStorage(url),
                                  sampler=optuna.samplers.TPESampler(seed=0))


def _result(score, it):
    return {"score": score, "training_iteration": it}


def _states(url):
    return [t.state for t in optuna.load_study(study_name="s", storage=url).trials]


def test_a_trial_the_study_closed_before_the_kill_reports_again_after_restore(tmp_path,
                                                                             capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    live = _searcher(url)
    live.suggest("a")
    live.on_trial_result("a", _result(0.4, 1))
    live.save(str(tmp_path / "state.pkl"))  # Tune's experiment state, saved now ...
    live.on_trial_result("a", _result(0.5, 2))
    live.on_trial_complete("a", _result(0.5, 2))  # ... the study goes on, then the kill

    restored = _searcher(url)
    restored.restore(str(tmp_path / "state.pkl"))
    assert "trial a: the Optuna study closed it (COMPLETE)" in capsys.readouterr().out
    # the restarted trial re-runs from its epoch-1 checkpoint and reports epoch 2 again
    restored.on_trial_result("a", _result(0.5, 2))
    restored.on_trial_complete("a", _result(0.5, 2))
    study = optuna.load_study(study_name="s", storage=url)
    assert [t.state for t in study.trials] == [State.COMPLETE]
    assert study.trials[0].value == 0.5
    # and the search goes on with its next trial
    assert restored.suggest("b") is not None
    restored.on_trial_result("b", _result(0.3, 1))
    assert _states(url) == [State.COMPLETE, State.RUNNING]


def test_the_plain_searcher_fails_on_it(tmp_path):
    """What the restored searcher guards against (Ray's OptunaSearch, as of this pin)."""
    from ray.tune.search.optuna import OptunaSearch

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    live = _searcher(url)
    live.suggest("a")
    live.save(str(tmp_path / "state.pkl"))
    live.on_trial_complete("a", _result(0.5, 1))
    plain = OptunaSearch(space=SPACE, metric="score", mode="max",
                         study_name="s", storage=optuna.storages.RDBStorage(url))
    plain.restore(str(tmp_path / "state.pkl"))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        plain.on_trial_result("a", _result(0.5, 1))


def test_a_trial_the_study_asked_for_but_tune_never_started_is_failed(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    live = _searcher(url)
    live.suggest("a")
    live.save(str(tmp_path / "state.pkl"))
    live.suggest("b")  # asked (committed to the study), then the kill, before Tune saved
    restored = _searcher(url)
    restored.restore(str(tmp_path / "state.pkl"))
    assert _states(url) == [State.RUNNING, State.FAIL]
    restored.on_trial_result("a", _result(0.4, 1))  # the known trial goes on as before
    restored.on_trial_complete("a", _result(0.4, 1))
    assert _states(url) == [State.COMPLETE, State.FAIL]
