"""MLflow records: RunLogger against a local sqlite store, buffering while the server is
unreachable and replaying afterwards; runs found again by tag, never duplicated."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from cliptd.tracking import runs as tracking


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local sqlite tracking store with one experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    exp = tracking.get_experiment(uri, "cliptd-test")
    return uri, exp


@pytest.fixture
def run_id(store):
    uri, exp = store
    return tracking.client(uri).create_run(exp).info.run_id


@pytest.fixture
def fast_fail(monkeypatch):
    """No HTTP retries / long timeouts, so an unreachable server fails in well under 1 s."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracking.client(uri).get_metric_history(run_id, key))


def test_metrics_land_in_mlflow_with_steps(store, run_id, tmp_path):
    uri, _ = store
    logger = tracking.RunLogger(uri, run_id, buffer_dir=str(tmp_path))
    logger.log_metrics({"val/id/q_a": 0.25, "epoch": 1, "loss": 1.5, "bad": float("nan"),
                        "name": "skipped"}, step=1)
    logger.log_metrics({"val/id/q_a": 0.5, "epoch": 2, "loss": 1.0}, step=2)
    assert history(uri, run_id, "val/id/q_a") == [(1, 0.25), (2, 0.5)]
    assert history(uri, run_id, "epoch") == [(1, 1.0), (2, 2.0)]
    assert history(uri, run_id, "loss") == [(1, 1.5), (2, 1.0)]
    assert history(uri, run_id, "bad") == [] and history(uri, run_id, "name") == []
    assert not logger.buffer.exists()  # nothing left to replay
    assert logger.gap_started is None


def test_malformed_metric_name_is_dropped_not_buffered_forever(store, run_id, tmp_path,
                                                              caplog):
    """MLflow refuses a whole batch over one bad name (an empty path segment, as an empty
    question type once made): the others land, nothing stays buffered, the name is named."""
    uri, _ = store
    logger = tracking.RunLogger(uri, run_id, buffer_dir=str(tmp_path))
    with caplog.at_level("WARNING"):
        logger.log_metrics({"val/id/acc": 0.5, "val/id/qtype//acc": 0.5}, step=1)
        logger.log_metrics({"val/id/acc": 0.75, "val/id/qtype//acc": 0.75}, step=2)
    assert history(uri, run_id, "val/id/acc") == [(1, 0.5), (2, 0.75)]
    assert not logger.buffer.exists() and logger.gap_started is None
    warned = [r for r in caplog.records if "val/id/qtype//acc" in r.getMessage()]
    assert len(warned) == 1, "warned once, naming the metric"


