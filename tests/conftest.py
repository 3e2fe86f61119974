"""Shared test setup: offline, single-threaded torch, and a tiny synthetic world built once."""

from __future__ import annotations

import os
from pathlib import Path

# Offline and quiet before anything imports transformers / open_clip / mlflow.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on a shared 2-CPU machine: more threads only oversubscribe (a 30x slowdown
# was measured for the teacher cache with 2 threads under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The embedded world at 3 % scale with a 5-step teacher and student (~30-60 s once)."""
    from cliptd.embedded.world import WorldConfig, ensure_world
    from cliptd.teacher.pretrain import TeacherPretrainConfig

    return ensure_world(tmp_path_factory.mktemp("world"), WorldConfig(
        scale=0.03, teacher=TeacherPretrainConfig(steps=5, batch_size=32), student_steps=5),
        progress=False, log=lambda *a, **k: None)


@pytest.fixture(scope="session")
def vcr_cache(tiny_world):
    """The tiny teacher's cache of the tiny world's VCR train split."""
    from cliptd.teacher.cache import ensure_cache
    from cliptd.teacher.clip import Teacher

    return ensure_cache(Teacher.load(tiny_world.teacher), tiny_world.data["vcr"],
                        tiny_world.root / "tc", progress=False)


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """One embedded world (budget small) shared by the CLI tests: built by the first run.
    ``CLIPTD_TEST_WORLD_CACHE=<folder>`` reuses one across sessions (running a single CLI
    test again then skips the ~1-2 min build)."""
    if os.environ.get("CLIPTD_TEST_WORLD_CACHE"):
        return Path(os.environ["CLIPTD_TEST_WORLD_CACHE"]).resolve()
    return tmp_path_factory.mktemp("cliptd-cache")
