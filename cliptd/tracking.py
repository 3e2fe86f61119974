"""MLflow records: an experiment per task, a parent run per sweep, a child run per trial.

Runs are found again by tag (``cliptd.sweep_id`` for parents, ``cliptd.trial_id`` for
children), never by an in-memory map, so a resumed sweep reuses its runs instead of opening
duplicates. ``RunLogger`` never drops a metric: when the tracking server is unreachable it
keeps the records in a local JSONL buffer, logs the gap, and replays them once the server
answers again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("cliptd.tracking")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server's own UI)"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any work starts, when the tracking server does not answer."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).read()
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(f"MLflow tracking server {uri} is unreachable "
                                  f"({getattr(exc, 'reason', exc)})") from None
    else:
        client(uri).search_experiments(max_results=1)


def get_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


def _find_run(c, experiment_id: str, tag: str, value: str):
    runs = c.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                         max_results=2)
    return runs[0] if runs else None


def find_or_create_parent(uri: str, experiment_id: str, sweep_id: str, name: str,
                          tags: dict) -> str:
    c = client(uri)
    run = _find_run(c, experiment_id, "cliptd.sweep_id", sweep_id)
    if run:
        if run.info.status != "RUNNING":
            c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = c.create_run(experiment_id, run_name=name,
                       tags={"cliptd.sweep_id": sweep_id, "cliptd.kind": "sweep", **tags})
    return run.info.run_id


def find_or_create_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                             name: str, tags: dict, params: dict) -> tuple[str, bool]:
    """(run_id, created). The parent is set explicitly: Ray does not nest runs."""
    c = client(uri)
    run = _find_run(c, experiment_id, "cliptd.trial_id", trial_id)
    if run:
        return run.info.run_id, False
    run = c.create_run(experiment_id, run_name=name, tags={
        "mlflow.parentRunId": parent_run_id, "cliptd.trial_id": trial_id,
        "cliptd.kind": "trial", **{k: str(v) for k, v in tags.items()}})
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):
        c.log_batch(run.info.run_id, params=flat[i: i + 100])
    return run.info.run_id, True


class RunLogger:
    """Per-epoch metrics of one run, buffered on disk while the server is unreachable."""

    def __init__(self, uri: str, run_id: str, buffer_dir: str | None = None):
        self.uri, self.run_id = uri, run_id
        folder = Path(buffer_dir or os.environ.get("CLIPTD_TRACKING_BUFFER",
                                                   Path.home() / ".cache/cliptd/mlflow-buffer"))
        folder.mkdir(parents=True, exist_ok=True)
        self.buffer = folder / f"{run_id}.jsonl"
        # MLflow's HTTP client retries 7 times with backoff (minutes per call): training must
        # not stall on a dead server, so fail fast and let the buffer do the retrying.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._client = client(uri)
        self.gap_started: float | None = None
        self._refused: set[str] = set()

    def log_metrics(self, metrics: dict, step: int) -> None:
        rec = {"ts": int(time.time() * 1000), "step": step,
               "metrics": {k: float(v) for k, v in metrics.items()
                           if isinstance(v, (int, float)) and v == v}}
        with self.buffer.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.flush()

    def flush(self) -> bool:
        from mlflow.entities import Metric

        if not self.buffer.exists():
            return True
        records = [json.loads(line) for line in self.buffer.read_text().splitlines() if line]
        sent = 0
        try:
            for r in records:  # one record (one epoch) per call: never sent twice
                metrics = [Metric(k, v, r["ts"], r["step"]) for k, v in r["metrics"].items()
                           if self._valid(k)]
                for i in range(0, len(metrics), 500):
                    self._client.log_batch(self.run_id, metrics=metrics[i: i + 500])
                sent += 1
        except Exception as exc:  # noqa: BLE001 - any failure: keep the rest, retry later
            if sent:
                tmp = self.buffer.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records[sent:]))
                os.replace(tmp, self.buffer)
            if self.gap_started is None:
                self.gap_started = time.time()
                log.warning("MLflow at %s unreachable (%s); buffering metrics in %s",
                            self.uri, type(exc).__name__, self.buffer)
            return False
        if self.gap_started is not None:
            log.warning("MLflow reachable again after %.0f s; replayed %d buffered records",
                        time.time() - self.gap_started, len(records))
            self.gap_started = None
        self.buffer.unlink(missing_ok=True)
        return True

    def _valid(self, key: str) -> bool:
        """MLflow refuses a whole batch over one malformed metric name, which the buffer
        would then retry forever: such a name is dropped, once, with a warning naming it."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import _validate_metric_name

        try:
            _validate_metric_name(key)
            return True
        except MlflowException as exc:
            if key not in self._refused:
                self._refused.add(key)
                log.warning("metric %r of run %s is not a valid MLflow name, not logged: %s",
                            key, self.run_id, exc.message)
            return False

    def close(self, attempts: int = 5, wait_s: float = 2.0) -> None:
        for _ in range(attempts):
            if self.flush():
                return
            time.sleep(wait_s)
        log.warning("MLflow still unreachable; %s keeps the unsent metrics of run %s",
                    self.buffer, self.run_id)
