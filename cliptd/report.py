"""Results people can look at: the comparison table and plots of a sweep, from MLflow.

    python -m cliptd.report --task vcr                      # the latest vcr sweep
    python -m cliptd.report --task vcr --sweep vcr-default --out runs/report-vcr
    python -m cliptd.report --task vcr --tracking-uri http://127.0.0.1:5000
    python -m cliptd.report map runs/report-vcr runs/report-vqa --out runs/report-map
    python -m cliptd.report defaults runs/<sweep>/best runs/<other sweep>/best

Reads the sweep's runs (experiment ``cliptd-<task>``, parent run tagged ``cliptd.sweep_id``)
from any MLflow tracking URI. The runs tagged ``cliptd.compare`` (each best config's seed
runs: the seed re-runs plus the search's best trial, which is seed 0) give the comparison
(final value = the last logged one, per seed): data conditions × methods, mean ± std over seeds and the
relative gain over ``none``, and a row per condition of what each method's model costs at
inference (parameters and forward time per instance as ratios to ``none``, measured side by
side at the end of each run), as Markdown and CSV, plus plots (accuracy against the shot
level, gain over ``none`` on the shifted domain, accuracy against inference cost, and the
headline: the paired map, each method − ``none`` seed by seed per condition, in-domain and
shifted, with its sign count; when the sweep ran ``naive`` and ``cliptd``, also ``cliptd`` −
``naive``, what the targeting adds over distilling every token) and the seed runs' learning curves (``curves.png`` and
``curves.csv``: per epoch, the score that ASHA and patience read and the task loss, so a run
stopped by the epoch cap while still improving shows as one). The ``phase=search`` runs give
the search's
view (metric against ``distill.select_ratio_v`` and ``distill.weighting``) and
``search_margin.md``: how far each search's chosen trial stood above its runner-up, on one
seed, beside the chosen config's spread over seeds (a margin inside that spread is a choice
the search could not make); ``sweep_time.md`` says where the trial slots' time went
(training steps, evaluation, set-up, the rest). Every file is also logged as an artifact of the sweep's parent run, under
``report/``.

Across sweeps: ``map`` draws every swept cell (the ``paired.csv`` of several report
folders, any tasks) as one paired map, issue 19's headline, and gathers their searches'
margins; ``defaults`` shows how
``cliptd``'s default knobs follow from the sweeps' best configs (``cliptd.sweep.defaults``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

# cliptd.core.config is light: the report needs neither torch nor Ray, only MLflow and plots
from cliptd.core.atomic import atomic_write
from cliptd.core.config import PRIMARY_METRIC, TASKS
from cliptd.core.invocation import prog
from cliptd.tracking.slots import sweep_time, sweep_time_markdown
from cliptd.tracking.table import (
    METHOD_ORDER,
    aggregate,
    comparison_rows,
    paired_rows,
    qtype_metrics,
    to_csv,
    to_markdown,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TASK_METRICS = {"vcr": (("Q→A", "q_a"), ("QA→R", "qa_r"), ("Q→AR", "q_ar")),
                "snli_ve": (("acc", "acc"),),
                "vqa": (("VQA acc", "vqa_acc"),)}
GROUPS = (("in-domain", "id"), ("shifted", "shift"))
FILES = {"md": "comparison.md", "csv": "comparison.csv", "paired_md": "paired.md",
         "paired_csv": "paired.csv", "time": "sweep_time.md", "shots": "accuracy_vs_shots.png",
         "gain": "gain_shifted.png", "search": "search.png", "cost": "accuracy_vs_cost.png",
         "map": "paired_map.png", "curves": "curves.png", "curves_csv": "curves.csv",
         "targeting_md": "paired_cliptd_vs_naive.md",
         "targeting_csv": "paired_cliptd_vs_naive.csv", "margin_md": "search_margin.md",
         "margin_csv": "search_margin.csv"}


# search_margin.md's columns, in order (its CSV adds margin_points and seeds_std as numbers)
MARGIN_COLUMNS = ("condition", "method", "trials", "finished", "chosen", "runner-up", "margin",
                  "chosen config over seeds, std", "runner-up differs in")


class ReportError(Exception):
    """A problem the user must fix (missing experiment, no runs, ...): exit status 2."""


def metric_rows(task: str) -> dict[str, str]:
    """Row label → metric key, in table order: in-domain metrics, then shifted ones."""
    return {f"{g} {label}": f"val/{key}/{m}" for g, key in GROUPS
            for label, m in TASK_METRICS[task]}


# --------------------------------------------------------------------------------------
# Reading MLflow


def _all_runs(c, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                             page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_parent(c, experiment_id: str, sweep: str | None):
    parents = _all_runs(c, experiment_id, "tags.`cliptd.kind` = 'sweep'")
    if sweep:
        hits = [r for r in parents if r.data.tags.get("cliptd.sweep_id") == sweep]
        if not hits:
            known = sorted({r.data.tags.get("cliptd.sweep_id", "?") for r in parents})
            raise ReportError(f"no sweep {sweep!r} in this experiment; sweeps: "
                              f"{', '.join(known) or '(none)'}")
        return hits[0]
    if not parents:
        raise ReportError("no sweep (parent run tagged cliptd.kind=sweep) in this experiment; "
                          "run python -m cliptd.tune first")
    return max(parents, key=lambda r: r.info.start_time or 0)


def shots_key(shots: str):
    """Order shot levels: fractions ascending (1.0 = full data last), then k-shot levels."""
    try:
        return (0, float(shots), "")
    except (TypeError, ValueError):
        s = str(shots)
        return (1, float(s[1:]) if s[1:].isdigit() else math.inf, s)


def shots_label(shots: str) -> str:
    try:
        frac = float(shots)
    except (TypeError, ValueError):
        return str(shots)
    return "full" if frac >= 1 else f"{100 * frac:g}%"


def run_record(run) -> dict:
    t = run.data.tags
    preset, shots = t.get("preset", ""), t.get("shots", "")
    return {"run_id": run.info.run_id, "status": run.info.status,
            "condition": t.get("condition") or f"{preset}-shots{shots}",
            "preset": preset, "shots": shots, "method": t.get("method", "?"),
            "seed": t.get("seed", ""), "phase": t.get("phase", ""),
            "trial_id": t.get("cliptd.trial_id", ""),
            "compare": t.get("cliptd.compare") == "true" or t.get("phase") == "seeds",
            "start_ms": run.info.start_time,
            # run.data.metrics holds each metric's latest value (highest step = last epoch)
            "metrics": dict(run.data.metrics), "params": dict(run.data.params)}


def load_runs(uri: str, task: str, experiment: str | None, sweep: str | None) -> dict:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    name = experiment or f"cliptd-{task}"
    try:
        exp = c.get_experiment_by_name(name)
    except Exception as exc:  # noqa: BLE001 - an unreachable / unreadable store
        raise ReportError(f"MLflow tracking at {uri} is not usable: {exc}") from None
    if exp is None:
        known = [e.name for e in c.search_experiments()]
        raise ReportError(f"no MLflow experiment {name!r} at {uri}; experiments: "
                          f"{', '.join(known) or '(none)'}")
    parent = find_parent(c, exp.experiment_id, sweep)
    pid = parent.info.run_id
    children = [run_record(r) for r in _all_runs(
        c, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{pid}'")]
    children.sort(key=lambda r: (r["preset"], shots_key(r["shots"]), r["method"], r["seed"]))
    seeds = [r for r in children if r["compare"]]
    done = [r for r in seeds if r["status"] == "FINISHED"]
    if not done:
        raise ReportError(f"sweep {parent.data.tags.get('cliptd.sweep_id', pid)!r} (run {pid}) "
                          f"has no finished seed runs of a best config ({len(seeds)} tagged "
                          f"cliptd.compare, {len(children)} child run(s) in all)")
    return {"client": c, "experiment": exp, "parent": parent, "seeds": done,
            "skipped": [r for r in seeds if r["status"] != "FINISHED"],
            "search": [r for r in children if r["phase"] == "search"], "children": children}


# --------------------------------------------------------------------------------------
# Writing


def save_fig(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def _methods(records) -> list[str]:
    return _in_method_order({r["method"] for r in records})


def _in_method_order(methods) -> list[str]:
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))


def _colors(methods) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(METHOD_ORDER.index(m) if m in METHOD_ORDER else 4 + i)
            for i, m in enumerate(methods)}


def _cells(records, key) -> dict:
    """(preset, shots, method) → values of metric ``key`` over seeds."""
    out = defaultdict(list)
    for r in records:
        v = r["metrics"].get(key)
        if v is not None and not math.isnan(v):
            out[(r["preset"], r["shots"], r["method"])].append(100 * float(v))
    return out


def _mean_std(vals):
    import numpy as np

    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def plot_accuracy_vs_shots(records, task: str, path: Path) -> Path:
    """Rows: the task's metrics; columns: in-domain, shifted; a line per method (and preset)
    with error bars = std over seeds."""
    import matplotlib.pyplot as plt

    methods, presets = _methods(records), sorted({r["preset"] for r in records})
    levels = sorted({r["shots"] for r in records}, key=shots_key)
    colors, styles = _colors(methods), ("-", "--", ":", "-.")
    metrics = TASK_METRICS[task]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False,
                             layout="constrained")
    for i, (label, m) in enumerate(metrics):
        for j, (group, g) in enumerate(GROUPS):
            ax, cells = axes[i][j], _cells(records, f"val/{g}/{m}")
            for p_i, preset in enumerate(presets):
                for k, method in enumerate(methods):
                    xs, ys, es = [], [], []
                    for x, level in enumerate(levels):
                        vals = cells.get((preset, level, method))
                        if vals:
                            mean, std = _mean_std(vals)
                            xs.append(x + (k - (len(methods) - 1) / 2) * 0.04)
                            ys.append(mean)
                            es.append(std)
                    if xs:
                        name = method if len(presets) == 1 else f"{method} ({preset})"
                        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name,
                                    color=colors[method], linestyle=styles[p_i % len(styles)])
            if not cells:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
            ax.set_xticks(range(len(levels)), [shots_label(s) for s in levels])
            ax.set_title(f"{group} {label}")
            ax.set_xlabel("training data (shots)")
            ax.set_ylabel(f"{label} (%)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{task}: accuracy vs training data (mean ± std over seeds)")
    return save_fig(fig, path)


CURVE_METRICS = (("score", "score"), ("step", "steps"), ("train/loss/task", "task_loss"))


def learning_curves(c, records) -> list[dict]:
    """One row per epoch of every compared seed run, from its MLflow metric histories (step
    = epoch): ``score`` (what ASHA and patience read: the in-domain primary metric on the
    ``eval_limit`` sample; the last epoch's is on the whole split), the training steps so
    far and the epoch's task loss."""
    rows = []
    for r in records:
        epochs: dict[int, dict] = defaultdict(dict)
        for key, name in CURVE_METRICS:
            for m in c.get_metric_history(r["run_id"], key):
                epochs[m.step][name] = m.value
        rows += [{"condition": r["condition"], "method": r["method"], "seed": r["seed"],
                  "epoch": epoch, **{name: epochs[epoch].get(name) for _, name in CURVE_METRICS}}
                 for epoch in sorted(epochs) if "score" in epochs[epoch]]
    return rows


def plot_learning_curves(curves: list[dict], task: str, path: Path) -> Path:
    """Columns: data conditions; rows: score (%) and task loss against training steps; a
    thin line per seed run, a bold one for the mean over the seeds at each epoch."""
    import matplotlib.pyplot as plt
    import numpy as np

    conditions = sorted({r["condition"] for r in curves}, key=_condition_key) or ["(none)"]
    methods = _in_method_order({r["method"] for r in curves})
    colors = _colors(methods)
    fig, axes = plt.subplots(2, len(conditions), figsize=(5.5 * len(conditions), 6.4),
                             squeeze=False, layout="constrained")
    for j, cond in enumerate(conditions):
        for i, (key, label) in enumerate((("score", "score (%)"), ("task_loss", "task loss"))):
            ax = axes[i][j]
            for method in methods:
                runs = defaultdict(list)
                for r in curves:
                    if r["condition"] == cond and r["method"] == method and r[key] is not None:
                        runs[r["seed"]].append(r)
                by_epoch = defaultdict(list)
                for seed_rows in runs.values():
                    seed_rows.sort(key=lambda r: r["epoch"])
                    xs = [r["steps"] if r["steps"] is not None else r["epoch"] for r in seed_rows]
                    ys = [(100 if key == "score" else 1) * r[key] for r in seed_rows]
                    ax.plot(xs, ys, color=colors[method], alpha=0.35, linewidth=0.8)
                    for x, y in zip(xs, ys, strict=True):
                        by_epoch[x].append(y)
                if by_epoch:
                    xs = sorted(by_epoch)
                    ax.plot(xs, [float(np.mean(by_epoch[x])) for x in xs], color=colors[method],
                            linewidth=2.2, label=f"{method} ({len(runs)} seeds)")
            ax.set_title(f"{cond}: {label}")
            ax.set_xlabel("training steps")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{task}: learning curves of the compared seed runs\n(score: in-domain "
                 f"{PRIMARY_METRIC[task]} on the eval sample; the last epoch on the whole split)")
    return save_fig(fig, path)


def plot_gain_shifted(records, task: str, path: Path) -> Path:
    """Bars: relative gain (%) of each method over ``none`` on the shifted domain's primary
    metric, per data condition; error bars = the method's std over seeds / none's mean."""
    import matplotlib.pyplot as plt
    import numpy as np

    primary = PRIMARY_METRIC[task]
    group = "shifted"
    cells = _cells(records, f"val/shift/{primary}")
    if not cells:  # no domain shift in this sweep: show the in-domain gain, and say so
        group, cells = "in-domain (no shifted metric logged)", _cells(records, f"val/id/{primary}")
    methods = [m for m in _methods(records) if m != "none"]
    colors = _colors(_methods(records))
    conds = sorted({(r["preset"], r["shots"]) for r in records},
                   key=lambda c: (c[0], shots_key(c[1])))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(conds) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        xs, ys, es = [], [], []
        for x, (preset, shots) in enumerate(conds):
            base, vals = cells.get((preset, shots, "none")), cells.get((preset, shots, method))
            if base and vals and np.mean(base) > 0:
                b = float(np.mean(base))
                mean, std = _mean_std(vals)
                xs.append(x + (k - (len(methods) - 1) / 2) * width)
                ys.append(100 * (mean - b) / b)
                es.append(100 * std / b)
        if xs:
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=method, color=colors[method])
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(f"{y:+.1f}%", (x, y), ha="center", fontsize=7,
                            va="bottom" if y >= 0 else "top")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(conds)), [f"{p}\n{shots_label(s)}" for p, s in conds])
    ax.set_ylabel(f"relative gain over none, {primary} (%)")
    ax.set_title(f"{task}: gain over none, {group}")
    ax.grid(axis="y", alpha=0.3)
    if methods and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_fig(fig, path)


