"""A sweep's trials in MLflow: each trial's run opened, closed with its metrics made whole
and its status set; compared runs tagged. All of it from the search's own process (on the
head), never from a trial."""

from __future__ import annotations

from cliptd.core.config import resolve_config
from cliptd.sweep.driver import kind_of
from cliptd.sweep.space import apply_sample


def open_trial_run(meta: dict, config: dict, tune_trial_id: str) -> str:
    """The MLflow run of Tune trial ``tune_trial_id`` (sampled ``config``) of the search
    ``meta`` describes, found or created (tags, params: the resolved config, searcher seed
    and package versions; the dataset as its input); returns its id. Safe to call again."""
    from cliptd.tracking import runs as tracking

    cfg = resolve_config(apply_sample(meta["base"], config))
    tags = {"task": cfg["task"], "condition": meta["condition"], "shots": cfg["shots"],
            "preset": cfg["preset"], "method": cfg["distill"]["method"], "seed": cfg["seed"],
            "subset_seed": cfg["subset_seed"], "phase": meta["phase"],
            "sweep": meta["sweep_id"], "trial_kind": kind_of(meta)}
    run_id, _ = tracking.find_or_create_trial_run(
        meta["tracking_uri"], meta["experiment_id"], meta["parent_run_id"],
        f"{meta['sweep_id']}/{tune_trial_id}",
        name=f"{meta['condition']}/{cfg['distill']['method']}/{tune_trial_id}", tags=tags,
        params={**cfg, "searcher_seed": meta["searcher_seed"], "versions": meta["versions"]},
        dataset=cfg)
    return run_id


def close_runs(grid, meta: dict, phase: str) -> list[dict]:
    """Mark each trial's MLflow run finished (Ray does not) with its final metrics.

    First its metrics are made whole: Tune stops a trial as soon as it reports its last
    epoch, so an epoch logged while the server was away can still sit in the trial's local
    buffer (replayed here), or, on another node, only in Ray's results (filled in)."""
    from cliptd.tracking import runs as tracking

    records = []
    uri = meta.get("tracking_uri")
    for r in grid:
        m = r.metrics or {}
        trial_id = f"{meta['sweep_id']}/{m['trial_id']}" if m.get("trial_id") else None
        cfg = r.config or {}
        records.append({"phase": phase, "metrics": m, "config": cfg,
                        "error": None if r.error is None else str(r.error),
                        "seed": cfg.get("seed", 0), "trial_id": trial_id})
        if uri is None or trial_id is None:
            continue
        tracking.patiently(lambda r=r, m=m, trial_id=trial_id: _close_run(
            uri, meta, r, m, trial_id), f"closing the MLflow run of trial {trial_id}")
    return records


def _ray_results(result) -> list[dict]:
    """Every result Ray recorded for a trial (one per epoch), [] when it has none."""
    try:
        df = result.metrics_dataframe
    except Exception:  # noqa: BLE001 - a trial that never reported has no progress file
        return []
    return [] if df is None else df.to_dict("records")


def _close_run(uri: str, meta: dict, result, m: dict, trial_id: str) -> None:
    from cliptd.tracking import runs as tracking

    c = tracking.client(uri)
    def find():
        return c.search_runs([meta["experiment_id"]],
                             filter_string=f"tags.`cliptd.trial_id` = '{trial_id}'")

    runs = find()
    if not runs:  # the server was away for the whole of the trial's life: opened now
        open_trial_run(meta, result.config or {}, m["trial_id"])
        runs = find()
    for run in runs:
        tracking.replay_buffer(uri, run.info.run_id)
        filled = tracking.backfill(uri, run.info.run_id, _ray_results(result))
        if filled:  # epochs no live logger sent: recovered from Ray's results, said so
            c.set_tag(run.info.run_id, "cliptd.backfilled_epochs", str(filled))
        status = "FAILED" if result.error else "FINISHED"
        if m.get("epoch", 0) and run.info.status == "RUNNING":
            c.set_tag(run.info.run_id, "cliptd.early_stopped",
                      str(m.get("epoch") < meta["epochs"]))
            c.set_tag(run.info.run_id, "cliptd.best_checkpoint",
                      str(result.checkpoint.path) if result.checkpoint else "")
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, status=status)


def mark_compared(meta: dict, record: dict) -> None:
    """Tag the MLflow run whose final metrics count in the comparison (``cliptd.report``)."""
    from cliptd.tracking import runs as tracking

    if not (meta.get("tracking_uri") and record.get("trial_id")):
        return

    def tag() -> None:
        c = tracking.client(meta["tracking_uri"])
        for run in c.search_runs([meta["experiment_id"]], filter_string=(
                f"tags.`cliptd.trial_id` = '{record['trial_id']}'")):
            c.set_tag(run.info.run_id, "cliptd.compare", "true")

    tracking.patiently(tag, f"tagging trial {record['trial_id']} as compared")


# the sweep's parent-run tags keeping each search's choice: BEST_TAG.<condition>.<method>
BEST_TAG = "cliptd.best_trial"


def best_tag(meta: dict) -> str:
    """The sweep's parent-run tag that keeps which trial a search chose as its best."""
    return f"{BEST_TAG}.{meta['condition']}.{meta['method']}"


def kept_best(meta: dict) -> str | None:
    """The trial a search of this sweep already chose as its best (a sweep resumed or given
    another method restores its finished searches): the parent run's ``best_tag``, else,
    for a sweep that predates that tag, the search trial it tagged compared. None when the
    search never chose, or the sweep has no tracking."""
    from cliptd.tracking import runs as tracking

    if not (meta.get("tracking_uri") and meta.get("parent_run_id")):
        return None

    def read() -> str | None:
        c = tracking.client(meta["tracking_uri"])
        chosen = c.get_run(meta["parent_run_id"]).data.tags.get(best_tag(meta))
        if chosen:
            return chosen
        compared = c.search_runs([meta["experiment_id"]], filter_string=(
            f"tags.sweep = '{meta['sweep_id']}' AND tags.phase = 'search' AND "
            f"tags.condition = '{meta['condition']}' AND tags.method = '{meta['method']}' "
            "AND tags.`cliptd.compare` = 'true'"))
        ids = sorted(r.data.tags["cliptd.trial_id"] for r in compared)
        return ids[0] if ids else None

    return tracking.patiently(read, "reading which trial the search chose")


def keep_best(meta: dict, trial_id: str) -> None:
    """Record the search's choice on the sweep's parent run (``kept_best`` reads it)."""
    from cliptd.tracking import runs as tracking

    if not (meta.get("tracking_uri") and meta.get("parent_run_id")):
        return
    tracking.patiently(lambda: tracking.client(meta["tracking_uri"]).set_tag(
        meta["parent_run_id"], best_tag(meta), trial_id), "recording the search's best")
