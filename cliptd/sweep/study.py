"""The Optuna searcher a search runs, made safe to restore after its driver was killed.

A search's Optuna study lives in SQLite (``optuna.db``, for ``optuna-dashboard`` and for a
restored sweep), and every ``ask``/``report``/``tell`` commits there at once; the searcher's
own state (which Tune trial is which Optuna trial) is saved with Tune's experiment state,
every few seconds. A driver killed between the two leaves the study ahead of the state
``Tuner.restore`` reads back:

- a trial the study already closed (``tell``) is, for the restored Tune, still running: it
  restarts from its checkpoint and reports again, and Optuna refuses to update a finished
  trial (``UpdateFinishedTrialError``), which failed the whole search;
- a trial the study already asked for is unknown to the restored searcher, so it would
  stay RUNNING in the study for ever (its Tune trial never existed as far as Tune knows).

On restore the two are reconciled: the first is taken as told, by adding it to the
searcher's own set of completed trials, whose further results ``OptunaSearch`` already
ignores (a restarted trial re-runs exactly, from its checkpoint, so what it reports again
is what the study already holds); the second is marked FAIL, as Optuna marks a trial whose
worker vanished.
"""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch


class RestorableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` whose ``restore`` reconciles its saved state with the study."""

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._reconcile_with_study()

    def _reconcile_with_study(self):
        stored = {t.number: t for t in self._ot_study.get_trials(deepcopy=False)}
        known = set()
        for tune_id, ot_trial in self._ot_trials.items():
            known.add(ot_trial.number)
            frozen = stored.get(ot_trial.number)
            if (frozen is not None and frozen.state.is_finished()
                    and tune_id not in self._completed_trials):
                print(f"[cliptd] trial {tune_id}: the Optuna study closed it "
                      f"({frozen.state.name}) before the driver stopped; its repeated results "
                      "are not reported to it again")
                self._completed_trials.add(tune_id)
        storage = self._ot_study._storage
        for number, frozen in stored.items():
            if number not in known and frozen.state == optuna.trial.TrialState.RUNNING:
                print(f"[cliptd] Optuna trial {number} was asked for but never started by "
                      "Tune: marked FAIL")
                storage.set_trial_state_values(frozen._trial_id,
                                               state=optuna.trial.TrialState.FAIL)
