"""MLflow records: an experiment per task, a parent run per sweep, a child run per trial.

Runs are found again by tag (``cliptd.sweep_id`` for parents, ``cliptd.trial_id`` for
children), never by an in-memory map, so a resumed sweep reuses its runs instead of opening
duplicates. ``RunLogger`` never drops a metric: when the tracking server is unreachable it
keeps the records in a local JSONL buffer, logs the gap, and replays them once the server
answers again.

A sweep rides out an outage of the tracking server (up to ``CLIPTD_TRACKING_PATIENCE_S``,
default 30 min): every call it makes itself goes through ``patiently`` (retried every few
seconds, the gap logged when it starts and when it ends), and closing a trial replays what
its logger could not send before its process ended (``replay_buffer``; Tune stops a trial
as soon as it reports its last epoch, before its logger's ``close`` can wait), then fills
in from Ray's own results any epoch still missing (``backfill``: a buffer left on another
node).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

log = logging.getLogger("cliptd.tracking")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """How to look at the runs: the ``mlflow ui`` command (loopback only) and, with an
    experiment, the link that opens its runs table."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else \
        "http://127.0.0.1:5000"
    link = f"; then open {experiment_url(base, experiment_id)}" if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {experiment_url(base, experiment_id) if experiment_id else uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000{link}"


def experiment_url(base: str, experiment_id: str) -> str:
    """An experiment's runs table in MLflow 3's UI. The plain experiment link opens the GenAI
    overview whatever the experiment's kind tag says (3.17 picks the view from the browser's
    last choice, default GenAI): ``workflowType=machine_learning`` selects model training."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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


def fail_fast(timeout_s: int = 10) -> None:
    """MLflow's HTTP client retries 7 times with exponential backoff (minutes per call, and
    up to two more minutes asleep after the server is back): this process fails fast
    instead, and its callers retry (``RunLogger``'s buffer, ``patiently``). Call it in each
    process before its first request."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: the server unreachable, timing out, overloaded or
    restarting (connection errors, 5xx, 429). A refused request (a bad value, a missing
    run) is not: retrying it would only hide the bug."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE",
                                  "REQUEST_LIMIT_EXCEEDED")
    # The network's OSErrors only: requests' errors, refused / reset / timed-out
    # connections, no route, no name. A local one (a file or a broken install, e.g. "too
    # many levels of symbolic links" under site-packages) will not go away by waiting.
    from requests import RequestException  # MLflow's HTTP client

    if isinstance(exc, (RequestException, ConnectionError, TimeoutError, socket.gaierror)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in NETWORK_ERRNOS
    # SQLite's "database is locked" is an sqlalchemy OperationalError
    return type(exc).__name__ == "OperationalError"


NETWORK_ERRNOS = {errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH,
                  errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT}


def patience_s() -> float:
    return float(os.environ.get("CLIPTD_TRACKING_PATIENCE_S", 1800))


def patiently(fn, what: str, *, patience: float | None = None, wait_s: float = 2.0,
              max_wait_s: float = 10.0):
    """``fn()``, retried while the tracking server is unreachable (``is_transient``).

    The gap is logged when it starts and when it ends; after ``patience`` seconds
    (``CLIPTD_TRACKING_PATIENCE_S``, default 30 min) the last error is raised. ``fn`` must be
    safe to call again after a failure (find-or-create, set a tag, replay a buffer)."""
    patience = patience_s() if patience is None else patience
    start, wait, failures = time.time(), wait_s, 0
    while True:
        try:
            out = fn()
        except Exception as exc:
            waited = time.time() - start
            if not is_transient(exc) or waited >= patience:
                if failures:
                    log.warning("MLflow still unreachable after %.0f s while %s: giving up",
                                waited, what)
                raise
            if not failures:
                log.warning("MLflow unreachable while %s (%s: %s); retrying every %g-%g s "
                            "for up to %.0f s", what, type(exc).__name__,
                            str(exc).splitlines()[0][:200] if str(exc) else "", wait_s,
                            max_wait_s, patience)
            failures += 1
            time.sleep(min(wait, max(0.0, patience - waited)))
            wait = min(wait * 1.5, max_wait_s)
            continue
        if failures:
            log.warning("MLflow reachable again after %.0f s (%d failed attempts) while %s",
                        time.time() - start, failures, what)
        return out


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
        with sqlite_store_lock(uri):
            client(uri).search_experiments(max_results=1)


@contextlib.contextmanager
def sqlite_store_lock(uri: str):
    """Hold an exclusive lock on a SQLite store's folder while a process first touches it.

    The first touch of a fresh store runs MLflow's schema migrations, and two processes doing
    so at once (two sweeps started together on one ``mlflow.db``) collide half-way ("table
    _alembic_tmp_latest_metrics already exists"). Serialised, the second finds the schema at
    head. The lock is on the folder itself (``flock`` on its descriptor), so nothing is left
    beside the store. Other URIs (a server, an in-memory store) pass straight through."""
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    folder = Path(path).parent if path and path != ":memory:" else None
    if folder is None or not folder.is_dir():
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# MLflow 3's UI shows an experiment as model training (the runs table), not as a GenAI app
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, tags=EXPERIMENT_KIND)
    if exp.tags.get("mlflow.experimentKind") is None:  # made by an earlier cliptd
        for k, v in EXPERIMENT_KIND.items():
            c.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def source_tags() -> dict[str, str]:
    """The commit of the cliptd source a run used (when it is a git checkout), as MLflow's
    own ``mlflow.source.git.commit`` tag: MLflow guesses it from ``sys.argv[0]``, which is
    wrong inside Ray's workers and under ``python -m``."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not sha:
        return {}  # an installed package, no checkout: its version is in the params
    return {"mlflow.source.git.commit": sha, "cliptd.source_dirty": str(bool(dirty)).lower()}


def log_dataset(uri: str, run_id: str, cfg: dict) -> None:
    """The run's training data as an MLflow dataset input: the prepared dataset (its path,
    task and content-hash version as the digest) with the shot subset and preset used."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    # the prepared dataset's manifest (cliptd.data.prepare.MANIFEST), read as plain JSON
    manifest = json.loads((Path(cfg["data"]) / "manifest.json").read_text())
    with warnings.catch_warnings():  # MLflow warns that it guessed a local path: it is one
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(cfg["data"]).resolve()))
    ds = MetaDataset(source=source,
                     name=f"{manifest['task']}:{Path(cfg['data']).name}",
                     digest=str(manifest["version"])[:36])
    tags = {"mlflow.data.context": "training", "task": manifest["task"],
            "shots": str(cfg["shots"]), "subset_seed": str(cfg["subset_seed"]),
            "preset": str(cfg["preset"]), "version": str(manifest["version"])}
    client(uri).log_inputs(run_id, datasets=[DatasetInput(
        ds._to_mlflow_entity(), tags=[InputTag(k, v) for k, v in tags.items()])])