def test_unreachable_server_buffers_then_replays(store, run_id, tmp_path, fast_fail):
    uri, _ = store
    dead = f"http://127.0.0.1:{closed_port()}"
    logger = tracking.RunLogger(dead, run_id, buffer_dir=str(tmp_path))
    assert logger.buffer.parent == tmp_path
    sent = [({"score": 0.1 * s, "loss": 2.0 - 0.1 * s, "epoch": s}, s) for s in range(1, 5)]
    start = time.time()
    for metrics, step in sent:
        logger.log_metrics(metrics, step=step)  # must not raise
    assert time.time() - start < 30
    assert logger.gap_started is not None
    records = [json.loads(line) for line in logger.buffer.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["metrics"] == pytest.approx({"score": 0.3, "loss": 1.7, "epoch": 3.0})
    assert logger.flush() is False  # still unreachable: the buffer stays
    assert logger.buffer.exists()
    assert history(uri, run_id, "score") == []

    logger._client = tracking.client(uri)  # the server answers again
    assert logger.flush() is True
    assert not logger.buffer.exists()
    assert logger.gap_started is None
    for key in ("score", "loss", "epoch"):
        got = history(uri, run_id, key)
        assert [s for s, _ in got] == [1, 2, 3, 4], key
        assert [v for _, v in got] == pytest.approx([m[key] for m, _ in sent]), key
    # a later metric goes straight through, nothing replayed twice
    logger.log_metrics({"score": 0.9}, step=5)
    assert [s for s, _ in history(uri, run_id, "score")] == [1, 2, 3, 4, 5]


def test_buffer_survives_a_new_logger(store, run_id, tmp_path, fast_fail):
    """A crashed process leaves its buffer; the next logger for the run replays it."""
    uri, _ = store
    dead = tracking.RunLogger(f"http://127.0.0.1:{closed_port()}", run_id,
                              buffer_dir=str(tmp_path))
    dead.log_metrics({"score": 0.4}, step=7)
    assert dead.buffer.exists()
    alive = tracking.RunLogger(uri, run_id, buffer_dir=str(tmp_path))
    assert alive.buffer == dead.buffer
    alive.log_metrics({"score": 0.6}, step=8)
    assert history(uri, run_id, "score") == [(7, 0.4), (8, 0.6)]


def test_close_gives_up_without_raising(store, run_id, tmp_path, fast_fail):
    logger = tracking.RunLogger(f"http://127.0.0.1:{closed_port()}", run_id,
                                buffer_dir=str(tmp_path))
    logger.log_metrics({"score": 1.0}, step=1)
    logger.close(attempts=2, wait_s=0.01)
    assert logger.buffer.exists()  # kept for a later replay, not dropped


def test_unreachable_server_does_not_stall_training(store, run_id, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    logger = tracking.RunLogger(f"http://127.0.0.1:{closed_port()}", run_id,
                                buffer_dir=str(tmp_path))
    worker = threading.Thread(target=logger.log_metrics, args=({"score": 0.5}, 1), daemon=True)
    worker.start()
    worker.join(timeout=15)
    assert not worker.is_alive(), "log_metrics still blocked after 15 s"


def test_check_reachable_closed_port_fails_fast():
    start = time.time()
    with pytest.raises(ConnectionError, match="unreachable"):
        tracking.check_reachable(f"http://127.0.0.1:{closed_port()}", timeout_s=5)
    assert time.time() - start < 5


def test_check_reachable_local_store(store):
    tracking.check_reachable(store[0])  # no exception


FIRST_TOUCH = """
import sys, time
from pathlib import Path
from cliptd.tracking import runs as tracking
from mlflow.tracking import MlflowClient  # imported before the start line, not after it
uri, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
tracking.check_reachable(uri)
"""


def test_two_processes_creating_one_sqlite_store_at_once_both_succeed(tmp_path):
    """Two commands started together on a fresh mlflow.db both run MLflow's migrations;
    unserialised, one fails half-way ("table _alembic_tmp_latest_metrics already exists")."""
    import subprocess
    import sys

    for attempt in range(2):
        db, go = tmp_path / f"mlflow-{attempt}.db", tmp_path / f"go-{attempt}"
        ready = [tmp_path / f"ready-{attempt}-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", FIRST_TOUCH, f"sqlite:///{db}",
                                   str(r), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in ready]
        deadline = time.time() + 120
        while not all(r.exists() for r in ready) and time.time() < deadline:
            time.sleep(0.01)
        go.touch()
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out[-2000:]
        assert tracking.client(f"sqlite:///{db}").search_experiments(max_results=1)
        assert list(tmp_path.glob("*.lock")) == []  # nothing left beside the store


def test_find_or_create_trial_run_is_idempotent(store):
    uri, exp = store
    parent = tracking.find_or_create_parent(uri, exp, "sweep-1", "sweep", {"task": "vcr"})
    assert tracking.find_or_create_parent(uri, exp, "sweep-1", "sweep", {}) == parent
    params = {"lr": 1e-4, "distill": {"lam": 2.0, "method": "cliptd"}}
    first, created = tracking.find_or_create_trial_run(
        uri, exp, parent, "trial-abc", "trial abc", {"method": "cliptd"}, params)
    second, created_again = tracking.find_or_create_trial_run(
        uri, exp, parent, "trial-abc", "trial abc", {"method": "cliptd"}, params)
    assert (created, created_again) == (True, False)
    assert first == second
    c = tracking.client(uri)
    runs = c.search_runs([exp], filter_string="tags.`cliptd.trial_id` = 'trial-abc'")
    assert [r.info.run_id for r in runs] == [first]  # no duplicate
    run = c.get_run(first)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["cliptd.kind"] == "trial" and run.data.tags["method"] == "cliptd"
    assert run.data.params["distill.lam"] == "2.0" and run.data.params["lr"] == "0.0001"
    other, created_other = tracking.find_or_create_trial_run(
        uri, exp, parent, "trial-xyz", "trial xyz", {}, {})
    assert created_other and other != first


def test_flatten():
    assert tracking.flatten({"a": 1, "b": {"c": 2, "d": {"e": 3}}}) == {
        "a": 1, "b.c": 2, "b.d.e": 3}


# --------------------------------------------------------------------------------------
# A sweep riding out an outage: patient calls, leftover buffers replayed, Ray's results
# filling in what no buffer here holds (tests/test_tracking_outage.py: the real thing).


def test_patiently_retries_until_the_server_answers(caplog):
    calls = []

    def flaky():
        calls.append(time.time())
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "ok"

    with caplog.at_level("WARNING", logger="cliptd.tracking"):
        assert tracking.patiently(flaky, "doing a thing", wait_s=0.01) == "ok"
    assert len(calls) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, "the gap: one line when it starts, one when it ends"
    assert "unreachable while doing a thing" in messages[0]
    assert "reachable again after" in messages[1] and "2 failed attempts" in messages[1]


def test_patiently_gives_up_after_its_patience(caplog):
    def dead():
        raise ConnectionError("refused")

    start = time.time()
    with caplog.at_level("WARNING", logger="cliptd.tracking"), \
            pytest.raises(ConnectionError):
        tracking.patiently(dead, "waiting", patience=0.3, wait_s=0.05)
    assert time.time() - start < 5
    assert "giving up" in caplog.records[-1].getMessage()


def test_patiently_does_not_retry_a_refused_request():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    calls = []

    def refused():
        calls.append(1)
        raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException):
        tracking.patiently(refused, "logging", wait_s=0.01)
    assert calls == [1]


def test_patiently_against_a_dead_server_is_transient(fast_fail):
    """What MLflow raises for a closed port counts as 'unreachable'."""
    c = tracking.client(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(Exception) as info:
        c.search_runs(["0"])
    assert tracking.is_transient(info.value)


def test_only_network_errors_are_transient():
    """A refused or timed-out connection is worth waiting for; a local file or install error
    (the venv replaced under a running sweep: ELOOP under site-packages) is not, and used to
    be retried for the whole 30-minute patience."""
    import errno
    import socket

    import requests

    for exc in (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), TimeoutError(),
                socket.gaierror(-2, "Name or service not known"),
                OSError(errno.EHOSTUNREACH, "No route to host"),
                requests.ConnectionError("down")):
        assert tracking.is_transient(exc), exc
    for exc in (OSError(errno.ELOOP, "Too many levels of symbolic links"),
                FileNotFoundError(errno.ENOENT, "missing"), PermissionError(), ValueError()):
        assert not tracking.is_transient(exc), exc


def test_replay_buffer_sends_what_a_killed_process_left(store, run_id, tmp_path, fast_fail):
    """A trial's process killed while the server was away leaves its buffer: the sweep
    replays it, each record once, even one the process had already sent."""
    uri, _ = store
    dead = tracking.RunLogger(f"http://127.0.0.1:{closed_port()}", run_id,
                              buffer_dir=str(tmp_path))
    for step in (1, 2, 3):
        dead.log_metrics({"score": 0.1 * step, "epoch": step}, step=step)
    assert dead.buffer.exists()
    # as if step 1 had reached MLflow before the process died, the buffer not yet rewritten
    first = json.loads(dead.buffer.read_text().splitlines()[0])
    alive = tracking.RunLogger(uri, run_id, buffer_dir=str(tmp_path / "elsewhere"))
    alive._client.log_batch(run_id, metrics=[
        __import__("mlflow").entities.Metric(k, v, first["ts"], 1)
        for k, v in first["metrics"].items()])
    with pytest.raises(Exception) as info:  # still down: keep everything, raise for
        tracking.replay_buffer(f"http://127.0.0.1:{closed_port()}", run_id, str(tmp_path))
    assert tracking.is_transient(info.value)  # ... patiently to retry
    assert len(dead.buffer.read_text().splitlines()) == 3
    assert tracking.replay_buffer(uri, run_id, str(tmp_path)) == 2
    assert history(uri, run_id, "score") == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))]
    assert history(uri, run_id, "epoch") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert not dead.buffer.exists()
    assert tracking.replay_buffer(uri, run_id, str(tmp_path)) == 0  # nothing left


