"""``python -m cliptd.teacher_cache`` on a Ray cluster: shards computed by teacher actors
(here two CPU actors of a local Ray), written by the command; the cache holds what an
in-process pass computes."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import run_cli

pytestmark = pytest.mark.slow


def test_actor_pass_equals_the_local_one(tiny_world, tmp_path):
    from cliptd.teacher import cache as teacher_cache
    from cliptd.teacher.clip import Teacher

    data = tiny_world.data["vcr"]
    local = teacher_cache.ensure_cache(Teacher.load(tiny_world.teacher), data,
                                       tmp_path / "local", progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = run_cli([sys.executable, "-m", "cliptd.teacher_cache", "--data", str(data),
                    "--teacher", tiny_world.teacher.model, "--out", str(tmp_path / "ray"),
                    "--actors", "2", "--gpus-per-actor", "0"], env, tmp_path, 600,
                   tmp_path / "pass.log")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "teacher pass on 2 Ray actor(s)" in proc.stdout
    folder = Path(re.search(r"^teacher cache: (\S+)$", proc.stdout, re.M).group(1))
    assert folder.name == local.name  # same teacher, data and split: the same cache key
    a, b = teacher_cache.load_cache(local), teacher_cache.load_cache(folder)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        for field in ("region_emb", "pooled", "words", "rel_v", "rel_w"):
            np.testing.assert_allclose(a[key][field], b[key][field], atol=2e-3)
        assert a[key]["correct"] == b[key]["correct"]