def model_name(name: str) -> str:
    """``name`` as MLflow accepts a logged model's name: none of ``/ : . % " '`` (a shot
    level such as ``0.05`` becomes ``0_05``)."""
    return re.sub(r"[/:.%\"']", "_", name)


def log_student(uri: str, run_id: str, folder: Path, name: str, step: int = 0) -> str:
    """An exported student folder as the run's logged model (MLflow 3's LoggedModel: the
    transformers folder as its artifacts); returns the model id. ``name`` is made a valid
    model name (see ``model_name``)."""
    from mlflow.entities import LoggedModelOutput

    name = model_name(name)
    c = client(uri)
    run = c.get_run(run_id)
    model = c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                  tags={"format": "cliptd-student (transformers folder)"},
                                  model_type="student")
    try:
        c.log_model_artifacts(model.model_id, str(folder))
    except Exception:
        c.finalize_logged_model(model.model_id, "FAILED")
        raise
    c.finalize_logged_model(model.model_id, "READY")
    c.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=step)])
    return model.model_id


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


def find_or_create_trial_run(uri: str, experiment_id: str, parent_run_id: str | None,
                             trial_id: str, name: str, tags: dict, params: dict,
                             kind: str = "trial", dataset: dict | None = None
                             ) -> tuple[str, bool]:
    """(run_id, created): a sweep trial's run (its parent set explicitly: Ray does not nest
    runs), or with no parent a ``python -m cliptd.train`` run, found again by its id."""
    from mlflow.entities import Param

    c = client(uri)
    run = _find_run(c, experiment_id, "cliptd.trial_id", trial_id)
    created = run is None
    if created:
        parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run = c.create_run(experiment_id, run_name=name, tags={
            **parent, "cliptd.trial_id": trial_id, "cliptd.kind": kind, **source_tags(),
            **{k: str(v) for k, v in tags.items()}})
    # a run without params was created by a call that failed before logging them (the
    # server went away): called again (``patiently``), this one logs them
    if created or not run.data.params:
        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            c.log_batch(run.info.run_id, params=flat[i: i + 100])
    # ``dataset``: the run config that names it (logged once, also by a retried call)
    if dataset and dataset.get("data") and (created or not (
            run.inputs and run.inputs.dataset_inputs)):
        log_dataset(uri, run.info.run_id, dataset)
    return run.info.run_id, created


