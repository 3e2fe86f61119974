"""cliptd.report on a hand-built MLflow store (no Ray, no training): the table's numbers, the
plots, the artifacts on the sweep's parent run, and the errors."""

from __future__ import annotations

import csv
import os
import socket
import statistics

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from cliptd import report  # noqa: E402
from cliptd.tracking.table import COST_LABEL

CONDITIONS = {"synthetic-shots0.05": ("0.05", 0.40), "synthetic-shots1.0": ("1.0", 0.60)}
METHODS = {"none": 0.0, "naive": 0.02, "cliptd": 0.05}
SEED_OFFSET = {0: -0.01, 1: 0.0, 2: 0.02}
SHIFT_DROP = {"none": 0.20, "naive": 0.15, "cliptd": 0.10}  # shifted = in-domain − drop
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def final(cond, method, seed, group="id", metric="q_a"):
    v = CONDITIONS[cond][1] + METHODS[method] + SEED_OFFSET[seed]
    v -= SHIFT_DROP[method] if group == "shift" else 0.0
    return v - {"q_a": 0.0, "qa_r": 0.05, "q_ar": 0.10}[metric]


def _metrics(cond, method, seed, epochs=3):
    from mlflow.entities import Metric

    out = []
    for ep in range(epochs):  # earlier epochs log other values: the last one must win
        last = ep == epochs - 1
        for g in ("id", "shift"):
            for m in ("q_a", "qa_r", "q_ar"):
                v = final(cond, method, seed, g, m) if last else 0.01 * (ep + 1)
                out.append(Metric(f"val/{g}/{m}", v, 1000 + ep, ep))
        out.append(Metric("score", final(cond, method, seed) if last else 0.0, 1000 + ep, ep))
    return out


def _child(c, exp, parent, sweep, cond, method, seed, phase, status="FINISHED", params=None,
           metrics=None, compare=False):
    shots, _ = CONDITIONS[cond]
    run = c.create_run(exp, run_name=f"{cond}/{method}/{phase}{seed}", tags={
        "mlflow.parentRunId": parent, "cliptd.kind": "trial",
        **({"cliptd.compare": "true"} if compare else {}),
        "cliptd.trial_id": f"{sweep}/{cond}-{method}-{phase}-{seed}", "task": "vcr",
        "condition": cond, "shots": shots, "preset": "synthetic", "method": method,
        "seed": str(seed), "subset_seed": str(seed), "phase": phase, "sweep": sweep})
    from mlflow.entities import Param

    params = {"distill.method": method, "distill.select_ratio_v": "1.0",
              "distill.weighting": "uniform", "lr": "0.0001", **(params or {})}
    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                metrics=metrics if metrics is not None else _metrics(cond, method, seed))
    c.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def report_metric(key, value, step=0):
    from mlflow.entities import Metric

    return Metric(key, value, 1000, step)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("cliptd-vcr", artifact_location=(tmp / "artifacts").as_uri())
    # an older sweep that must not be picked by default
    old = c.create_run(exp, run_name="old", start_time=1,
                       tags={"cliptd.kind": "sweep", "cliptd.sweep_id": "vcr-old"}).info.run_id
    _child(c, exp, old, "vcr-old", "synthetic-shots0.05", "none", 0, "seeds",
           metrics=[report_metric("val/id/q_a", 0.99)])
    parent = c.create_run(exp, run_name="vcr-test", start_time=10**12, tags={
        "cliptd.kind": "sweep", "cliptd.sweep_id": "vcr-test", "task": "vcr"}).info.run_id
    for cond in CONDITIONS:
        for method in METHODS:
            for seed in SEED_OFFSET:
                # seed 0 is the search's best trial (tagged), the others are re-runs
                _child(c, exp, parent, "vcr-test", cond, method, seed,
                       "search" if seed == 0 else "seeds", compare=seed == 0)
    # a failed seeds run with absurd values: left out of the table
    _child(c, exp, parent, "vcr-test", "synthetic-shots0.05", "cliptd", 3, "seeds",
           status="FAILED", metrics=[report_metric("val/id/q_a", 0.0)])
    # search trials of 3 epochs: the last cliptd one ASHA stopped after 1 (its sample score
    # the highest, not comparable), the one before patience ended (a finished runner-up)
    search = [("none", "1.0", "uniform", 0.41, 3, 0), ("naive", "1.0", "uniform", 0.43, 3, 0),
              ("cliptd", "0.4", "confidence", 0.47, 3, 0),
              ("cliptd", "0.7", "threshold", 0.45, 2, 1),
              ("cliptd", "0.9", "uniform", 0.44, 3, 0), ("cliptd", "0.2", "uniform", 0.49, 1, 0)]
    for i, (method, ratio, weighting, v, epoch, stopped) in enumerate(search):
        _child(c, exp, parent, "vcr-test", "synthetic-shots0.05", method, 10 + i, "search",
               params={"distill.select_ratio_v": ratio, "distill.weighting": weighting,
                       "epochs": "3"},
               metrics=[report_metric("val/id/q_a", v), report_metric("score", v),
                        report_metric("epoch", epoch),
                        report_metric("train/stopped_early", stopped)])
    c.set_tag(parent, "cliptd.best_trial.synthetic-shots0.05.cliptd",
              "vcr-test/synthetic-shots0.05-cliptd-search-12")
    # an experiment with a sweep but no seeds runs, and one with no sweep at all
    e2 = c.create_experiment("cliptd-empty", artifact_location=(tmp / "a2").as_uri())
    p2 = c.create_run(e2, tags={"cliptd.kind": "sweep", "cliptd.sweep_id": "s"}).info.run_id
    _child(c, e2, p2, "s", "synthetic-shots0.05", "none", 0, "search")
    c.create_experiment("cliptd-nosweep", artifact_location=(tmp / "a3").as_uri())
    return {"uri": uri, "client": c, "parent": parent, "old": old, "tmp": tmp}


