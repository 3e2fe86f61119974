"""What a reused Tune actor keeps for its next trial: decoded images (one store per image
size) and the last training subset's teacher targets, re-read when the cache is rebuilt."""

from __future__ import annotations

import os
import shutil

from cliptd.data.problems import ImageStore
from cliptd.training.run import last_cache_load


def test_one_image_store_per_size_per_process():
    assert ImageStore.shared(32) is ImageStore.shared(32)
    assert ImageStore.shared(32) is not ImageStore.shared(48)


def test_the_last_teacher_load_is_kept_until_the_cache_changes(vcr_cache, tmp_path):
    folder = tmp_path / "tc"
    shutil.copytree(vcr_cache, folder)
    from cliptd.teacher.cache import load_cache

    every = frozenset(load_cache(folder))
    some = frozenset(sorted(every)[:3])
    first = last_cache_load(folder, some)
    assert set(first) == some and last_cache_load(folder, some) is first
    assert set(last_cache_load(folder, every)) == every  # another subset: loaded
    again = last_cache_load(folder, some)
    assert again is not first and set(again) == some  # only the last load is kept
    # rebuilt in place (a new _SUCCESS): read again, never served stale
    stamp = (folder / "_SUCCESS").stat().st_mtime_ns
    os.utime(folder / "_SUCCESS", ns=(stamp + 10**9, stamp + 10**9))
    assert last_cache_load(folder, some) is not again
