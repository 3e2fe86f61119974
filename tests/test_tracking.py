"""MLflow records: RunLogger against a local sqlite store, buffering while the server is
unreachable and replaying afterwards; runs found again by tag, never duplicated."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from cliptd import tracking


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