def test_backfill_logs_only_the_epochs_mlflow_lacks(store, run_id):
    import numpy as np

    uri, _ = store
    c = tracking.client(uri)
    c.log_metric(run_id, "epoch", 1, step=1)
    c.log_metric(run_id, "score", 0.25, step=1)
    rows = [  # as Tune keeps them (progress.csv through pandas: numpy values, NaN gaps)
        {"epoch": np.int64(1), "score": 0.25, "trial_id": "abc", "timestamp": 1000,
         "training_iteration": 1, "config/lr": 1e-4, "done": False},
        {"epoch": np.int64(2), "score": np.float64(0.5), "val/id/q_a": 0.5,
         "time/setup_s": float("nan"), "trial_id": "abc", "timestamp": 1005,
         "training_iteration": 2, "config/lr": 1e-4, "done": True, "bad//name": 1.0},
    ]
    assert tracking.backfill(uri, run_id, rows) == 1
    assert history(uri, run_id, "epoch") == [(1, 1.0), (2, 2.0)]
    assert history(uri, run_id, "score") == [(1, 0.25), (2, 0.5)]
    assert history(uri, run_id, "val/id/q_a") == [(2, 0.5)]
    metrics = c.get_run(run_id).data.metrics
    assert not {"trial_id", "timestamp", "training_iteration", "config/lr", "done",
                "time/setup_s", "bad//name"} & set(metrics)
    assert tracking.backfill(uri, run_id, rows) == 0  # idempotent


