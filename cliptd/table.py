"""The paper-style comparison: data conditions × methods, mean ± std over seeds, and the
relative gain of each method over ``none``. Shared by ``cliptd.tune`` and ``cliptd.report``.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict

import numpy as np

METHOD_ORDER = ("none", "naive", "cliptd", "clip_features")


def _order(methods):
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


def aggregate(records: list[dict], metric: str) -> dict:
    """records: {condition, method, seed, metrics} → {(condition, method): values list}."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        v = r["metrics"].get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            cells[(r["condition"], r["method"])].append(float(v))
    return cells


def comparison_rows(records: list[dict], metrics: dict[str, str]) -> list[dict]:
    """One row per (condition, metric label): methods' mean ± std and gain over none.

    ``metrics`` maps a row label suffix (e.g. "in-domain Q→A") to a metric key."""
    methods = _order({r["method"] for r in records})
    conditions = list(dict.fromkeys(r["condition"] for r in records))
    rows = []
    for label, key in metrics.items():
        cells = aggregate(records, key)
        for cond in conditions:
            if not any((cond, m) in cells for m in methods):
                continue
            row = {"condition": cond, "metric": label}
            base = np.mean(cells[(cond, "none")]) if cells.get((cond, "none")) else None
            for m in methods:
                vals = cells.get((cond, m), [])
                if not vals:
                    row[m] = ""
                    continue
                mean, std = 100 * np.mean(vals), 100 * (np.std(vals, ddof=1) if len(vals) > 1
                                                         else 0.0)
                row[m] = f"{mean:.1f} ± {std:.1f} (n={len(vals)})"
                row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = mean, std, len(vals)
                if base is not None and m != "none" and base > 0:
                    row[f"{m} vs none"] = f"{100 * (np.mean(vals) - base) / base:+.1f}%"
            rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no finished runs)\n"
    methods = [k for k in rows[0] if k not in ("condition", "metric") and not k.endswith(
        ("_mean", "_std", "_n")) and " vs " not in k]
    gains = sorted({k for r in rows for k in r if k.endswith(" vs none")},
                   key=lambda k: (METHOD_ORDER.index(m) if (m := k.split(" vs ")[0])
                                  in METHOD_ORDER else 99, k))
    head = ["condition", "metric", *methods, *gains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(h, "")) for h in head) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
