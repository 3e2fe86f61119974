"""Accuracy against training-data share, per method, from ``cliptd.bench science`` JSONs.

    .venv/bin/python bench/plot_science.py bench/results/pretrained-*.json \
        --out docs/results/pretrained-student.png [--title "..."]

One panel per metric (in-domain and shifted Q→A, then Q→A per question type in-domain);
each point is the mean over the seeds that every method completed, the bar ± one std.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

PANELS = [("val/id/q_a", "in-domain Q→A"), ("val/shift/q_a", "shifted Q→A"),
          ("val/id/qtype/color/q_a", "in-domain, colour"),
          ("val/id/qtype/count/q_a", "in-domain, count"),
          ("val/id/qtype/position/q_a", "in-domain, position"),
          ("val/id/qtype/shape/q_a", "in-domain, shape")]


def whole_seeds(records: list[dict]) -> list[dict]:
    """Only (condition, seed) pairs that every method finished: a run cut short must not
    compare one method's lucky seed against another's mean."""
    methods = {r["method"] for r in records}
    have = defaultdict(set)
    for r in records:
        have[(r["condition"], r["seed"])].add(r["method"])
    return [r for r in records if have[(r["condition"], r["seed"])] == methods]


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="VCR on the synthetic world, pretrained student",
                        help="the figure's title (the seed counts are appended)")
    args = parser.parse_args(argv)
    records = []
    for f in args.files:
        records += json.loads(f.read_text())["records"]
    records = whole_seeds(records)
    if not records:
        raise SystemExit(f"no complete seeds in {[str(f) for f in args.files]}")
    shots = sorted({float(r["condition"].split("=")[1]) for r in records})
    methods = [m for m in ("none", "naive", "cliptd", "clip_features")
               if any(r["method"] == m for r in records)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for i, m in enumerate(methods):
            xs, ys, es = [], [], []
            for s in shots:
                vals = [100 * r["metrics"][key] for r in records if r["method"] == m and
                        float(r["condition"].split("=")[1]) == s and key in r["metrics"]]
                if vals:
                    xs.append(s * (1 + 0.04 * (i - 1)))  # side by side, not on top
                    ys.append(statistics.mean(vals))
                    es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
        ax.axhline(25, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.minorticks_off()  # only the data shares are labelled (one share: no log clutter)
        ax.set_xticks(shots, [f"{s:.0%}" for s in shots])
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0, 0].set_ylabel("accuracy, %")
    axes[1, 0].set_ylabel("accuracy, %")
    axes[0, 0].legend()
    n = {s: len({r["seed"] for r in records if float(r["condition"].split("=")[1]) == s})
         for s in shots}
    fig.suptitle(f"{args.title}: mean ± std over seeds "
                 f"({', '.join(f'{s:.0%}: {k}' for s, k in n.items())}); dotted: chance")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
