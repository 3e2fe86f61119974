"""Bad input on the command line is refused before any work starts: a clear one-line
message, a non-zero exit, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cliptd.sweep.space import shipped_spaces

REPO = Path(__file__).resolve().parents[2]


def _run(tmp: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPTD_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--task", "gqa"], "invalid choice: 'gqa'"),
    (["--task", "vcr", "--methods", "none,distil"], "'distil' is not in"),
    (["--task", "vcr", "--budget", "huge"], "invalid choice: 'huge'"),
    (["--task", "vcr", "--num-samples", "0"], "--num-samples: expected a positive integer, "
     "got 0"),
    (["--task", "vcr", "--num-samples", "many"], "--num-samples: expected a positive "
     "integer, got 'many'"),
    (["--task", "snli_ve", "--space", str(shipped_spaces()["vcr"])],
     "task: 'vcr' but --task snli_ve"),
])
def test_tune_refuses_bad_arguments(tmp_path, args, message):
    proc = _run(tmp_path, "cliptd.tune", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_tune_refuses_invalid_space(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("task: vcr\nconditions: {shots: [0.05]}\nmethods: [none]\n"
                     "search:\n  lr: {loguniform: [1.0e-3, 1.0e-4]}\n")
    proc = _run(tmp_path, "cliptd.tune", "--task", "vcr", "--space", str(space))
    assert proc.returncode == 2
    assert f"{space}: search.lr: impossible range" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_tune_refuses_unreachable_tracking_server(tmp_path):
    proc = _run(tmp_path, "cliptd.tune", "--task", "vcr", "--tracking-uri",
                "http://127.0.0.1:9")
    assert proc.returncode == 2
    assert "MLflow tracking at http://127.0.0.1:9 is not usable" in proc.stderr
    assert not (tmp_path / "cache").exists(), "no work may start before tracking is checked"


def test_train_refuses_unknown_method_and_bad_config(tmp_path):
    proc = _run(tmp_path, "cliptd.train", "--task", "vcr", "--method", "distil")
    assert proc.returncode == 2 and "invalid choice: 'distil'" in proc.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1.0e-4\nlearning_rate: 3\n")
    proc = _run(tmp_path, "cliptd.train", "--task", "vcr", "--config", str(cfg))
    assert proc.returncode == 2
    assert "unknown config keys ['learning_rate']" in proc.stderr
    assert "Traceback" not in proc.stderr