class RunLogger:
    """Per-epoch metrics of one run, buffered on disk while the server is unreachable."""

    def __init__(self, uri: str, run_id: str, buffer_dir: str | None = None):
        self.uri, self.run_id = uri, run_id
        folder = Path(buffer_dir or os.environ.get("CLIPTD_TRACKING_BUFFER",
                                                   Path.home() / ".cache/cliptd/mlflow-buffer"))
        folder.mkdir(parents=True, exist_ok=True)
        self.buffer = folder / f"{run_id}.jsonl"
        # training must not stall on a dead server: fail fast, the buffer does the retrying
        fail_fast()
        self._client = client(uri)
        self.gap_started: float | None = None
        self._refused: set[str] = set()

    def logged_steps(self, key: str = "epoch") -> set[int]:
        """Steps at which this run already has ``key`` (in MLflow or still buffered);
        empty when the server cannot say."""
        steps = set()
        if self.buffer.exists():
            for record in map(json.loads, filter(None, self.buffer.read_text().splitlines())):
                if key in record["metrics"]:
                    steps.add(record["step"])
        try:
            steps |= {m.step for m in self._client.get_metric_history(self.run_id, key)}
        except Exception:  # noqa: BLE001 - unknown: log everything; dedupe is best effort
            pass
        return steps

    def log_metrics(self, metrics: dict, step: int) -> None:
        rec = {"ts": int(time.time() * 1000), "step": step,
               "metrics": {k: float(v) for k, v in metrics.items()
                           if isinstance(v, (int, float)) and v == v}}
        with self.buffer.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.flush()

    def flush(self, announce: bool = True) -> bool:
        """Send the buffer, oldest first; False (the rest kept) while the server is away.
        ``announce``: log the start of a gap (``replay_buffer``'s caller logs its own)."""
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
                if announce:
                    log.warning("MLflow at %s unreachable (%s); buffering metrics in %s",
                                self.uri, type(exc).__name__, self.buffer)
            return False
        if self.gap_started is not None:
            gap = time.time() - self.gap_started
            log.warning("MLflow reachable again after %.0f s; replayed %d buffered records "
                        "of run %s", gap, len(records), self.run_id)
            self.gap_started = None
            try:  # the gap in the run itself, at the step logged last
                self._client.log_metric(self.run_id, "sys/tracking_gap_s", round(gap, 1),
                                        step=records[-1]["step"] if records else 0)
            except Exception:  # noqa: BLE001 - a figure about the outage, never worth a retry
                pass
        self.buffer.unlink(missing_ok=True)
        return True

    def _valid(self, key: str) -> bool:
        """MLflow refuses a whole batch over one malformed metric name, which the buffer
        would then retry forever: such a name is dropped, once, with a warning naming it."""
        return valid_metric_name(key, self.run_id, self._refused)

    def close(self, attempts: int = 5, wait_s: float = 2.0) -> None:
        for _ in range(attempts):
            if self.flush():
                return
            time.sleep(wait_s)
        log.warning("MLflow still unreachable; %s keeps the unsent metrics of run %s (a "
                    "sweep replays them when it closes the trial)", self.buffer, self.run_id)


