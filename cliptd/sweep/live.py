"""A sweep's live curves: every result a trial reports, logged to its MLflow run by the
search's own process.

Each search's ``Tuner`` runs in a Ray task pinned to the head (``cliptd_driver``, see
``cliptd.sweep.plan``), and Tune hands every trial's every report to that process's
callbacks, wherever the trial's Train workers run. So the tracking URI only has to work
on the head: MLflow can stay on the head's loopback, behind an SSH tunnel, as
``clusters/*.yaml`` start it (``docs/cluster.md``, "Tracking"), and the GPU nodes never
talk to it. The Train workers log nothing themselves (``cliptd.sweep.driver`` gives them
no tracking).
"""

from __future__ import annotations

import logging

from ray.tune import Callback

log = logging.getLogger("cliptd.tracking")


class LiveTracking(Callback):
    """Logs each trial's results to the MLflow run its driver opened (found by the
    ``cliptd.trial_id`` tag), once per epoch, buffered while the server is away.

    A result that arrives while the run cannot be looked up (the server away at the
    trial's first report) is held here and logged with the trial's next result or when it
    ends; ``cliptd.sweep.records.close_runs`` then replays any buffer and fills in from
    Ray's results whatever is still missing."""

    def __init__(self, meta: dict):
        self.uri, self.experiment_id = meta["tracking_uri"], meta["experiment_id"]
        self.sweep_id = meta["sweep_id"]
        self._loggers: dict[str, object] = {}
        self._pending: dict[str, list[dict]] = {}

    def __getstate__(self):  # Tune saves its callbacks with the experiment: config only
        return {"uri": self.uri, "experiment_id": self.experiment_id,
                "sweep_id": self.sweep_id, "_loggers": {}, "_pending": {}}

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

    def _drain(self, trial_id: str) -> None:
        from cliptd.tracking import runs as tracking

        pending = self._pending.get(trial_id)
        if not pending:
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
        self._drain(trial.trial_id)

    def _ended(self, trial) -> None:
        self._drain(trial.trial_id)
        logger = self._loggers.pop(trial.trial_id, None)
        if logger is not None:
            logger.flush()  # what is still unsent stays buffered: close_runs replays it

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)
