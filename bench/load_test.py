"""Load: a long sweep on the smallest budget runs to the end without memory growing across
trials, and every trial is in MLflow.

    .venv/bin/python bench/load_test.py                    # 50 trials, ≈ 15 min on 2 cores
    .venv/bin/python bench/load_test.py --num-samples 4    # the machinery, ≈ 2-3 min
    .venv/bin/python bench/all.py --only load --out /tmp/load-all.json   # + its README row

Runs ``python -m cliptd.tune --task vcr --budget small --methods cliptd --num-samples N``
(a fresh ``--name``, a temporary SQLite tracking store and Ray storage; the embedded world
from ``$CLIPTD_CACHE`` or ``./.cliptd_cache``, built there in about a minute if missing).
The ``small`` budget's ``seeds: 2`` adds the best config's seed-1 re-run (seed 0 is the
search's best trial; a second re-run if that trial was stopped early): those are checked
like the searched trials but left out of the memory comparison, which is over the N
searched trials alone.

While it runs, every ``--interval`` seconds: the machine's used memory (MemTotal −
MemAvailable, what ``free`` calls used) and the summed RSS and PSS of the sweep's process
tree (the CLI and every Ray process under it). Then, from MLflow and Ray's own trial
records:

* every Tune trial has exactly one MLflow run, FINISHED, with its metrics (``score``,
  ``epoch``, ``sys/peak_rss_mb``), and the search ran exactly N trials;
* memory: the first ``--window`` searched trials (by start time) against the last ones —
  each trial's worker peak RSS (``sys/peak_rss_mb``, logged by the loop at every epoch;
  compared at its last epoch and at epoch 1, which every trial reaches), and the machine /
  process-tree samples taken between the first start and the last metric of each group.

Writes ``--out`` (default bench/results/load.json), prints a summary, and exits 1 when a
trial is missing from MLflow (or not FINISHED, or without metrics), the sweep fails, or a
gated figure's mean (per-trial peaks: mean and max) grew by more than ``--threshold``
(default 15 %).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
REQUIRED_METRICS = ("score", "epoch", "sys/peak_rss_mb")


# --------------------------------------------------------------------------------------
# Sampling memory


def machine_used_mb() -> float:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0])  # kB
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def process_tree(root: int) -> list[int]:
    """``root`` and every process descending from it (by parent pid)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_memory_mb(root: int) -> tuple[float, float, int]:
    """(RSS, PSS, processes) summed over the tree; RSS counts shared pages once per
    process, PSS splits them among the processes sharing them."""
    rss = pss = 0.0
    pids = process_tree(root)
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss, len(pids)


class Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss, pss, n = tree_memory_mb(self.pid)
            self.samples.append({"t": time.time(), "machine_used_mb": round(machine_used_mb(), 1),
                                 "tree_rss_mb": round(rss, 1), "tree_pss_mb": round(pss, 1),
                                 "processes": n})
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


# --------------------------------------------------------------------------------------
# What MLflow and Ray hold


def ray_trials(storage: Path, sweep: str) -> dict[str, dict]:
    """Every Tune trial of the sweep (a trial folder under each Tuner's experiment folder)
    → its phase and the results Ray recorded for it. A trial that never reported is keyed
    by its folder."""
    out = {}
    for folder in sorted(storage.glob(f"{sweep}-*/train_driver_fn_*")):
        if not folder.is_dir():
            continue
        phase = "search" if folder.parent.name.startswith(f"{sweep}-search-") else "seeds"
        result = folder / "result.json"
        rows = [json.loads(line) for line in result.read_text().splitlines()
                if line.strip()] if result.exists() else []
        key = f"{sweep}/{rows[0]['trial_id']}" if rows else f"(no result) {folder.name}"
        out[key] = {"phase": phase, "rows": rows, "folder": folder.name}
    return out


