"""Files and folders that appear whole or not at all: written beside their place under a
temporary name (``<out>.tmp-<pid>``), then renamed into place.

Every stage that writes a folder (prepared datasets, the synthetic world, the teacher, the
pretrained student) uses this, so an interrupted run leaves nothing a later run could take
for finished, and the next run sweeps away what dead processes left behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove ``<out>.tmp-<pid>`` / ``<out>.old-<pid>`` of dead processes or of this one."""
    for path in out.parent.glob(f"{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 1:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit():
            if int(pid) == os.getpid() or not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first (a folder cannot
    be renamed over a non-empty one) and removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``out``, on error it is gone."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the whole file to (with any writer:
    ``write_text``, ``pq.write_table``, ``fig.savefig``); on success it replaces ``path``
    in one rename, on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` whole or not at all."""
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return Path(path)
