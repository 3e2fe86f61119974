"""Two hosts that only reach each other over the network, on one Linux machine.

Two network namespaces joined by a veth pair: each has its own loopback and the link, no
other interface and no route anywhere else, so ``127.0.0.1`` on one is not the other's.
``Hosts`` starts and stops processes in them and removes everything it made (the
processes, by pid; then the namespaces). Every address used is a namespace's own loopback
or one end of the link (``10.231.0.1`` / ``10.231.0.2``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

HEAD_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"


def why_not() -> str | None:
    """Why this machine cannot make namespaces (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "the `ip` command (iproute2) is missing"
    probe = f"cltdprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """``head`` and ``worker``: two namespaces, one veth link (interface ``cl0`` on both)."""

    def __init__(self, tag: str | None = None, single: bool = False):
        """``single``: one namespace (``head``) with nothing but its own loopback."""
        tag = tag or str(os.getpid() % 100000)
        self.ns = {"head": f"cltd{tag}h"} if single else {"head": f"cltd{tag}h",
                                                            "worker": f"cltd{tag}w"}
        self.ip = {"head": HEAD_IP, "worker": WORKER_IP}
        self.procs: list[tuple[str, subprocess.Popen, object]] = []
        made = []
        try:
            for ns in self.ns.values():
                _ip("netns", "add", ns)
                made.append(ns)
            if single:
                _ip("-n", self.ns["head"], "link", "set", "lo", "up")
                return
            a, b = f"cltd{tag}a", f"cltd{tag}b"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", self.ns["head"])
            _ip("link", "set", b, "netns", self.ns["worker"])
            for host, dev in (("head", a), ("worker", b)):
                ns = self.ns[host]
                _ip("-n", ns, "link", "set", dev, "name", "cl0")
                _ip("-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", "cl0")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", "cl0", "up")
        except Exception:
            for ns in made:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            raise

    def cmd(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def run(self, host: str, argv: list[str], env: dict, timeout: float = 120, **kw):
        return subprocess.run(self.cmd(host, argv), env=env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def start(self, host: str, argv: list[str], env: dict, log: Path, cwd=None
              ) -> subprocess.Popen:
        """A long-running process in its own session (its group is ours to signal)."""
        f = log.open("wb")
        p = subprocess.Popen(self.cmd(host, argv), env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=cwd)
        self.procs.append((host, p, f))
        return p

    def wait_for(self, what: str, check, timeout: float, logs: list[Path] = ()) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-2500:]}"
                                  for p in logs if p.exists())
                raise TimeoutError(f"{what}: not within {timeout:.0f} s\n{tails}")
            time.sleep(0.5)

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns[host]], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]

    def close(self) -> list[str]:
        """Stop what was started (SIGTERM, the last ones first), then anything still in
        the namespaces (SIGKILL, by pid), and delete them. Returns what had to be killed."""
        killed = []
        for _, p, f in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            f.close()
        for host in [h for h in ("worker", "head") if h in self.ns]:
            deadline = time.monotonic() + 15
            while self.pids(host) and time.monotonic() < deadline:
                time.sleep(0.3)
            for pid in self.pids(host):
                try:
                    killed.append(Path(f"/proc/{pid}/cmdline").read_bytes()
                                  .replace(b"\0", b" ").decode(errors="replace")[:120])
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, FileNotFoundError):
                    pass
        for _, p, _ in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)
        time.sleep(0.5)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return killed