def valid_metric_name(key: str, run_id: str, refused: set[str]) -> bool:
    """Whether MLflow accepts ``key``; a refused name is warned about once per ``refused``."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric_name

    try:
        _validate_metric_name(key)
        return True
    except MlflowException as exc:
        if key not in refused:
            refused.add(key)
            log.warning("metric %r of run %s is not a valid MLflow name, not logged: %s",
                        key, run_id, exc.message)
        return False


def replay_buffer(uri: str, run_id: str, buffer_dir: str | None = None) -> int:
    """Send what a run's logger left buffered when its process ended (killed, or the server
    still away after ``close``). Returns the records sent; raises while the server is
    unreachable (``is_transient``: retry it with ``patiently``)."""
    logger = RunLogger(uri, run_id, buffer_dir)
    if not logger.buffer.exists():
        return 0
    records = [json.loads(line) for line in logger.buffer.read_text().splitlines() if line]
    # A record already in MLflow (its process sent it, then died before rewriting its
    # buffer) is not sent twice: a record is one log_batch, so its first metric at the
    # record's step and timestamp stands for all of it.
    history: dict[str, set] = {}
    unsent = []
    for r in records:
        if r["metrics"]:
            key = next(iter(r["metrics"]))
            if key not in history:
                history[key] = {(m.step, m.timestamp) for m in
                                logger._client.get_metric_history(run_id, key)}
            if (r["step"], r["ts"]) in history[key]:
                continue
        unsent.append(r)
    if len(unsent) < len(records):
        tmp = logger.buffer.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in unsent))
        os.replace(tmp, logger.buffer)
    pending = len(unsent)
    if not logger.flush(announce=False):  # no line per retry: ``patiently`` logs the gap
        raise ConnectionError(f"MLflow at {uri} unreachable: {logger.buffer} not replayed")
    log.warning("replayed %d buffered record(s) of run %s from %s", pending, run_id,
                logger.buffer)
    return pending


# Tune's own keys in a trial's results, not the loop's metrics
_RAY_KEYS = {"timestamp", "checkpoint_dir_name", "should_checkpoint", "done",
             "training_iteration", "trial_id", "date", "time_this_iter_s", "time_total_s",
             "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
             "timesteps_total", "episodes_total", "timesteps_since_restore", "warmup_time",
             "experiment_tag", "checkpoint_path"}


def result_metrics(row: dict) -> dict[str, float]:
    """The loop's own numeric metrics in one reported result (Ray's and Tune's keys, the
    config and anything not a number left out)."""
    row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}  # numpy
    return {k: float(v) for k, v in row.items()
            if k not in _RAY_KEYS and not k.startswith("config/")
            and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


class ResultLogger:
    """A run's results logged by the process that *receives* them, once per step.

    On a cluster the Train workers sit on GPU nodes, where the tracking URI the user gave
    (the head's ``http://127.0.0.1:5000``, MLflow behind an SSH tunnel) is not the server;
    every report, though, reaches a process on the head: Tune's trial runner
    (``cliptd.sweep.live``) and Ray Train's controller (``cliptd.training.live``, on the
    node of the process that called ``fit``). They log here: buffered while the server is
    away (``RunLogger``), each ``step_key`` value once, even when a restarted run reports
    an epoch again (the steps already in MLflow or buffered are read at the first result).
    """

    def __init__(self, uri: str, run_id: str, step_key: str = "epoch",
                 buffer_dir: str | None = None):
        self.run_id, self.step_key = run_id, step_key
        self.logger = RunLogger(uri, run_id, buffer_dir)
        self._logged: set[int] | None = None

    def log(self, result: dict) -> bool:
        """Log one reported result at its step; False when it has none or was logged."""
        step = result.get(self.step_key)
        if hasattr(step, "item"):
            step = step.item()
        if not isinstance(step, (int, float)) or isinstance(step, bool) or step != step:
            return False
        if self._logged is None:
            self._logged = self.logger.logged_steps(self.step_key)
        if int(step) in self._logged:
            return False
        self.logger.log_metrics(result_metrics(result), step=int(step))
        self._logged.add(int(step))
        return True

    def flush(self) -> bool:
        return self.logger.flush()


def backfill(uri: str, run_id: str, results: list[dict]) -> int:
    """Log the epochs that Ray recorded for a run (``results``: one dict per reported epoch,
    as Tune keeps them) but MLflow lacks, e.g. a buffer left on another node. Each epoch is
    logged whole, at its step, or not at all; returns the epochs logged."""
    from mlflow.entities import Metric

    c = client(uri)
    have = {m.step for m in c.get_metric_history(run_id, "epoch")}
    refused: set[str] = set()
    sent = 0
    for row in results:
        row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}  # numpy
        epoch = row.get("epoch")
        if not isinstance(epoch, (int, float)) or epoch != epoch or int(epoch) in have:
            continue
        ts = int(float(row.get("timestamp") or time.time()) * 1000)
        metrics = [Metric(k, v, ts, int(epoch)) for k, v in result_metrics(row).items()
                   if valid_metric_name(k, run_id, refused)]
        for i in range(0, len(metrics), 500):
            c.log_batch(run_id, metrics=metrics[i: i + 500])
        have.add(int(epoch))
        sent += 1
    if sent:
        log.warning("run %s: %d epoch(s) missing from MLflow logged from Ray's results",
                    run_id, sent)
    return sent