def test_trial_run_left_without_params_gets_them(store):
    """The server went away between creating a trial's run and logging its params: the
    retried find-or-create logs them instead of returning a run without params."""
    uri, exp = store
    c = tracking.client(uri)
    bare = c.create_run(exp, tags={"cliptd.trial_id": "trial-bare"}).info.run_id
    run_id, created = tracking.find_or_create_trial_run(
        uri, exp, "parent", "trial-bare", "t", {}, {"lr": 1e-4})
    assert (run_id, created) == (bare, False)
    assert c.get_run(bare).data.params == {"lr": "0.0001"}


def test_logger_records_the_gap_in_the_run(store, run_id, tmp_path, fast_fail):
    uri, _ = store
    logger = tracking.RunLogger(f"http://127.0.0.1:{closed_port()}", run_id,
                                buffer_dir=str(tmp_path))
    logger.log_metrics({"score": 0.1}, step=1)
    logger._client = tracking.client(uri)
    logger.log_metrics({"score": 0.2}, step=2)
    gap = history(uri, run_id, "sys/tracking_gap_s")
    assert len(gap) == 1 and gap[0][0] == 2 and gap[0][1] >= 0


class _Result:
    """What close_runs reads of a Tune result."""

    def __init__(self, trial_id: str, rows: list[dict]):
        self.metrics = rows[-1]
        self.config = {"seed": 0}
        self.error = None
        self.checkpoint = None
        self._rows = rows

    @property
    def metrics_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self._rows)


