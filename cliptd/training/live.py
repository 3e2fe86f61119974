"""A Train run's metrics logged by Ray Train's controller, as each epoch is reported.

Ray Train runs its controller on the node of the process that called ``fit``
(``python -m cliptd.train`` / ``cliptd.pretrain``, on the head when submitted as a job),
and every worker's report passes through it. Logging there, not on rank 0, keeps the
tracking URI a URI of the machine the command was given on: the workers, on GPU nodes,
never talk to MLflow. ``cliptd.training.launch.make_trainer`` installs it whenever the run
config names a tracking run, and hands the workers a config without one.
"""

from __future__ import annotations

from ray.train import UserCallback


class TrackingCallback(UserCallback):
    """Rank 0's metrics of each report, once per ``step_key`` value (a restarted worker
    group re-reports the epochs after its checkpoint), buffered while MLflow is away."""

    def __init__(self, tracking: dict, step_key: str = "epoch"):
        self.tracking, self.step_key = dict(tracking), step_key
        self._logger = None

    def __getstate__(self):
        return {"tracking": self.tracking, "step_key": self.step_key, "_logger": None}

    def after_report(self, run_context, metrics, checkpoint):
        from cliptd.tracking.runs import ResultLogger

        if self._logger is None:
            self._logger = ResultLogger(self.tracking["uri"], self.tracking["run_id"],
                                        step_key=self.step_key)
        self._logger.log(metrics[0])
