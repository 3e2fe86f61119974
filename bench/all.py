"""Every benchmark in one place: runs each one (each its own process, one after the other, so
none shares the 2 cores with another), gathers their figures into one JSON and prints the
README's "Benchmarks" section as Markdown, each figure with the command that measured it.

    .venv/bin/python bench/all.py --out bench/results/benchmarks.json      # ≈ 12 min
    .venv/bin/python bench/all.py --only step,data --out /tmp/some.json    # a subset
    .venv/bin/python bench/all.py --markdown bench/results/benchmarks.json # reprint
    .venv/bin/python bench/all.py --only load --out /tmp/load.json        # ≈ 15 min, optional

Ratios are measured within one run (this machine is noisy); absolute times are this
machine's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# name → (command, what it measures); every command writes its figures to --out FILE
BENCHMARKS = {
    "data": ([PY, "bench/data_throughput.py", "--lines", "100000", "--no-tracemalloc"],
             "prepare on a 100,000-line VCR-format file, and the Parquet reader"),
    "step": ([PY, "-m", "cliptd.bench", "step", "--steps", "20"],
             "a cliptd step against a none step, teacher cached and live"),
    "ray": ([PY, "-m", "cliptd.bench", "ray", "--epochs", "2"],
            "Ray's overhead on 2 concurrent trials of each kind vs the plain loop; 1 vs 2 "
            "Ray Train workers"),
    "startup": ([PY, "bench/trial_startup.py"], "launch → first training step of a trial"),
    "scaling": ([PY, "bench/scaling.py"], "real-size models' FLOPs and a real sweep's cost"),
}
# Run only when named in --only: a check more than a figure, and minutes long
OPTIONAL = {
    "load": ([PY, "bench/load_test.py"], "a 50-trial sweep on the small budget: every trial "
             "in MLflow, memory of its first vs last 10 trials (≈ 15 min)"),
}


def run(name: str) -> dict:
    cmd, what = {**BENCHMARKS, **OPTIONAL}[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        start = time.time()
        print(f"[bench] {name}: {' '.join(Path(c).name if c == PY else c for c in cmd)}",
              flush=True)
        proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"benchmark {name!r} failed (exit {proc.returncode})")
        figures = json.loads(out.read_text())
    return {"command": " ".join(["python" if c == PY else c for c in cmd]), "what": what,
            "seconds": round(time.time() - start, 1), "figures": figures}


def markdown(results: dict) -> str:
    """The README section: one row per key figure, with its command."""
    rows = []

    def row(what: str, figure: str, name: str):
        rows.append(f"| {what} | {figure} | `{results[name]['command']}` |")

    if "data" in results:
        f = results["data"]["figures"]
        row("`prepare`, VCR format", f"{f['prepare_lines_per_s']:,.0f} lines/s, peak RSS "
            f"{f['prepare_peak_rss_mib']:.0f} MiB", "data")
        row("Parquet reader", f"{f['reader_arrow_rows_per_s']:,.0f} rows/s (Arrow), "
            f"{f['reader_dict_rows_per_s']:,.0f} rows/s (dicts)", "data")
    if "step" in results:
        f = results["step"]["figures"]
        row("teacher cache: cliptd step / none step", f"{f['ratio_cached_vs_none']:.3f}× "
            f"cached, {f['ratio_live_vs_none']:.2f}× with the teacher live", "step")
    if "ray" in results:
        f = results["ray"]["figures"]
        for kind, label in (("light", "light trials (loop in the Tune trial)"),
                            ("train", "TorchTrainer trials")):
            if kind not in f:
                continue
            k = f[kind]
            vs = f", trial ÷ plain loop {k['vs_plain']:.2f} (Ray {k['ray_s_mean']:.0f} s per " \
                 "trial)" if "vs_plain" in k else ""
            row(f"Ray overhead, 2 concurrent {label}", f"training steps {k['train_share_mean']:.0%}"
                f" of trial wall time (training + evaluation {k['loop_share_mean']:.0%}); "
                f"launch → first step {k['first_step_s_mean']:.0f} s, → first result "
                f"{k['first_result_s']:.0f} s{vs}", "ray")
        if "sequence" in f:
            q = f["sequence"]
            row(f"starting a light trial in a long sweep ({q['trials']} one after another)",
                f"{q['fresh']['start_s_mean']:.1f} s with a fresh actor, "
                f"{q['reused']['start_s_mean']:.1f} s with the actor reused (the sweep's "
                "default)", "ray")
        if "throughput_2_vs_1_workers" in f:
            row("worker scaling, 2 vs 1 Ray Train workers",
                f"{f['throughput_2_vs_1_workers']:.2f}×", "ray")
    if "startup" in results:
        f = results["startup"]["figures"]
        for kind, k in f.items():
            row(f"launch → first training step ({kind} trials)",
                " / ".join(f"{s:.1f} s" for s in k["first_step_s"]), "startup")
    if "scaling" in results:
        f = results["scaling"]["figures"]
        for task, t in f["tasks"].items():
            gpu_h = ", ".join(f"{k.replace('shots=', '')} {v:.0f}" for k, v in
                              t["gpu_hours"].items() if k.startswith("shots="))
            row(f"{task}: real-size student / teacher per instance",
                f"{t['student']['train_flops'] / 1e9:.0f} / {t['teacher']['flops'] / 1e9:.0f} "
                f"GFLOP; full sweep ({len(t['sweep']['methods'])} methods) GPU-h at shots "
                f"{gpu_h} (assumed "
                f"{f['assumed_gpu_tflops'] * f['assumed_mfu']:.1f} TFLOPS)", "scaling")
    if "load" in results:
        f = results["load"]["figures"]
        t, m = f["trials"], f["memory"]
        g, w = m["growth"], m["window"]
        row(f"load: {f['num_samples']}-trial sweep, small budget",
            f"{t['finished']} of {t['tune']} Tune trials FINISHED in MLflow, one run each, "
            f"in {f['wall_s'] / 60:.0f} min; first vs last {w} trials: worker peak RSS "
            f"(epoch 1) {m['first']['peak_rss_mb_epoch1']['mean']:.0f} → "
            f"{m['last']['peak_rss_mb_epoch1']['mean']:.0f} MB "
            f"({g['peak_rss_epoch1_mean']:+.1%}), machine used "
            f"{m['first']['machine_used_mb']['mean']:.0f} → "
            f"{m['last']['machine_used_mb']['mean']:.0f} MB ({g['machine_used_mean']:+.1%})",
            "load")
    head = "| what | figure | command |\n| --- | --- | --- |\n"
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of {sorted(BENCHMARKS)}, or "
                        f"the optional {sorted(OPTIONAL)} (only run when named)")
    parser.add_argument("--out", type=Path, help="the gathered JSON")
    parser.add_argument("--markdown", type=Path, help="reprint the section from a JSON")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["benchmarks"]))
        return 0
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS) - set(OPTIONAL)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {sorted(BENCHMARKS)}, "
                     f"optional: {sorted(OPTIONAL)}")
    results = {name: run(name) for name in names}
    if args.out:
        from cliptd.core.env import package_versions

        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "versions": package_versions(), "benchmarks": results},
                                  indent=2))
        tmp.replace(args.out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
