"""Merge ``python -m cliptd.bench science`` outputs into one comparison, paired by seed.

Runs split across processes or sessions (other seeds, another variant of a method) are
one experiment when they share the world, the condition and the protocol; this prints the
comparison (mean ± std) and the paired differences (method − none: mean ± std, seeds
ahead / pairs) over all of them, per question type and ``eval_words`` group, and writes
the merged records.

    python bench/merge_science.py a.json b.json fr.json:cliptd=cliptd-fr --out merged.json

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="bench science JSON files (FILE[:OLD=NEW,...])")
    p.add_argument("--primary", default="q_a", help="the task's primary metric (VCR: q_a)")
    p.add_argument("--out", type=Path, help="write the merged records and tables here")
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
    if args.out:
        atomic_write(args.out, json.dumps({"records": records, "rows": rows, "paired": paired},
                                          indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