def expected(cond, method, group="id", metric="q_a"):
    vals = [100 * final(cond, method, s, group, metric) for s in SEED_OFFSET]
    return statistics.mean(vals), statistics.stdev(vals)


@pytest.fixture(scope="module")
def ran(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rc = report.main(["--task", "vcr", "--tracking-uri", store["uri"], "--out", str(out)])
    return {"rc": rc, "out": out}


def _rows(out):
    with (out / "comparison.csv").open() as f:
        return {(r["condition"], r["metric"]): r for r in csv.DictReader(f)}


def test_table_values(ran):
    assert ran["rc"] == 0
    rows = _rows(ran["out"])
    # 2 conditions × (3 in-domain + 3 shifted metrics)
    assert len(rows) == 12
    assert [k[1] for k in rows][:2] == ["in-domain Q→A", "in-domain Q→A"]
    for cond in CONDITIONS:
        for label, group, metric in [("in-domain Q→A", "id", "q_a"),
                                     ("in-domain Q→AR", "id", "q_ar"),
                                     ("shifted QA→R", "shift", "qa_r")]:
            row = rows[(cond, label)]
            for method in METHODS:
                mean, std = expected(cond, method, group, metric)
                assert float(row[f"{method}_mean"]) == pytest.approx(mean)
                assert float(row[f"{method}_std"]) == pytest.approx(std)
                assert row[f"{method}_n"] == "3"  # the FAILED 4th cliptd seed is left out
            base = expected(cond, "none", group, metric)[0]
            gain = 100 * (expected(cond, "cliptd", group, metric)[0] - base) / base
            assert row["cliptd vs none"] == f"{gain:+.1f}%"
    # by hand: 5% in-domain Q→A, cliptd = 45 + (-1, 0, 2) → mean 45.33, sd sqrt(7/3)=1.53;
    # none = 40.33 ± 1.53; gain = 5/40.333 = +12.4%
    r = rows[("synthetic-shots0.05", "in-domain Q→A")]
    assert r["cliptd"] == "45.3 ± 1.5 (n=3)"
    assert r["none"] == "40.3 ± 1.5 (n=3)"
    assert r["cliptd vs none"] == "+12.4%"
    # shifted full data: none = 60.33 − 20, cliptd = 65.33 − 10 → +37.2%
    assert rows[("synthetic-shots1.0", "shifted Q→A")]["cliptd vs none"] == "+37.2%"
    md = (ran["out"] / "comparison.md").read_text()
    assert "| synthetic-shots0.05 | in-domain Q→A | 40.3 ± 1.5 (n=3) |" in md
    assert "cliptd vs none" in md.splitlines()[0]


def test_pngs_valid(ran):
    from PIL import Image

    for name in ("accuracy_vs_shots.png", "gain_shifted.png", "search.png",
                 "accuracy_vs_cost.png", "paired_map.png", "curves.png"):
        p = ran["out"] / name
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        with Image.open(p) as im:
            im.verify()
    assert not [p for p in ran["out"].iterdir() if ".tmp" in p.name]  # atomic writes


def test_learning_curves_hold_every_epoch_of_the_compared_runs(ran):
    with (ran["out"] / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    # 2 conditions × 3 methods × 3 seeds, 3 epochs each; the FAILED seed and the search's
    # other trials are not compared runs
    assert len(rows) == 2 * 3 * 3 * 3
    runs = {}
    for r in rows:
        runs.setdefault((r["condition"], r["method"], r["seed"]), []).append(r)
    assert len(runs) == 18
    for (cond, method, seed), epochs in runs.items():
        assert [int(r["epoch"]) for r in epochs] == [0, 1, 2]
        assert [float(r["score"]) for r in epochs[:2]] == [0.0, 0.0]
        assert float(epochs[-1]["score"]) == pytest.approx(final(cond, method, int(seed)))


def test_paired_map_holds_the_paired_differences():
    """The headline map: conditions in shot order, in-domain then shifted, each method's
    mean paired difference and its sign count, from the same rows as paired.md."""
    import math

    from cliptd.tracking.table import paired_rows

    records = [{"condition": cond, "method": m, "seed": s,
                "metrics": {f"val/{g}/q_a": final(cond, m, s, g) for g in ("id", "shift")}}
               for cond in reversed(list(CONDITIONS)) for m in METHODS for s in SEED_OFFSET]
    m = report.paired_map(paired_rows(records, report.metric_rows("vcr")), "vcr")
    assert m["rows"] == [f"{c}\n{g} Q→A" for c in CONDITIONS for g in ("in-domain", "shifted")]
    assert m["methods"] == ["naive", "cliptd"]
    # every seed keeps its offset in both methods: the difference is the method's alone
    assert m["values"][0].tolist() == pytest.approx([2.0, 5.0])   # 5 %, in-domain
    assert m["values"][1].tolist() == pytest.approx([7.0, 15.0])  # shifted: less drop too
    assert m["labels"][0][1] == "+5.0\n± 0.0\n3/3"
    one = report.paired_map(paired_rows(records[:3] + records[6:9],
                                        report.metric_rows("vcr")), "vcr")  # none + cliptd
    assert one["methods"] == ["cliptd"] and not any(math.isnan(v) for v in
                                                     one["values"].ravel())


def test_cliptd_against_naive_what_the_targeting_adds(ran, tmp_path):
    """cliptd − naive paired by seed (the fixtures' methods differ by fixed offsets): +3.0
    in-domain (0.05 − 0.02), +8.0 shifted (the smaller drop too), every seed ahead; a sweep
    without naive writes no such table."""
    with (ran["out"] / "paired_cliptd_vs_naive.csv").open() as f:
        rows = {(r["condition"], r["metric"]): r for r in csv.DictReader(f)}
    assert {r["reference"] for r in rows.values()} == {"naive"}
    assert all("none" not in r for r in rows.values())
    assert rows[("synthetic-shots0.05", "in-domain Q→A")]["cliptd"] == "+3.0 ± 0.0 (3/3)"
    assert rows[("synthetic-shots1.0", "shifted Q→A")]["cliptd"] == "+8.0 ± 0.0 (3/3)"
    seeds = [{"condition": "c", "method": m, "seed": s, "metrics": {"val/id/q_a": 0.5}}
             for m in ("none", "cliptd") for s in (0, 1)]
    assert report.targeting_rows(seeds, report.metric_rows("vcr")) == []


def test_search_margin_against_the_seeds_spread(ran):
    """Each search's chosen trial against its best other finished trial: for cliptd at 5 %
    the parent tag's choice (47.0) over the patience-ended runner-up (45.0), not over the
    ASHA-stopped trial's higher sample score; beside it the chosen config's std over seeds
    (0.44, 0.45, 0.47). Searches older than the tag fall back to the compared search run."""
    with (ran["out"] / "search_margin.csv").open() as f:
        rows = {(r["condition"], r["method"]): r for r in csv.DictReader(f)}
    row = rows[("synthetic-shots0.05", "cliptd")]
    assert (row["chosen"], row["runner-up"], row["margin"]) == ("47.0", "45.0", "+2.0")
    assert (row["trials"], row["finished"]) == ("5", "3")  # 4 searched + the compared seed 0
    assert row["runner-up differs in"] == "select_ratio_v 0.7, weighting threshold"
    std = statistics.stdev(100 * final("synthetic-shots0.05", "cliptd", s) for s in SEED_OFFSET)
    assert row["chosen config over seeds, std"] == f"{std:.1f} (n=3)"
    # none at 5 % had no tag: its compared search run (seed 0) is the chosen; it has no
    # epoch count, so only the other trial finished, the runner-up
    none = rows[("synthetic-shots0.05", "none")]
    assert none["chosen"] == f"{100 * final('synthetic-shots0.05', 'none', 0):.1f}" == "39.0"
    assert (none["runner-up"], none["margin"], none["finished"]) == ("41.0", "-2.0", "1")
    assert "| synthetic-shots0.05 | cliptd | 5 | 3 | 47.0 | 45.0 | +2.0 |" in (
        ran["out"] / "search_margin.md").read_text()


def test_artifacts_on_parent(ran, store):
    c = store["client"]
    names = sorted(a.path for a in c.list_artifacts(store["parent"], "report"))
    assert names == sorted(f"report/{f}" for f in report.FILES.values())
    assert c.list_artifacts(store["old"]) == []
    local = c.download_artifacts(store["parent"], "report/comparison.csv",
                                 str(store["tmp"] / "dl"))
    assert open(local).read() == (ran["out"] / "comparison.csv").read_text()


def test_older_sweep_by_name(store, tmp_path, capsys):
    rc = report.main(["--task", "vcr", "--tracking-uri", store["uri"], "--sweep", "vcr-old",
                      "--out", str(tmp_path), "--no-log"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "99.0 ± 0.0 (n=1)" in out and str(tmp_path / "comparison.md") in out
    assert store["client"].list_artifacts(store["old"]) == []


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "no MLflow experiment 'nope'"),
    (["--experiment", "cliptd-nosweep"], "no sweep"),
    (["--sweep", "missing"], "no sweep 'missing'"),
    (["--experiment", "cliptd-empty"], "no finished seed runs of a best config"),
])
def test_errors(store, tmp_path, capsys, args, message):
    rc = report.main(["--task", "vcr", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                      *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_store(tmp_path, capsys):
    rc = report.main(["--task", "vcr", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"])
    assert rc == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


def test_unreachable_server(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = report.main(["--task", "vcr", "--tracking-uri", f"http://127.0.0.1:{port}",
                      "--out", str(tmp_path)])
    assert rc == 2
    assert "is not usable" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# clip_features (CLIP inside the student) as a column, and the inference-cost row

COST = {  # method → (params, params vs none, ms / instance, forward vs none) per seed 0, 1
    "none": [(7.2e5, 1.0, 0.50, 1.02), (7.2e5, 1.0, 0.52, 0.98)],
    "cliptd": [(7.2e5, 1.0, 0.51, 1.01), (7.2e5, 1.0, 0.49, 0.99)],
    "clip_features": [(8.3e5, 1.153, 0.90, 1.80), (8.3e5, 1.153, 1.10, 2.20)],
}
ACC = {"none": (0.40, 0.42), "cliptd": (0.45, 0.47), "clip_features": (0.43, 0.41)}


@pytest.fixture(scope="module")
def cost_store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow-cost")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("cliptd-vcr", artifact_location=(tmp / "artifacts").as_uri())
    parent = c.create_run(exp, run_name="vcr-cost", tags={
        "cliptd.kind": "sweep", "cliptd.sweep_id": "vcr-cost", "task": "vcr"}).info.run_id
    for method, costs in COST.items():
        for seed, (params, p_ratio, ms, t_ratio) in enumerate(costs):
            metrics = [report_metric(f"val/{g}/{m}", ACC[method][seed], step=2)
                       for g in ("id", "shift") for m in ("q_a", "qa_r", "q_ar")]
            metrics += [report_metric(k, v, step=2) for k, v in (
                ("model/params", params), ("model/params_vs_none", p_ratio),
                ("model/forward_ms_per_instance", ms), ("model/forward_vs_none", t_ratio))]
            _child(c, exp, parent, "vcr-cost", "synthetic-shots0.05", method, seed, "seeds",
                   metrics=metrics, compare=True)
    return {"uri": uri}


def test_clip_features_column_and_inference_cost_row(cost_store, tmp_path):
    rc = report.main(["--task", "vcr", "--tracking-uri", cost_store["uri"], "--out",
                      str(tmp_path), "--no-log"])
    assert rc == 0
    rows = _rows(tmp_path)
    q_a = rows[("synthetic-shots0.05", "in-domain Q→A")]
    assert q_a["clip_features"] == "42.0 ± 1.4 (n=2)"
    assert q_a["clip_features vs none"] == f"{100 * (0.42 - 0.41) / 0.41:+.1f}%"
    cost = rows[("synthetic-shots0.05", COST_LABEL)]
    for method, costs in COST.items():  # means over seeds of what each run measured
        assert float(cost[f"{method}_params"]) == pytest.approx(costs[0][0])
        assert float(cost[f"{method}_params_vs_none"]) == pytest.approx(costs[0][1])
        assert float(cost[f"{method}_forward_ms"]) == pytest.approx(
            statistics.mean(c[2] for c in costs))
        assert float(cost[f"{method}_forward_vs_none"]) == pytest.approx(
            statistics.mean(c[3] for c in costs))
    assert cost["clip_features"] == "params 1.15×, time 2.00× (0.83 M, 1.00 ms; n=2)"
    assert cost["none"] == "params 1.00×, time 1.00× (0.72 M, 0.51 ms; n=2)"
    md = (tmp_path / "comparison.md").read_text().splitlines()
    head = md[0].split(" | ")
    assert head[2:5] == ["none", "cliptd", "clip_features"]
    assert "clip_features vs none" in md[0] and "_forward_ms" not in md[0]
    cost_line = next(line for line in md if COST_LABEL in line)
    assert "params 1.15×, time 2.00×" in cost_line
    png = (tmp_path / "accuracy_vs_cost.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000


def test_runs_without_metrics_are_reported(tmp_path, capsys):
    """Finished runs whose metrics never reached MLflow (e.g. still in a tracking buffer)
    must not pass for an empty sweep: the report says how many have no metric."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("cliptd-vcr", artifact_location=(tmp_path / "a").as_uri())
    parent = c.create_run(exp, tags={"cliptd.kind": "sweep", "cliptd.sweep_id": "bare",
                                     "task": "vcr"}).info.run_id
    for method in ("none", "cliptd"):
        _child(c, exp, parent, "bare", "synthetic-shots0.05", method, 0, "search",
               metrics=[], compare=True)
    rc = report.main(["--task", "vcr", "--tracking-uri", uri, "--out", str(tmp_path / "r"),
                      "--no-log"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "2 of 2 run(s) have no val/id/q_a in MLflow" in err, err


def _snli_folder(tmp_path, name="snli", cond="synthetic-shots0.05"):
    """A report folder of another task, as ``bench science`` and older reports wrote it
    (metrics named by key), with an eval_words row and a question-type row."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "paired.csv").write_text(
        "condition,metric,reference,cliptd,cliptd_mean,cliptd_std,cliptd_n,cliptd_ahead\n"
        f"{cond},in-domain acc,none,+0.6 ± 1.2 (3/5),0.6,1.2,5,3\n"
        f"{cond},shifted acc,none,-0.3 ± 0.9 (2/5),-0.3,0.9,5,2\n"
        f"{cond},in-domain acc [words: unseen],none,-1.1 ± 0.9 (0/5),-1.1,0.9,5,0\n"
        f"{cond},in-domain acc [colour],none,+9.9 ± 0.1 (5/5),9.9,0.1,5,5\n",
        encoding="utf-8")
    return folder


def test_map_across_sweeps(ran, tmp_path, capsys):
    """``report map``: one row per swept cell of every report folder given (tasks in TASKS
    order, shot levels ascending), one column per method − none on the primary metric
    in-domain, shifted, then each eval_words group; secondary metrics and question types are
    left out; Markdown, CSV and a PNG."""
    from PIL import Image

    snli = _snli_folder(tmp_path)
    out = tmp_path / "map"
    assert report.main(["map", str(snli), str(ran["out"]), "--out", str(out)]) == 0
    m = report.cell_map([snli, ran["out"]])
    assert m["rows"] == ["vcr 5% (synthetic), Q→A", "vcr full (synthetic), Q→A",
                         "snli_ve 5% (synthetic), acc"]
    assert m["columns"] == ["naive − none\nin-domain", "naive − none\nshifted",
                            "cliptd − none\nin-domain", "cliptd − none\nshifted",
                            "cliptd − none\nin-domain\n[unseen]",
                            # the vcr folder ran naive and cliptd: what the targeting adds
                            "cliptd − naive\nin-domain", "cliptd − naive\nshifted"]
    nan = float("nan")
    # the fixtures' methods differ by fixed offsets in every seed (test_paired_map_...)
    assert m["values"][0].tolist() == pytest.approx([2.0, 7.0, 5.0, 15.0, nan, 3.0, 8.0],
                                                    nan_ok=True)
    assert m["values"][2].tolist() == pytest.approx([nan, nan, 0.6, -0.3, -1.1, nan, nan],
                                                    nan_ok=True)
    assert m["labels"][0][2] == "+5.0 ± 0.0 (3/3)" and m["labels"][2][0] == ""
    md = (out / "map.md").read_text()
    assert "| snli_ve 5% (synthetic), acc |  |  |  | +0.6 ± 1.2 (3/5) | -0.3 ± 0.9 (2/5) | " \
           "-1.1 ± 0.9 (0/5) |" in md and "9.9" not in md
    # what the differences are differences from: none's level, from comparison.csv
    assert m["reference"] == [" / ".join(f"{expected(cond, 'none', g)[0]:.1f}"
                                         for g in ("id", "shift")) for cond in CONDITIONS] + [""]
    printed = capsys.readouterr().out
    assert md in printed
    with Image.open(out / "map.png") as im:
        im.verify()
    # the vcr folder's search margins (the snli one, older, has none), in the map's order.
    # At 5 % none's and naive's chosen trials are 2.0 behind a runner-up, cliptd's 2.0
    # ahead, against a spread over seeds of 1.5 each: 2 of the 3 chose inside the spread;
    # at 100 % no search has a finished runner-up, so no margin to count
    assert [(r["cell"], r["method"]) for r in m_rows(out)] == [
        (f"vcr {shots} (synthetic)", m) for shots in ("5%", "full") for m in METHODS]
    assert "| vcr 5% (synthetic) | cliptd | 5 | 3 | 47.0 | 45.0 | +2.0 |" in (
        out / "search_margin.md").read_text()
    assert "2 of 3 searches chose their best by a margin (one seed) smaller than" in printed
    assert sorted(p.name for p in out.iterdir()) == ["map.csv", "map.md", "map.png",
                                                     "search_margin.csv", "search_margin.md"]


def m_rows(out):
    with (out / "search_margin.csv").open() as f:
        return list(csv.DictReader(f))


def test_map_refuses_what_it_cannot_place(ran, tmp_path, capsys):
    """A folder without a paired table, one whose rows name no task's primary metric, and
    the same cell in two folders: one line naming the file or cells, exit 2, nothing written."""
    out = tmp_path / "map"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main(["map", str(empty), "--out", str(out)]) == 2
    assert f"{empty / 'paired.csv'}: no such file" in capsys.readouterr().err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "paired.csv").write_text("condition,metric,reference\nx,in-domain BLEU,none\n")
    assert report.main(["map", str(odd), "--out", str(out)]) == 2
    assert "names no one task's primary metric" in capsys.readouterr().err
    a, b = _snli_folder(tmp_path, "a"), _snli_folder(tmp_path, "b")
    assert report.main(["map", str(a), str(b), "--out", str(out)]) == 2
    assert "both hold the cell 'snli_ve 5% (synthetic), acc'" in capsys.readouterr().err
    assert not out.exists()