def test_close_runs_makes_every_trial_whole(store, tiny_world, tmp_path, monkeypatch,
                                           fast_fail):
    """Closing a search: one trial's last epoch only in its local buffer (Tune killed it
    while the server was away), another's only in Ray's results (its buffer on another
    node), a third never opened (the server away all its life): all end FINISHED with
    every epoch, each once."""
    from cliptd.sweep.records import close_runs

    uri, exp = store
    monkeypatch.setenv("CLIPTD_TRACKING_BUFFER", str(tmp_path))
    parent = tracking.find_or_create_parent(uri, exp, "sweep-close", "s", {})
    grid, ids = [], {}
    for name in ("buffered", "remote"):
        trial = f"sweep-close/{name}"
        ids[name], _ = tracking.find_or_create_trial_run(uri, exp, parent, trial, name, {}, {})
        rows = [{"epoch": e, "score": 0.1 * e, "trial_id": name, "timestamp": 1000 + e}
                for e in (1, 2)]
        tracking.RunLogger(uri, ids[name]).log_metrics({"epoch": 1, "score": 0.1}, step=1)
        grid.append(_Result(trial, rows))
    dead = tracking.RunLogger(f"http://127.0.0.1:{closed_port()}", ids["buffered"])
    dead.log_metrics({"epoch": 2, "score": 0.2}, step=2)
    assert dead.buffer.exists()
    grid.append(_Result("sweep-close/never-opened", [
        {"epoch": e, "score": 0.1 * e, "trial_id": "never-opened", "timestamp": 1000 + e}
        for e in (1, 2)]))
    meta = {"tracking_uri": uri, "experiment_id": exp, "sweep_id": "sweep-close",
            "epochs": 2, "parent_run_id": parent, "condition": "c", "phase": "search",
            "base": {"task": "vcr", "data": str(tiny_world.data["vcr"])},
            "searcher_seed": 0, "versions": {}, "trial_kind": "light", "workers": 1}
    records = close_runs(grid, meta, "search")
    assert [r["trial_id"] for r in records] == ["sweep-close/buffered", "sweep-close/remote",
                                                "sweep-close/never-opened"]
    c = tracking.client(uri)
    (opened,) = c.search_runs([exp], filter_string=(
        "tags.`cliptd.trial_id` = 'sweep-close/never-opened'"))
    assert opened.data.tags["mlflow.parentRunId"] == parent
    ids["never-opened"] = opened.info.run_id
    for name, run_id in ids.items():
        assert history(uri, run_id, "epoch") == [(1, 1.0), (2, 2.0)], name
        assert history(uri, run_id, "score") == [(1, 0.1), (2, 0.2)], name
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["cliptd.early_stopped"] == "False"
    # what no live logger sent is recovered from Ray's results, and the run says so
    assert {name: c.get_run(run_id).data.tags.get("cliptd.backfilled_epochs")
            for name, run_id in ids.items()} == {"buffered": None, "remote": "1",
                                                 "never-opened": "2"}
    assert not list(tmp_path.glob("*.jsonl"))


def test_logged_steps_sees_mlflow_and_the_buffer(store, run_id, tmp_path, fast_fail):
    """What a restarted worker must not log again: the epochs MLflow has, plus the ones
    still buffered; with the server away, the buffer alone (never an error)."""
    uri, _ = store
    logger = tracking.RunLogger(uri, run_id, buffer_dir=str(tmp_path))
    assert logger.logged_steps() == set()
    logger.log_metrics({"epoch": 1, "score": 0.2}, step=1)
    logger.log_metrics({"epoch": 2, "score": 0.3}, step=2)
    assert tracking.RunLogger(uri, run_id, buffer_dir=str(tmp_path)).logged_steps() == {1, 2}
    away = tracking.RunLogger(f"http://127.0.0.1:{closed_port()}", run_id,
                              buffer_dir=str(tmp_path))
    away.log_metrics({"epoch": 3, "score": 0.4}, step=3)
    assert away.logged_steps() == {3}


def test_result_logger_logs_each_epoch_once_from_the_receiving_process(store, run_id,
                                                                        tmp_path):
    """What Tune's trial runner / Train's controller receive, logged at its epoch: Ray's own
    keys left out, an epoch reported again (a restarted worker group) not logged twice,
    also by a new logger (a restarted driver)."""
    uri, _ = store
    buf = str(tmp_path / "buf")
    log = tracking.ResultLogger(uri, run_id, buffer_dir=buf)
    row = {"epoch": 1, "score": 0.25, "train/loss": 1.5, "timestamp": 1700000000,
           "training_iteration": 1, "trial_id": "abc", "done": False, "config/lr": 0.1,
           "checkpoint_path": "/x", "time_total_s": 3.0}
    assert log.log(row)
    assert not log.log({**row, "score": 0.99})  # the same epoch again
    assert not log.log({"score": 1.0})  # no epoch: nothing to log it at
    assert tracking.ResultLogger(uri, run_id, buffer_dir=buf).log({**row, "score": 0.5}) \
        is False
    assert log.log({**row, "epoch": 2, "score": 0.5})
    c = tracking.client(uri)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "score")] == \
        [(1, 0.25), (2, 0.5)]
    assert set(c.get_run(run_id).data.metrics) == {"epoch", "score", "train/loss"}


