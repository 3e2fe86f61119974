"""The paper-style comparison: data conditions × methods, mean ± std over seeds, and the
relative gain of each method over ``none``; then, per condition, what each method's model
costs at inference; and the comparison paired by seed (``paired_rows``): a seed fixes both
the low-shot subset and the initialisation, so the difference of two methods within a seed
shows effects that the spread across seeds hides. Shared by ``cliptd.tune``,
``cliptd.report`` and ``cliptd.bench``.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict

import numpy as np

METHOD_ORDER = ("none", "naive", "cliptd", "clip_features")
COST_LABEL = "inference cost vs none (params, forward time / instance)"
# numeric companions of a row's method cells (CSV columns, not Markdown ones)
NUMERIC_SUFFIXES = ("_mean", "_std", "_n", "_ahead", "_params", "_params_vs_none", "_forward_ms",
                    "_forward_vs_none")


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
    return rows + cost_rows(records)


def qtype_metrics(records: list[dict], primary: str) -> dict[str, str]:
    """Row labels → metric keys for every question type the records were scored on
    (``val/<group>/qtype/<type>/<primary>``), then every ``eval_words`` group
    (``val/<group>/words/<name>/<primary>``), in-domain then shifted."""
    out = {}
    for group, label in (("id", "in-domain"), ("shift", "shifted")):
        for kind, tag in (("qtype", ""), ("words", "words: ")):
            names = sorted({k.split("/")[3] for r in records for k in r["metrics"]
                            if k.startswith(f"val/{group}/{kind}/")
                            and k.endswith(f"/{primary}")})
            out |= {f"{label} {primary} [{tag}{t}]": f"val/{group}/{kind}/{t}/{primary}"
                    for t in names}
    return out


def paired_rows(records: list[dict], metrics: dict[str, str], reference: str = "none"
                ) -> list[dict]:
    """Each method against ``reference`` within the same seed: per (condition, metric,
    method), the mean paired difference in points, its standard deviation, and the sign
    count (seeds where the method is ahead / pairs), e.g. ``+4.1 ± 1.2 (5/5)``."""
    by: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in records:
        for key in metrics.values():
            v = r["metrics"].get(key)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                by[(r["condition"], r["method"], key)][str(r.get("seed", ""))] = float(v)
    methods = [m for m in _order({r["method"] for r in records}) if m != reference]
    conditions = list(dict.fromkeys(r["condition"] for r in records))
    rows = []
    for label, key in metrics.items():
        for cond in conditions:
            ref = by.get((cond, reference, key))
            if not ref:
                continue
            row = {"condition": cond, "metric": label, "reference": reference}
            for m in methods:
                mine = by.get((cond, m, key), {})
                seeds = sorted(set(mine) & set(ref))
                if not seeds:
                    row[m] = ""
                    continue
                d = 100 * np.array([mine[s] - ref[s] for s in seeds])
                std = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
                ahead = int((d > 0).sum())
                row[m] = f"{d.mean():+.1f} ± {std:.1f} ({ahead}/{len(d)})"
                row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = float(d.mean()), std, len(d)
                row[f"{m}_ahead"] = ahead
            if any(row.get(m) for m in methods):
                rows.append(row)
    return rows


def cost_rows(records: list[dict]) -> list[dict]:
    """One row per condition whose runs logged their inference cost (``model/*``, from
    ``cliptd.inference_cost.run_cost``): each method's parameters and forward time per
    instance as ratios to ``none``, each ratio measured side by side within its own run (a
    ratio between separate runs would mostly measure the machine's load), mean over seeds."""
    methods = _order({r["method"] for r in records})
    conditions = list(dict.fromkeys(r["condition"] for r in records))
    rows = []
    for cond in conditions:
        row, found = {"condition": cond, "metric": COST_LABEL}, False
        for m in methods:
            runs = [r["metrics"] for r in records if r["condition"] == cond and
                    r["method"] == m and "model/forward_vs_none" in r["metrics"]]
            if not runs:
                row[m] = ""
                continue
            found = True
            mean = {k: float(np.mean([r[k] for r in runs])) for k in (
                "model/params", "model/params_vs_none", "model/forward_ms_per_instance",
                "model/forward_vs_none")}
            row[m] = (f"params {mean['model/params_vs_none']:.2f}×, time "
                      f"{mean['model/forward_vs_none']:.2f}× ({mean['model/params'] / 1e6:.2f} M,"
                      f" {mean['model/forward_ms_per_instance']:.2f} ms; n={len(runs)})")
            row[f"{m}_params"] = mean["model/params"]
            row[f"{m}_params_vs_none"] = mean["model/params_vs_none"]
            row[f"{m}_forward_ms"] = mean["model/forward_ms_per_instance"]
            row[f"{m}_forward_vs_none"] = mean["model/forward_vs_none"]
        if found:
            rows.append(row)
    return rows


def to_markdown(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """A Markdown table: the comparison's layout (condition, metric, the methods, their
    gains), or ``columns`` in that order."""
    if not rows:
        return "(no finished runs)\n"
    if columns:
        return _markdown(rows, list(columns))
    methods = [k for k in rows[0] if k not in ("condition", "metric", "reference")
               and not k.endswith(
        NUMERIC_SUFFIXES) and " vs " not in k]
    gains = sorted({k for r in rows for k in r if k.endswith(" vs none")},
                   key=lambda k: (METHOD_ORDER.index(m) if (m := k.split(" vs ")[0])
                                  in METHOD_ORDER else 99, k))
    return _markdown(rows, ["condition", "metric", *methods, *gains])


def _markdown(rows: list[dict], head: list[str]) -> str:
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
