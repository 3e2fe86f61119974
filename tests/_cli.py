"""Running the real CLI in a subprocess, with a diagnosis when it does not finish in time.

A sweep that hangs on a CI machine leaves nothing to read but a timeout; ``run_cli`` keeps
the whole output in a file and, on timeout, attaches what each live process was doing
(``py-spy dump`` of the CLI and of every Ray worker) and the tail of Ray's own logs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _python_processes() -> list[tuple[int, str]]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "cliptd" in cmd or cmd.startswith("ray::") or "default_worker.py" in cmd:
            out.append((int(d.name), cmd[:160]))
    return out


def diagnose(log: Path, lines: int = 120) -> str:
    parts = [f"--- last {lines} lines of the CLI's output ({log}) ---",
             "\n".join(log.read_text(errors="replace").splitlines()[-lines:])]
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    for pid, cmd in _python_processes():
        if pid == os.getpid():
            continue
        try:
            dump = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True,
                                  text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            dump = f"(py-spy failed: {exc})"
        parts += [f"--- py-spy dump of {pid}: {cmd} ---", dump[-3000:]]
    logs = Path("/tmp/ray/session_latest/logs")
    for f in sorted(logs.glob("*.err"))[:40] if logs.exists() else []:
        text = f.read_text(errors="replace").strip()
        if text:
            parts += [f"--- {f.name} (tail) ---", "\n".join(text.splitlines()[-15:])]
    return "\n".join(parts)


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, theirs, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:  # a zombie (state Z) is dead, only not yet reaped
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_cli(proc: subprocess.Popen) -> None:
    """SIGKILL a CLI started in a session of its own, and every process it started: its
    local Ray instance (GCS, raylet, workers) lives in sessions of its own, so killing the
    group leaves it running. Only that family: ``ray stop --force`` would stop every Ray
    instance on the machine, a developer's own sweep beside the tests too."""
    family = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(pid) for pid in family):
        time.sleep(0.2)


def run_cli(cmd: list[str], env: dict, cwd: Path, timeout: float, log: Path):
    """Run to completion; on timeout, fail with a diagnosis, then kill the process group."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            report = diagnose(log)
            kill_cli(proc)
            pytest.fail(f"{' '.join(cmd[1:])} did not finish in {timeout:.0f} s\n{report}")
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(errors="replace"),
                                       "")