def paired_map(paired: list[dict], task: str) -> dict:
    """The headline: where each method beats ``none``, seed by seed. Rows are (condition,
    in-domain / shifted primary metric), columns the methods; a cell holds the mean paired
    difference in points and its label (std, seeds ahead / pairs); a missing pair is NaN."""
    import numpy as np

    primary = dict((m, label) for label, m in TASK_METRICS[task])[PRIMARY_METRIC[task]]
    wanted = [f"{g} {primary}" for g, _ in GROUPS]
    rows = sorted((r for r in paired if r["metric"] in wanted),
                  key=lambda r: (_condition_key(r["condition"]), wanted.index(r["metric"])))
    methods = _in_method_order({k.removesuffix("_mean") for r in rows for k in r
                                if k.endswith("_mean")})
    values = np.full((len(rows), len(methods)), np.nan)
    labels = [["" for _ in methods] for _ in rows]
    for i, r in enumerate(rows):
        for j, m in enumerate(methods):
            if f"{m}_mean" in r:
                values[i, j] = r[f"{m}_mean"]
                labels[i][j] = (f"{r[f'{m}_mean']:+.1f}\n± {r[f'{m}_std']:.1f}\n"
                                f"{r[f'{m}_ahead']}/{r[f'{m}_n']}")
    return {"rows": [f"{r['condition']}\n{r['metric']}" for r in rows], "methods": methods,
            "values": values, "labels": labels}