def mlflow_trials(uri: str, sweep: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("cliptd-vcr")
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=(
        f"tags.`cliptd.kind` = 'trial' and tags.sweep = '{sweep}'"), max_results=10000)
    out = []
    for r in runs:
        peak = {m.step: m.value for m in c.get_metric_history(r.info.run_id, "sys/peak_rss_mb")}
        epochs = c.get_metric_history(r.info.run_id, "epoch")
        out.append({
            "run_id": r.info.run_id, "trial_id": r.data.tags.get("cliptd.trial_id"),
            "phase": r.data.tags.get("phase"), "status": r.info.status,
            "start": r.info.start_time / 1000,
            # the trial's last logged metric: close to when it ended (the run's end_time is
            # when the sweep closed it, after its whole search)
            "last_metric": max((m.timestamp for m in epochs), default=r.info.start_time) / 1000,
            "epochs": int(r.data.metrics.get("epoch", 0)),
            "missing_metrics": [k for k in REQUIRED_METRICS if k not in r.data.metrics],
            "peak_rss_mb": max(peak.values()) if peak else None,
            "peak_rss_mb_epoch1": peak.get(1),
        })
    return out


def sweep_config(uri: str, sweep: str) -> dict | None:
    """The sweep.json its parent run logged (budget, resources, arguments)."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("cliptd-vcr")
    runs = c.search_runs([exp.experiment_id], filter_string=(
        f"tags.`cliptd.sweep_id` = '{sweep}'")) if exp else []
    if not runs:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = c.download_artifacts(runs[0].info.run_id, "sweep.json", d)
        return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------
# Figures


def stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "max": None}
    return {"n": len(values), "mean": round(sum(values) / len(values), 1),
            "max": round(max(values), 1)}


def growth(first: dict, last: dict, key: str) -> float | None:
    if not first.get(key) or last.get(key) is None:
        return None
    return round(last[key] / first[key] - 1, 4)


def compare(trials: list[dict], samples: list[dict], window: int) -> dict:
    """First ``window`` trials vs the last ``window`` (by start time)."""
    ordered = sorted(trials, key=lambda t: t["start"])
    groups = {"first": ordered[:window], "last": ordered[-window:]}
    out: dict = {"window": window, "trials": len(ordered)}
    for name, group in groups.items():
        lo = min(t["start"] for t in group)
        hi = max(t["last_metric"] for t in group)
        during = [s for s in samples if lo <= s["t"] <= hi]
        out[name] = {
            "trials": [t["trial_id"] for t in group],
            "from_s": lo, "to_s": hi,
            "peak_rss_mb": stats([t["peak_rss_mb"] for t in group]),
            "peak_rss_mb_epoch1": stats([t["peak_rss_mb_epoch1"] for t in group]),
            "machine_used_mb": stats([s["machine_used_mb"] for s in during]),
            "tree_rss_mb": stats([s["tree_rss_mb"] for s in during]),
            "tree_pss_mb": stats([s["tree_pss_mb"] for s in during]),
        }
    first, last = out["first"], out["last"]
    out["growth"] = {
        "peak_rss_mean": growth(first["peak_rss_mb"], last["peak_rss_mb"], "mean"),
        "peak_rss_max": growth(first["peak_rss_mb"], last["peak_rss_mb"], "max"),
        "peak_rss_epoch1_mean": growth(first["peak_rss_mb_epoch1"],
                                       last["peak_rss_mb_epoch1"], "mean"),
        "peak_rss_epoch1_max": growth(first["peak_rss_mb_epoch1"],
                                      last["peak_rss_mb_epoch1"], "max"),
        "machine_used_mean": growth(first["machine_used_mb"], last["machine_used_mb"], "mean"),
        "machine_used_max": growth(first["machine_used_mb"], last["machine_used_mb"], "max"),
        "tree_rss_mean": growth(first["tree_rss_mb"], last["tree_rss_mb"], "mean"),
        "tree_pss_mean": growth(first["tree_pss_mb"], last["tree_pss_mb"], "mean"),
    }
    return out


# growth figures that fail the run beyond --threshold (the others are reported only: a
# machine-wide max moves with whatever else the machine does)
GATED = ("peak_rss_mean", "peak_rss_max", "peak_rss_epoch1_mean", "peak_rss_epoch1_max",
         "machine_used_mean", "tree_rss_mean", "tree_pss_mean")


def check_records(ray: dict, runs: list[dict], num_samples: int) -> list[str]:
    """Every Tune trial: one MLflow run, FINISHED, with metrics; the search ran N trials."""
    problems = []
    by_trial: dict[str, list[dict]] = {}
    for r in runs:
        by_trial.setdefault(r["trial_id"], []).append(r)
    for key, trial in ray.items():
        got = by_trial.get(key, [])
        if not trial["rows"]:
            problems.append(f"trial {trial['folder']} never reported a result")
        elif len(got) != 1:
            problems.append(f"trial {key}: {len(got)} MLflow runs (expected 1)")
        else:
            run = got[0]
            if run["status"] != "FINISHED":
                problems.append(f"trial {key}: MLflow run {run['run_id']} is {run['status']}")
            if run["missing_metrics"]:
                problems.append(f"trial {key}: MLflow run lacks {run['missing_metrics']}")
            if run["epochs"] != trial["rows"][-1]["epoch"]:
                problems.append(f"trial {key}: MLflow has epoch {run['epochs']}, Ray saw "
                                f"{trial['rows'][-1]['epoch']}")
    for trial_id in sorted(set(by_trial) - set(ray)):
        problems.append(f"MLflow run(s) of trial {trial_id} match no Tune trial")
    searched = sum(1 for t in ray.values() if t["phase"] == "search")
    if searched != num_samples:
        problems.append(f"the search ran {searched} trials, not --num-samples {num_samples}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=50, help="searched trials")
    parser.add_argument("--window", type=int, default=10,
                        help="first / last trials compared (at most half the trials)")
    parser.add_argument("--threshold", type=float, default=0.15,
                        help="largest allowed growth of a gated memory figure (0.15 = 15 %%)")
    parser.add_argument("--interval", type=float, default=2.0, help="sampling period, s")
    parser.add_argument("--timeout", type=float, default=3600, help="the sweep's limit, s")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/load.json")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (MLflow store, Ray storage, log)")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be >= 2 (first vs last trials)")
    window = max(1, min(args.window, args.num_samples // 2))
    tmp = Path(tempfile.mkdtemp(prefix="cliptd-load-"))
    name = f"load-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [PY, "-m", "cliptd.tune", "--task", "vcr", "--budget", "small", "--methods",
           "cliptd", "--num-samples", str(args.num_samples), "--name", name,
           "--storage-path", str(tmp / "ray"), "--out", str(tmp / "out"), "--tracking-uri", uri]
    # the sweep runs in the temporary folder (MLflow's artifacts land beside its store);
    # the world is the usual cache: $CLIPTD_CACHE, else ./.cliptd_cache of where this runs
    cache = Path(os.environ.get("CLIPTD_CACHE", ".cliptd_cache")).resolve()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "CLIPTD_CACHE": str(cache), "CLIPTD_TRACKING_BUFFER": str(tmp / "buffer")}
    shown = " ".join("python" if c == PY else c for c in cmd)
    print(f"[load] {shown}\n[load] world cache: {cache}\n[load] log: {tmp / 'tune.log'}",
          flush=True)
    idle = []
    for _ in range(3):  # the machine before the sweep: what the windows are read against
        idle.append(machine_used_mb())
        time.sleep(1)
    start = time.time()
    with (tmp / "tune.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = Sampler(proc.pid, args.interval)
        sampler.start()
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        finally:
            sampler.stop()
    wall = time.time() - start
    problems = []
    if proc.returncode != 0:
        tail = (tmp / "tune.log").read_text(errors="replace").splitlines()[-30:]
        problems.append(f"the sweep exited {proc.returncode}:\n    " + "\n    ".join(tail))
    ray = ray_trials(tmp / "ray", name)
    runs = mlflow_trials(uri, name)
    problems += check_records(ray, runs, args.num_samples)
    logged = sweep_config(uri, name)
    if (logged or {}).get("budget", {}).get("num_samples") != args.num_samples:
        problems.append(f"the sweep's logged config (sweep.json) does not record "
                        f"num_samples {args.num_samples}: {(logged or {}).get('budget')}")
    searched = [r for r in runs if r["phase"] == "search" and r["peak_rss_mb"] is not None]
    memory = compare(searched, sampler.samples, window) if len(searched) >= 2 else None
    if memory is None:
        problems.append("fewer than 2 searched trials with memory figures: nothing to compare")
    else:
        for key in GATED:
            g = memory["growth"][key]
            if g is not None and g > args.threshold:
                problems.append(f"memory grew: {key} +{g:.1%} (first {window} vs last "
                                f"{window} trials; threshold {args.threshold:.0%})")
    report = {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shown,
        "num_samples": args.num_samples, "threshold": args.threshold,
        "wall_s": round(wall, 1), "exit_code": proc.returncode,
        "trials": {"tune": len(ray), "search": sum(t["phase"] == "search" for t in ray.values()),
                   "seeds": sum(t["phase"] == "seeds" for t in ray.values()),
                   "mlflow_runs": len(runs),
                   "finished": sum(r["status"] == "FINISHED" for r in runs),
                   "stopped_early": sum(r["epochs"] < 2 for r in runs)},
        "idle_machine_used_mb": round(sum(idle) / len(idle), 1),
        "memory": memory, "ok": not problems, "problems": problems,
        "per_trial": sorted(runs, key=lambda r: r["start"]), "samples": sampler.samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(summary(report))
    print(f"[load] figures: {args.out}")
    if args.keep or problems:
        print(f"[load] kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not problems else 1


def summary(report: dict) -> str:
    t = report["trials"]
    lines = [f"[load] {report['num_samples']} searched trials in {report['wall_s']:.0f} s: "
             f"{t['tune']} Tune trials ({t['search']} search, {t['seeds']} seed re-runs), "
             f"{t['mlflow_runs']} MLflow runs, {t['finished']} FINISHED, "
             f"{t['stopped_early']} stopped early by ASHA"]
    m = report["memory"]
    if m:
        w = m["window"]
        lines.append(f"[load] memory, first {w} vs last {w} searched trials "
                     f"(machine idle before the sweep: {report['idle_machine_used_mb']:.0f} MB "
                     "used):")
        rows = [("worker peak RSS, last epoch (MB)", "peak_rss_mb", "peak_rss_mean",
                 "peak_rss_max"),
                ("worker peak RSS, epoch 1 (MB)", "peak_rss_mb_epoch1", "peak_rss_epoch1_mean",
                 "peak_rss_epoch1_max"),
                ("machine used (MB)", "machine_used_mb", "machine_used_mean",
                 "machine_used_max"),
                ("sweep process tree RSS (MB)", "tree_rss_mb", "tree_rss_mean", None),
                ("sweep process tree PSS (MB)", "tree_pss_mb", "tree_pss_mean", None)]
        for label, key, g_mean, g_max in rows:
            a, b = m["first"][key], m["last"][key]
            if not a["n"] or not b["n"]:
                lines.append(f"  {label:<34} no samples")
                continue
            gm = m["growth"][g_mean]
            gx = m["growth"][g_max] if g_max else None
            lines.append(
                f"  {label:<34} mean {a['mean']:>8.1f} → {b['mean']:>8.1f} ({gm:+.1%})   "
                f"max {a['max']:>8.1f} → {b['max']:>8.1f}"
                + (f" ({gx:+.1%})" if gx is not None else ""))
    lines.append("[load] OK: every trial in MLflow, no memory growth beyond "
                 f"{report['threshold']:.0%}" if report["ok"] else
                 "[load] FAILED:\n  " + "\n  ".join(report["problems"]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
