"""Merge ``python -m cliptd.bench science`` outputs into one comparison, paired by seed.

Runs split across processes or sessions (other seeds, another variant of a method) are
one experiment when they share the world, the condition and the protocol; this prints the
comparison (mean ± std) and the paired differences (method − none: mean ± std, seeds
ahead / pairs) over all of them, per question type and ``eval_words`` group, and writes
the merged records.

    python bench/merge_science.py a.json b.json fr.json:cliptd=cliptd-fr --out merged.json \
        --plot paired.png

``--plot``: the paired differences as a figure, one panel per metric, each seed a dot and
each method's mean ± std a bar.

``FILE:OLD=NEW`` renames a method of that file (a variant run with other knobs); a record
of the same (condition, method, seed) given twice is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cliptd.core.atomic import atomic_write
from cliptd.tracking.table import comparison_rows, paired_rows, qtype_metrics, to_markdown


def load(spec: str) -> list[dict]:
    path, _, rename = spec.partition(":")
    renames = dict(r.split("=", 1) for r in rename.split(",")) if rename else {}
    data = json.loads(Path(path).read_text())
    records = []
    for r in data["records"]:
        r = {**r, "method": renames.get(r["method"], r["method"]), "source": path,
             "extra_config": data.get("extra_config")}
        records.append(r)
    return records


def plot_paired(records: list[dict], metrics: dict[str, str], out: Path,
                reference: str = "none") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["method"], r["seed"]): r["metrics"] for r in records}
    methods = sorted({r["method"] for r in records} - {reference})
    seeds = sorted({r["seed"] for r in records if r["method"] == reference})
    cols = 4
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (label, key) in zip(axes.flat, metrics.items(), strict=False):
        for x, m in enumerate(methods):
            d = [100 * (by[(m, s)][key] - by[(reference, s)][key]) for s in seeds
                 if (m, s) in by and key in by[(m, s)] and key in by[(reference, s)]]
            if not d:
                continue
            ax.scatter([x] * len(d), d, s=12, alpha=0.6)
            std = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
            ax.errorbar(x + 0.15, np.mean(d), yerr=std, fmt="o", color="black", ms=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(methods)), methods, fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"paired by seed: method − {reference}, points ({len(seeds)} seeds)",
                 fontsize=9)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)  # whole or not at all
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="bench science JSON files (FILE[:OLD=NEW,...])")
    p.add_argument("--primary", default="q_a", help="the task's primary metric (VCR: q_a)")
    p.add_argument("--out", type=Path, help="write the merged records and tables here")
    p.add_argument("--plot", type=Path, help="draw the paired differences into this PNG")
    args = p.parse_args(argv)
    records, seen = [], set()
    for spec in args.files:
        for r in load(spec):
            key = (r["condition"], r["method"], r["seed"])
            if key in seen:
                print(f"error: {spec}: {key} is already in an earlier file", file=sys.stderr)
                return 2
            seen.add(key)
            records.append(r)
    primary = args.primary
    metrics = {f"in-domain {primary}": f"val/id/{primary}",
               f"shifted {primary}": f"val/shift/{primary}", **qtype_metrics(records, primary)}
    rows, paired = comparison_rows(records, metrics), paired_rows(records, metrics)
    print(to_markdown(rows))
    print("Paired by seed: method − none, points (mean ± std, seeds ahead / pairs)")
    print(to_markdown(paired))
    steps = {}
    for r in records:
        steps.setdefault(r["method"], []).append(int(r["metrics"]["step"]))
    print("steps trained (per seed): " + "; ".join(f"{m} {v}" for m, v in steps.items()))
    if args.plot:
        plot_paired(records, metrics, args.plot)
    if args.out:
        atomic_write(args.out, json.dumps({"records": records, "rows": rows, "paired": paired},
                                          indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