def _condition_key(condition: str):
    """``<preset>-shots<level>`` sorted by preset, then shot level as a number."""
    preset, _, shots = condition.rpartition("-shots")
    return (preset, shots_key(shots)) if preset else (condition, (0, 0.0, ""))


def plot_paired_map(paired: list[dict], task: str, path: Path) -> Path:
    """The paired map as a diverging heat map (blue: the method ahead of ``none``)."""
    m = paired_map(paired, task)
    return _draw_map(m["values"], m["labels"], [f"{x} − none" for x in m["methods"]],
                     m["rows"], f"{task}: paired by seed, points (mean, ± std, seeds ahead / "
                     "pairs)", path)


def _draw_map(values, labels, columns: list[str], rows: list[str], title: str,
              path: Path) -> Path:
    """A diverging heat map of paired differences (blue: ahead of ``none``), each cell
    labelled; NaN cells (no pair) are blank with a dash."""
    import matplotlib.pyplot as plt
    import numpy as np

    width = max((len(line) for c in columns for line in c.split("\n")), default=10)
    fig, ax = plt.subplots(figsize=(2.2 + max(1.6, 0.09 * width) * max(1, len(columns)),
                                    1.0 + 0.75 * max(1, len(rows))))
    if values.size:
        finite = values[np.isfinite(values)]
        lim = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        ax.imshow(np.ma.masked_invalid(values), cmap="RdBu", vmin=-lim, vmax=lim,
                  aspect="auto")
        for i, row in enumerate(labels):
            for j, text in enumerate(row):
                dark = np.isfinite(values[i, j]) and abs(values[i, j]) > 0.6 * lim
                ax.text(j, i, text or "—", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(columns)), columns, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no paired runs (every method needs none's seeds)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    return save_fig(fig, path)


def plot_accuracy_vs_cost(records, task: str, path: Path) -> Path:
    """What each method buys and what it costs at inference: in-domain primary metric
    against forward time per instance and parameters, both as ratios to ``none`` measured side
    by side within each run (``model/*_vs_none``); a point per (method, condition), error
    bars = std over seeds."""
    import matplotlib.pyplot as plt

    key = f"val/id/{PRIMARY_METRIC[task]}"
    methods = _methods(records)
    colors = _colors(methods)
    conds = sorted({(r["preset"], r["shots"]) for r in records},
                   key=lambda c: (c[0], shots_key(c[1])))
    markers = "osD^vP*X"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    plotted = False
    for ax, (ratio, label) in zip(axes, (("model/forward_vs_none", "forward time / instance"),
                                         ("model/params_vs_none", "parameters")), strict=True):
        for method in methods:
            for c_i, (preset, shots) in enumerate(conds):
                runs = [r["metrics"] for r in records if r["method"] == method and
                        (r["preset"], r["shots"]) == (preset, shots) and ratio in r["metrics"]
                        and key in r["metrics"]]
                if not runs:
                    continue
                (x, xe), (y, ye) = (_mean_std([float(r[ratio]) for r in runs]),
                                    _mean_std([100 * float(r[key]) for r in runs]))
                name = method if len(conds) == 1 else f"{method} ({preset} {shots_label(shots)})"
                ax.errorbar([x], [y], xerr=[xe], yerr=[ye], marker=markers[c_i % len(markers)],
                            capsize=3, color=colors[method], label=name, linestyle="none")
                plotted = True
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"{label}, × none (measured side by side in each run)")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if not plotted:
            ax.text(0.5, 0.5, "no inference cost logged", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    fig.suptitle(f"{task}: accuracy against inference cost (mean ± std over seeds)")
    return save_fig(fig, path)


def _as_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_search(records, task: str, path: Path) -> Path:
    """The search's view: last logged in-domain primary metric of every ``cliptd`` search
    trial against ``distill.select_ratio_v`` (scatter) and ``distill.weighting`` (box +
    strip). Only ``cliptd`` uses those knobs (``naive`` fixes them, ``none`` and
    ``clip_features`` have no teacher term), so the other methods' trials are drawn as their
    mean, a dashed reference line, not as points at a knob value they never used."""
    import matplotlib.pyplot as plt
    import numpy as np

    key = f"val/id/{PRIMARY_METRIC[task]}"
    pts = [r for r in records if key in r["metrics"] and not math.isnan(r["metrics"][key])]
    methods = _methods(pts)
    colors = _colors(methods)
    searched = [r for r in pts if r["method"] == "cliptd"]
    refs = {m: float(np.mean([100 * r["metrics"][key] for r in pts if r["method"] == m]))
            for m in methods if m != "cliptd"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    sel = [(x, 100 * r["metrics"][key]) for r in searched
           if (x := _as_float(r["params"].get("distill.select_ratio_v"))) is not None]
    if sel:
        a1.scatter(*zip(*sel, strict=True), label="cliptd", color=colors["cliptd"],
                   alpha=0.8, edgecolors="black", linewidths=0.4)
    a1.set_xlabel("distill.select_ratio_v")
    a1.set_ylabel(f"{key} (%), last epoch")
    a1.set_title("search: visual token selection ratio (cliptd)")
    cats = sorted({r["params"].get("distill.weighting", "?") for r in searched})
    rng = np.random.default_rng(0)
    data = [[100 * r["metrics"][key] for r in searched
             if r["params"].get("distill.weighting", "?") == c] for c in cats]
    if cats:
        a2.boxplot(data, positions=range(len(cats)), widths=0.5, showfliers=False)
        for i, ys in enumerate(data):
            a2.scatter(i + rng.uniform(-0.15, 0.15, len(ys)), ys, color=colors["cliptd"],
                       alpha=0.8, s=18, label="cliptd", edgecolors="black", linewidths=0.4)
        a2.set_xticks(range(len(cats)), cats)
    a2.set_xlabel("distill.weighting")
    a2.set_title("search: dynamic weighting (cliptd)")
    for ax in (a1, a2):
        for m, y in refs.items():
            ax.axhline(y, color=colors[m], linestyle="--", linewidth=1,
                       label=f"{m}: mean of its search trials")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            uniq = dict(zip(labels, handles, strict=True))
            ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        if not searched:
            ax.text(0.5, 0.5, "no cliptd search runs", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    fig.suptitle(f"{task}: {len(pts)} search trial(s), {len(searched)} of cliptd")
    return save_fig(fig, path)


# --------------------------------------------------------------------------------------
# Across sweeps: the map of every swept cell, and cliptd's defaults from their best configs

MAP_FILES = {"png": "map.png", "md": "map.md", "csv": "map.csv",
             "margin_md": "search_margin.md", "margin_csv": "search_margin.csv"}


def _primary_label(task: str) -> str:
    return dict((m, label) for label, m in TASK_METRICS[task])[PRIMARY_METRIC[task]]


def _primary_names(task: str) -> set[str]:
    """How a paired table may name the task's primary metric: by its label (the report's
    ``Q→A``) or by its key (``q_a``, as ``bench science`` and older reports wrote it)."""
    return {_primary_label(task), PRIMARY_METRIC[task]}


def read_paired(folder: Path, name: str = FILES["paired_csv"]) -> tuple[str, list[dict]]:
    """A report folder's ``paired.csv`` (or another paired table, ``name``) → (its task, its
    rows with numbers as numbers). The task is the one whose primary metric labels the rows
    (each task's are its own)."""
    import csv

    path = Path(folder) / name
    if not path.is_file():
        raise ReportError(f"{path}: no such file (a folder written by python -m cliptd.report "
                          "holds one)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = {r.get("metric") for r in rows}
    tasks = [t for t in TASKS if labels & {f"{g} {n}" for g, _ in GROUPS
                                           for n in _primary_names(t)}]
    if len(tasks) != 1:
        known = ", ".join(f"in-domain {_primary_label(t)}" for t in TASKS)
        raise ReportError(f"{path}: its metric column names no one task's primary metric "
                          f"({known}, ...)")
    for r in rows:
        for k, v in r.items():
            if k.endswith(("_mean", "_std")) and v:
                r[k] = float(v)
            elif k.endswith(("_n", "_ahead")) and v:
                r[k] = int(v)
    return tasks[0], rows


def _reference_levels(folder: Path, task: str) -> dict[str, str]:
    """condition → ``none``'s mean in-domain / shifted primary metric (``37.8 / 35.3``), from
    the report folder's ``comparison.csv`` when it has one: what each paired difference is a
    difference from (a cell at chance says nothing about distillation)."""
    import csv

    path = Path(folder) / FILES["csv"]
    if not path.is_file():
        return {}
    levels: dict[str, dict[int, float]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            kind = _map_column(task, r.get("metric", ""))
            if kind is not None and not kind[1] and r.get("none_mean"):
                levels.setdefault(r["condition"], {})[kind[0]] = float(r["none_mean"])
    return {c: " / ".join(f"{v[g]:.1f}" if g in v else "—" for g in range(len(GROUPS)))
            for c, v in levels.items()}


def _map_column(task: str, metric: str) -> tuple | None:
    """A paired row's metric → its map column kind (group index, words name or ""), or None
    for a row the map leaves out (secondary metrics, question types)."""
    for i, (group, _) in enumerate(GROUPS):
        if metric in {f"{group} {n}" for n in _primary_names(task)}:
            return (i, "")
        prefix = f"{group} {PRIMARY_METRIC[task]} [words: "
        if metric.startswith(prefix) and metric.endswith("]"):
            return (i, metric[len(prefix):-1])
    return None


def cell_map(folders: list[Path]) -> dict:
    """The map across sweeps (issue 19's headline): rows are the swept cells (task × shot
    level × preset, from each report folder's ``paired.csv``), columns each method − none on
    the task's primary metric in-domain and shifted, then on each ``eval_words`` group, and
    last ``cliptd`` − ``naive`` (what the targeting adds) where a folder holds that table; a
    cell holds the mean paired difference in points and its label (std, seeds ahead / pairs)."""
    import numpy as np

    cells, rows, origin, reference = {}, {}, {}, {}
    for folder in folders:
        task, paired = read_paired(folder)
        if (Path(folder) / FILES["targeting_csv"]).is_file():
            paired = paired + read_paired(folder, FILES["targeting_csv"])[1]
        levels = _reference_levels(folder, task)
        for r in paired:
            kind = _map_column(task, r["metric"])
            if kind is None:
                continue
            preset, _, shots = r["condition"].rpartition("-shots")
            row = f"{task} {shots_label(shots)}" + (f" ({preset})" if preset else "") + \
                f", {_primary_label(task)}"
            if origin.setdefault(row, folder) != folder:
                raise ReportError(f"{origin[row]} and {folder} both hold the cell {row!r}")
            rows[row] = (TASKS.index(task), shots_key(shots), preset)
            reference[row] = levels.get(r["condition"], "")
            ref = r.get("reference") or "none"
            for m in (k.removesuffix("_mean") for k in r if k.endswith("_mean")):
                if isinstance(r[f"{m}_mean"], float):
                    cells[(row, (m, ref), kind)] = r
    methods = _in_method_order({m for _, (m, _), _ in cells})
    # against none first, per method: in-domain, shifted, then each words group (in-domain,
    # shifted); then the same against any other reference
    columns = sorted({(pair, kind) for _, pair, kind in cells},
                     key=lambda c: (c[0][1] != "none", c[0][1], methods.index(c[0][0]),
                                    c[1][1] != "", c[1][1], c[1][0]))
    ordered = sorted(rows, key=rows.get)
    values = np.full((len(ordered), len(columns)), np.nan)
    labels = [["" for _ in columns] for _ in ordered]
    for i, row in enumerate(ordered):
        for j, ((m, ref), kind) in enumerate(columns):
            r = cells.get((row, (m, ref), kind))
            if r is not None:
                values[i, j] = r[f"{m}_mean"]
                labels[i][j] = f"{r[f'{m}_mean']:+.1f} ± {r[f'{m}_std']:.1f} " \
                               f"({r[f'{m}_ahead']}/{r[f'{m}_n']})"
    names = [f"{m} − {ref}\n{GROUPS[g][0]}" + (f"\n[{w}]" if w else "")
             for (m, ref), (g, w) in columns]
    return {"rows": ordered, "columns": names, "values": values, "labels": labels,
            "reference": [reference[row] for row in ordered]}


def cell_margins(folders: list[Path]) -> list[dict]:
    """Every cell's searches, each chosen trial's margin over its runner-up beside the
    chosen config's spread over seeds (the folders' ``search_margin.csv``; a folder written
    before the report made that table has none), in the map's row order."""
    import csv

    rows = []
    for folder in folders:
        path = Path(folder) / FILES["margin_csv"]
        if not path.is_file():
            continue
        task = read_paired(folder)[0]
        with path.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                preset, _, shots = r["condition"].rpartition("-shots")
                order = (TASKS.index(task), shots_key(shots), preset,
                         METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER
                         else 99)
                rows.append((order, {"cell": f"{task} {shots_label(shots)}" + (
                    f" ({preset})" if preset else ""), **{k: r.get(k, "") for k in
                                                         MARGIN_COLUMNS[1:]},
                    "margin_points": r.get("margin_points", ""),
                    "seeds_std": r.get("seeds_std", "")}))
    return [r for _, r in sorted(rows, key=lambda x: x[0])]


def inside_spread(margins: list[dict]) -> tuple[int, int]:
    """(searches whose margin over the runner-up is smaller than the chosen config's std
    over seeds, searches with both figures)."""
    pairs = [(float(r["margin_points"]), float(r["seeds_std"])) for r in margins
             if r.get("margin_points") not in ("", None) and r.get("seeds_std") not in ("", None)]
    pairs = [(m, sd) for m, sd in pairs if not (math.isnan(m) or math.isnan(sd))]
    return sum(m < sd for m, sd in pairs), len(pairs)


def write_cell_map(folders: list[Path], out: Path) -> dict:
    """The map as a heat map, Markdown and CSV under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    m = cell_map(folders)
    if not m["rows"]:
        raise ReportError(f"no paired rows of a primary metric in {', '.join(map(str, folders))}")
    head = ["cell", "none, in-domain / shifted", *(c.replace("\n", ", ") for c in m["columns"])]
    table = [dict(zip(head, [row, ref, *(v or "" for v in labels)], strict=True))
             for row, ref, labels in zip(m["rows"], m["reference"], m["labels"], strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table, tuple(head))
    paths = {"md": atomic_write(out / MAP_FILES["md"], md),
             "csv": atomic_write(out / MAP_FILES["csv"], to_csv(table)),
             "png": _draw_map(m["values"], [[t.replace(" ± ", "\n± ").replace(" (", "\n(")
                                            for t in row] for row in m["labels"]],
                              m["columns"], [f"{row}\nnone {ref}" if ref else row for row, ref
                                             in zip(m["rows"], m["reference"], strict=True)],
                              "Where CLIP-TD helps: each method − the column's reference, "
                              "paired by seed, points (mean, ± std, seeds ahead / pairs)",
                              out / MAP_FILES["png"])}
    margins = cell_margins(folders)
    if margins:
        columns = ("cell", *MARGIN_COLUMNS[1:])
        paths["margin_md"] = atomic_write(out / MAP_FILES["margin_md"],
                                          to_markdown(margins, columns))
        paths["margin_csv"] = atomic_write(out / MAP_FILES["margin_csv"], to_csv(margins))
    return {**m, "markdown": md, "paths": paths, "margins": margins}


def map_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{prog('cliptd.report')} map",
        description="The map of every swept cell: each method − none paired by seed, from "
        "the paired.csv of report folders (python -m cliptd.report --out FOLDER); with "
        "every cell's search margins (search_margin.md) where the folders hold them.")
    parser.add_argument("folders", nargs="+", type=Path, help="report folders")
    parser.add_argument("--out", type=Path, default=Path("runs") / "report-map",
                        help="output folder (default runs/report-map)")
    args = parser.parse_args(argv)
    try:
        res = write_cell_map(args.folders, args.out.resolve())
    except ReportError as exc:
        print(f"cliptd: error: {exc}", file=sys.stderr)
        return 2
    print(res["markdown"])
    if res["margins"]:
        inside, n = inside_spread(res["margins"])
        print(f"{inside} of {n} searches chose their best by a margin (one seed) smaller than "
              f"the chosen config's std over seeds ({MAP_FILES['margin_md']})")
    for p in res["paths"].values():
        print(f"wrote {p}")
    return 0


def defaults_main(argv: list[str]) -> int:
    from cliptd.sweep import defaults

    parser = argparse.ArgumentParser(
        prog=f"{prog('cliptd.report')} defaults",
        description="cliptd's default distillation knobs derived from the sweeps' best "
        "configs (cliptd.sweep.defaults): per knob, each cell's value, the derived default "
        "and the shipped one. Exit status 1 when they differ.")
    parser.add_argument("paths", nargs="+", type=Path,
                        help="best cliptd configs (*-cliptd.yaml) or folders holding them")
    args = parser.parse_args(argv)
    try:
        files = defaults.best_configs(args.paths)
    except (OSError, ValueError) as exc:
        print(f"cliptd: error: {exc}", file=sys.stderr)
        return 2
    # each cell by name, as the map names it (its file name where two would share one)
    labels = {f: f"{c.get('task')} {shots_label(c.get('shots'))} ({c.get('preset')})"
              for f, c in files.items()}
    unique = len(set(labels.values())) == len(labels)
    named = {labels[f] if unique else f: c for f, c in files.items()}
    rows = defaults.derivation_rows(named)
    head = ["knob", *named, "derived", "shipped"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r[h] for h in head) + " |")
    differ = [r["knob"] for r in rows if not r["same"]]
    print(f"\nthe shipped defaults differ on {', '.join(differ)}" if differ else
          "\nthe shipped defaults are the derived ones")
    return 1 if differ else 0


def targeting_rows(seeds: list[dict], metrics: dict[str, str]) -> list[dict]:
    """``cliptd`` − ``naive`` paired by seed on ``metrics``, when a sweep ran both: what the
    targeting (selected tokens, dynamic weights, the schedule) adds over distilling every
    token uniformly with the same teacher. Empty when either is missing."""
    both = [r for r in seeds if r["method"] in ("naive", "cliptd")]
    if {r["method"] for r in both} != {"naive", "cliptd"}:
        return []
    return paired_rows(both, metrics, reference="naive")


def chosen_trials(search: list[dict], parent_tags: dict) -> dict[tuple, str]:
    """(condition, method) → the trial each search chose as its best: the sweep's parent
    tag (``cliptd.sweep.records.best_tag``), else, for a sweep older than that tag, the
    search trial tagged compared (a chosen trial that finished stands as seed 0)."""
    from cliptd.sweep.records import BEST_TAG

    prefix = f"{BEST_TAG}."
    out = {}
    for r in search:
        if r["compare"]:
            out.setdefault((r["condition"], r["method"]), r["trial_id"])
    for key, trial in parent_tags.items():
        if key.startswith(prefix):  # the condition holds dots (shots0.05), the method none
            condition, method = key[len(prefix):].rsplit(".", 1)
            out[(condition, method)] = trial
    return out


def _knob(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


def search_margin_rows(search: list[dict], seeds: list[dict], chosen: dict[tuple, str],
                       task: str) -> list[dict]:
    """How far each search's chosen trial stood above its runner-up, beside the spread of
    the chosen config over seeds. Every trial of a search trains on one seed (the base
    seed), so a margin inside the chosen config's own spread across seeds says the search
    could not tell the two configs apart: the choice was partly the seed's. The runner-up
    is the best other finished trial, scored like the chosen on the whole eval split
    (``cliptd.sweep.search.finished``); a trial ASHA stopped was scored on a sample,
    mid-training, and is left out. ``runner-up differs in`` lists its knobs that differ."""
    import numpy as np

    from cliptd.sweep.search import finished

    spread = aggregate(seeds, f"val/id/{PRIMARY_METRIC[task]}")
    rows = []
    def order(item):
        (condition, method), _ = item
        return (shots_key(condition.rpartition("-shots")[2]),
                METHOD_ORDER.index(method) if method in METHOD_ORDER else 99)

    for (condition, method), trial in sorted(chosen.items(), key=order):
        trials = [r for r in search if (r["condition"], r["method"]) == (condition, method)
                  and "score" in r["metrics"] and not math.isnan(r["metrics"]["score"])]
        best = next((r for r in trials if r["trial_id"] == trial), None)
        if best is None:
            continue
        done = [r for r in trials if finished(r["metrics"], int(r["params"].get("epochs",
                                                                                 10**9)))]
        others = sorted((r for r in done if r is not best),
                        key=lambda r: r["metrics"]["score"], reverse=True)
        vals = spread.get((condition, method), [])
        std = 100 * float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        row = {"condition": condition, "method": method, "trials": len(trials),
               "finished": len(done), "chosen": f"{100 * best['metrics']['score']:.1f}",
               "runner-up": "", "margin": "", "chosen config over seeds, std":
                   f"{std:.1f} (n={len(vals)})" if vals else "", "runner-up differs in": ""}
        row["margin_points"], row["seeds_std"] = float("nan"), std
        if others:
            up = others[0]
            margin = 100 * (best["metrics"]["score"] - up["metrics"]["score"])
            row.update({"runner-up": f"{100 * up['metrics']['score']:.1f}",
                        "margin": f"{margin:+.1f}", "margin_points": margin,
                        "runner-up differs in": ", ".join(
                            f"{k.removeprefix('distill.')} {_knob(up['params'][k])}"
                            for k in sorted(up["params"])
                            if up["params"][k] != best["params"].get(k))})
        rows.append(row)
    return rows


def build(uri: str, task: str, experiment: str | None, sweep: str | None, out: Path,
          log_artifacts: bool = True) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    got = load_runs(uri, task, experiment, sweep)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(got["seeds"], metric_rows(task))
    metrics = {**metric_rows(task), **qtype_metrics(got["seeds"], PRIMARY_METRIC[task])}
    paired = paired_rows(got["seeds"], metrics)
    md = to_markdown(rows)
    timing = sweep_time(got["client"], got["children"])
    targeting = targeting_rows(got["seeds"], metrics)
    paths = {"md": atomic_write(out / FILES["md"], md),
             "time": atomic_write(out / FILES["time"], sweep_time_markdown(timing)),
             "csv": atomic_write(out / FILES["csv"], to_csv(rows)),
             "paired_md": atomic_write(out / FILES["paired_md"], to_markdown(paired)),
             "paired_csv": atomic_write(out / FILES["paired_csv"], to_csv(paired)),
             "shots": plot_accuracy_vs_shots(got["seeds"], task, out / FILES["shots"]),
             "gain": plot_gain_shifted(got["seeds"], task, out / FILES["gain"]),
             "search": plot_search(got["search"], task, out / FILES["search"]),
             "cost": plot_accuracy_vs_cost(got["seeds"], task, out / FILES["cost"]),
             "map": plot_paired_map(paired, task, out / FILES["map"])}
    if targeting:
        paths["targeting_md"] = atomic_write(out / FILES["targeting_md"],
                                             to_markdown(targeting))
        paths["targeting_csv"] = atomic_write(out / FILES["targeting_csv"], to_csv(targeting))
    margins = search_margin_rows(got["search"], got["seeds"], chosen_trials(
        got["search"], got["parent"].data.tags), task)
    if margins:
        paths["margin_md"] = atomic_write(out / FILES["margin_md"],
                                          to_markdown(margins, MARGIN_COLUMNS))
        paths["margin_csv"] = atomic_write(out / FILES["margin_csv"], to_csv(margins))
    curves = learning_curves(got["client"], got["seeds"])
    paths["curves_csv"] = atomic_write(out / FILES["curves_csv"], to_csv(curves))
    paths["curves"] = plot_learning_curves(curves, task, out / FILES["curves"])
    parent_id = got["parent"].info.run_id
    if log_artifacts:
        for p in paths.values():
            got["client"].log_artifact(parent_id, str(p), artifact_path="report")
    return {**got, "rows": rows, "markdown": md, "paired": paired, "time": timing,
            "targeting": targeting, "margins": margins,
            "paired_markdown": to_markdown(paired), "paths": paths, "parent_id": parent_id}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog("cliptd.report"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="vcr", choices=TASKS)
    parser.add_argument("--experiment", help="MLflow experiment (default cliptd-<task>)")
    parser.add_argument("--sweep", help="sweep name = the parent run's cliptd.sweep_id tag "
                        "(default: the latest sweep of the experiment)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default "
                        "sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/report-<task>)")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log the files as artifacts of the sweep's parent run")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["map"]:
        return map_main(argv[1:])
    if argv[:1] == ["defaults"]:
        return defaults_main(argv[1:])
    args = parser.parse_args(argv)
    from cliptd.tracking import runs as tracking

    uri = args.tracking_uri or tracking.default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        # MLflow would silently create an empty store: say what is missing instead
        print(f"cliptd: error: no MLflow store at {uri[len('sqlite:///'):]} (pass "
              "--tracking-uri)", file=sys.stderr)
        return 2
    try:
        tracking.check_reachable(uri)  # fail fast instead of MLflow's minutes of retries
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store: say so, exit 2
        print(f"cliptd: error: MLflow tracking at {uri} is not usable: {exc}", file=sys.stderr)
        return 2
    out = (args.out or Path("runs") / f"report-{args.task}").resolve()
    try:
        res = build(uri, args.task, args.experiment, args.sweep, out,
                    log_artifacts=not args.no_log)
    except ReportError as exc:
        print(f"cliptd: error: {exc}", file=sys.stderr)
        return 2
    parent = res["parent"]
    print(f"== {res['experiment'].name} / sweep {parent.data.tags.get('cliptd.sweep_id')} "
          f"(parent run {res['parent_id']}): {len(res['seeds'])} seeds run(s), "
          f"{len(res['search'])} search run(s) ==")
    key = f"val/id/{PRIMARY_METRIC[args.task]}"
    runs = {r["run_id"]: r for r in res["seeds"] + res["search"]}  # a run may be in both
    bare = [r for r in runs.values() if key not in r["metrics"]]
    if bare:  # say so: an empty table must not pass for "nothing finished"
        print(f"cliptd: warning: {len(bare)} of {len(runs)} "
              f"run(s) have no {key} in MLflow (unsent metrics stay in the runs' tracking "
              "buffer, ~/.cache/cliptd/mlflow-buffer, until a run of the same id flushes it)",
              file=sys.stderr)
    if res["skipped"]:
        print(f"(left out {len(res['skipped'])} seed run(s) not FINISHED: "
              f"{', '.join(sorted({r['status'] for r in res['skipped']}))})")
    print("\n== Comparison (mean ± std over seeds, %) ==")
    print(res["markdown"])
    print("Paired by seed: method − none, points (mean ± std, seeds ahead / pairs)")
    print(res["paired_markdown"])
    if res["targeting"]:
        print("Paired by seed: cliptd − naive, what the targeting adds, points")
        print(to_markdown(res["targeting"]))
    if res["margins"]:
        print("== Each search's choice: its margin over the runner-up (one seed) beside the "
              "chosen config's spread over seeds, in-domain, points ==")
        print(to_markdown(res["margins"], MARGIN_COLUMNS))
    print("== Where the trial slots' time went ==")
    print(sweep_time_markdown(res["time"]))
    for p in res["paths"].values():
        print(f"wrote {p}")
    if not args.no_log:
        print(f"logged to MLflow run {res['parent_id']} under artifacts report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
