"""A sweep's live curves: each trial's MLflow run opened, and every result it reports
logged there, by the search's own process.

Each search's ``Tuner`` runs in a Ray task pinned to the head (``cliptd_driver``, see
``cliptd.sweep.plan``), and Tune hands every trial's every report to that process's
callbacks, wherever the trial's Train workers run. So the tracking URI only has to work
on the head: MLflow can stay on the head's loopback, behind an SSH tunnel, as
``clusters/*.yaml`` start it (``docs/cluster.md``, "Tracking"), and the GPU nodes never
talk to it. Trials (a light trial's loop, a ``train`` trial's driver and workers) never
touch MLflow (``cliptd.sweep.driver`` gives them no tracking).
"""

from __future__ import annotations

import logging

from ray.tune import Callback

log = logging.getLogger("cliptd.tracking")


class LiveTracking(Callback):
    """Opens each trial's MLflow run when the trial starts (``cliptd.sweep.records``) and
    logs its results to it (found by the ``cliptd.trial_id`` tag), once per epoch, buffered
    while the server is away.

    Nothing here waits for the server: Tune calls these hooks in the search's one event
    loop. A run that cannot be opened yet (the server away when the trial starts) is opened
    with the trial's next result or when it ends, and its results are held here until then;
    ``cliptd.sweep.records.close_runs`` then opens any run still missing, replays any buffer
    and fills in from Ray's results whatever is still missing."""

    #: the search's settings a trial's run records (``open_trial_run``); kept when Tune
    #: saves its callbacks with the experiment, so that a restored sweep opens runs alike
    _META = ("tracking_uri", "experiment_id", "parent_run_id", "sweep_id", "condition",
             "phase", "base", "searcher_seed", "versions", "trial_kind", "workers")

    def __init__(self, meta: dict):
        self.meta = {k: meta.get(k) for k in self._META}
        self.__setstate__(self.meta)

    def __getstate__(self):  # Tune saves its callbacks with the experiment: config only
        return self.meta

    def __setstate__(self, meta: dict):
        self.meta = meta
        self.uri, self.experiment_id = meta["tracking_uri"], meta["experiment_id"]
        self.sweep_id = meta["sweep_id"]
        self._loggers: dict[str, object] = {}
        self._pending: dict[str, list[dict]] = {}
        self._opened: set[str] = set()
        self._waiting: set[str] = set()

    def _open(self, trial) -> bool:
        """The trial's run opened (once): False while the server cannot be reached."""
        from cliptd.sweep.records import open_trial_run
        from cliptd.tracking import runs as tracking

        if trial.trial_id in self._opened:
            return True
        try:
            open_trial_run(self.meta, trial.config, trial.trial_id)
        except Exception as exc:  # noqa: BLE001 - never stop the search over tracking
            if trial.trial_id not in self._waiting:  # said once per trial
                self._waiting.add(trial.trial_id)
                log.warning("trial %s: its MLflow run %s (%s: %s)", trial.trial_id,
                            "will be opened when the server is back" if
                            tracking.is_transient(exc) else "could not be opened",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc)
                            else "")
            return False
        self._opened.add(trial.trial_id)
        self._waiting.discard(trial.trial_id)
        return True

    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)

    def _logger(self, trial_id: str):
        from cliptd.tracking import runs as tracking

        if trial_id not in self._loggers:
            c = tracking.client(self.uri)
            found = c.search_runs([self.experiment_id], filter_string=(
                f"tags.`cliptd.trial_id` = '{self.sweep_id}/{trial_id}'"), max_results=1)
            if not found:
                return None
            self._loggers[trial_id] = tracking.ResultLogger(self.uri, found[0].info.run_id)
        return self._loggers[trial_id]

    def _drain(self, trial) -> None:
        from cliptd.tracking import runs as tracking

        trial_id = trial.trial_id
        pending = self._pending.get(trial_id)
        if not pending or not self._open(trial):
            return
        try:
            logger = self._logger(trial_id)
        except Exception as exc:  # noqa: BLE001 - never stop the search over tracking
            if not tracking.is_transient(exc):
                log.warning("trial %s: its MLflow run could not be looked up: %s",
                            trial_id, exc)
            return  # kept; retried with the next result
        if logger is None:
            return
        while pending:
            logger.log(pending.pop(0))  # buffered on failure, never raises for an outage

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._pending.setdefault(trial.trial_id, []).append(dict(result))
        self._drain(trial)

    def _ended(self, trial) -> None:
        self._drain(trial)
        logger = self._loggers.pop(trial.trial_id, None)
        if logger is not None:
            logger.flush()  # what is still unsent stays buffered: close_runs replays it

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        """A trial that failed for good (``on_trial_recover`` is Tune's call for a retry):
        its run is marked FAILED here, since one that never reported has no ``trial_id``
        in Ray's results for ``close_runs`` to find it by."""
        self._ended(trial)
        if trial.trial_id not in self._opened:
            return
        from cliptd.tracking import runs as tracking

        try:
            c = tracking.client(self.uri)
            for run in c.search_runs([self.experiment_id], filter_string=(
                    f"tags.`cliptd.trial_id` = '{self.sweep_id}/{trial.trial_id}'")):
                if run.info.status == "RUNNING":
                    c.set_terminated(run.info.run_id, status="FAILED")
        except Exception as exc:  # noqa: BLE001 - never stop the search over tracking
            log.warning("trial %s: its MLflow run could not be marked FAILED: %s",
                        trial.trial_id, exc)