def test_live_tracking_opens_each_trials_run_and_logs_its_results(store, tiny_world,
                                                                    tmp_path, monkeypatch):
    """The search's process opens a trial's run when it starts (a trial never talks to
    MLflow) and logs each epoch once; a run that cannot be opened yet (the server away at
    the trial's start) is opened with a later result, nothing lost or raised."""
    import pickle
    from types import SimpleNamespace

    from cliptd.sweep import records
    from cliptd.sweep.live import LiveTracking

    monkeypatch.setenv("CLIPTD_TRACKING_BUFFER", str(tmp_path / "buf"))
    uri, exp = store
    c = tracking.client(uri)
    parent = c.create_run(exp, tags={"cliptd.kind": "sweep"}).info.run_id
    meta = {"tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent,
            "sweep_id": "live", "condition": "synthetic-shots0.05", "phase": "search",
            "base": {"task": "vcr", "data": str(tiny_world.data["vcr"]),
                     "preset": "synthetic", "distill": {"method": "cliptd"}},
            "searcher_seed": 3, "versions": {"ray": "2.60.0"}, "trial_kind": "light",
            "workers": 1, "method": "cliptd"}
    cb = LiveTracking(meta)

    def runs_of(trial_id):
        return c.search_runs([exp], filter_string=f"tags.`cliptd.trial_id` = 'live/{trial_id}'")

    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.002})
    cb.on_trial_start(0, [], trial)
    (run,) = runs_of("t1")
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["method"] == "cliptd" and run.data.tags["trial_kind"] == "light"
    assert run.data.params["lr"] == "0.002" and run.data.params["searcher_seed"] == "3"
    assert run.inputs.dataset_inputs  # the prepared dataset as its input
    cb.on_trial_result(0, [], trial, {"epoch": 1, "score": 0.1})
    assert [m.step for m in c.get_metric_history(run.info.run_id, "score")] == [1]
    cb.on_trial_result(0, [], trial, {"epoch": 1, "score": 0.1})  # a re-report
    cb.on_trial_result(0, [], trial, {"epoch": 2, "score": 0.2})
    cb.on_trial_complete(0, [], trial)
    assert [m.step for m in c.get_metric_history(run.info.run_id, "score")] == [1, 2]
    cb.on_trial_start(0, [], trial)  # a restarted trial: the same run
    assert len(runs_of("t1")) == 1

    real, calls = records.open_trial_run, []

    def away_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the server is away")
        return real(*a, **kw)

    monkeypatch.setattr(records, "open_trial_run", away_once)
    other = SimpleNamespace(trial_id="t2", config={"lr": 0.001})
    cb.on_trial_start(0, [], other)  # the server away: no run, no error
    assert runs_of("t2") == []
    cb.on_trial_result(0, [], other, {"epoch": 1, "score": 0.3})
    (run2,) = runs_of("t2")
    cb.on_trial_complete(0, [], other)
    assert [m.value for m in c.get_metric_history(run2.info.run_id, "score")] == [0.3]

    # a trial that failed for good before its first report: its run ends FAILED
    monkeypatch.setattr(records, "open_trial_run", real)
    failing = SimpleNamespace(trial_id="t3", config={"lr": 0.001})
    cb.on_trial_start(0, [], failing)
    cb.on_trial_error(0, [], failing)
    (run3,) = runs_of("t3")
    assert run3.info.status == "FAILED"

    restored = pickle.loads(pickle.dumps(cb))  # Tune saves its callbacks with the sweep
    assert restored.meta == cb.meta and restored._opened == set()
