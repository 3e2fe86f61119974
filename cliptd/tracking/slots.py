"""Where a sweep's trial slots spent their time, from the trials' own reports in MLflow
(issue 20: a trial should cost its training). ``cliptd.report`` writes it as
``sweep_time.md``; it needs nothing but an MLflow client and the trials' runs."""

from __future__ import annotations

# what each trial reports of its own time, per epoch (cliptd.training.loop)
TIME_KEYS = {"train": "train/seconds", "eval": "time/eval_s", "setup": "time/setup_s"}


# a stretch this long with no trial running is a stopped sweep (a driver killed or stopped,
# then resumed with --resume), not the search's overhead: it is left out of the wall time
STOPPED_S = 300.0


def trial_spans(start: float, reports: dict[float, float], setups: list[float]
                ) -> list[tuple[float, float]]:
    """A trial's running spans: from its run's start to its last report, cut where it was
    restarted from a checkpoint (a report that carries ``time/setup_s``, ``setups``, after
    its first). ``reports``: report time → the seconds it accounts for (set-up, training,
    evaluation), so a restarted span begins that long before its report. A trial whose first
    report comes ``STOPPED_S`` or more after its start could account for was stopped before
    it reported (Tune had started it, the sweep stopped): its first span begins then too."""
    spans, begin, last = [], start, None
    for at in sorted(reports):
        if at in setups:
            resumed = at - reports[at]
            if last is None:
                begin = resumed if resumed - start >= STOPPED_S else start
            else:
                spans.append((begin, last))
                begin = max(last, resumed)
        last = at
    return spans + [(begin, start if last is None else last)]


def stopped_time(spans: list[tuple[float, float]]) -> float:
    """Seconds of the gaps of ``STOPPED_S`` or more in which no span ran."""
    stopped, end = 0.0, None
    for s, e in sorted(spans):
        if end is not None and s - end >= STOPPED_S:
            stopped += s - end
        end = e if end is None else max(end, e)
    return stopped


def sweep_time(c, runs: list[dict]) -> dict:
    """Where a sweep's trial slots spent their time (issue 20: a trial should cost its
    training), from MLflow alone. A trial runs from its run's start (opened when Tune
    starts it) to its last reported epoch, in several spans when it was restarted from a
    checkpoint (``trial_spans``); the slots are the most spans seen at once; the wall time
    runs from the first start to the last report, less any stretch of ``STOPPED_S`` or more
    with no trial running (a stopped sweep, resumed later: ``stopped_s``); the slots' time
    is slots × wall. Training steps, evaluation and set-up are what the trials reported; the
    rest of the slots' time went to starting processes, Ray, the search itself, or a slot
    standing idle. ``runs``: dicts with the run's ``run_id`` and ``start_ms``
    (``cliptd.report.run_record``)."""
    import numpy as np

    spans, firsts, parts, trials = [], [], dict.fromkeys(TIME_KEYS, 0.0), 0
    for r in runs:
        if r.get("start_ms") is None:
            continue
        trials += 1
        start = r["start_ms"] / 1000
        reports: dict[float, float] = {}
        setups = []
        for part, key in TIME_KEYS.items():
            history = c.get_metric_history(r["run_id"], key)
            parts[part] += sum(m.value for m in history)
            for m in history:
                reports[m.timestamp / 1000] = reports.get(m.timestamp / 1000, 0.0) + m.value
            if part == "setup":
                setups = [m.timestamp / 1000 for m in history]
            if part == "train" and history:  # its first result: the first epoch's report
                firsts.append(min(m.timestamp for m in history) / 1000 - start)
        spans += trial_spans(start, reports, setups)
    if not spans:
        return {}
    # the most spans running at once: +1 at a start, −1 at an end (ends first on a tie)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    slots = running = 0
    for _, step in events:
        running += step
        slots = max(slots, running)
    stopped = stopped_time(spans)
    wall = max(e for _, e in spans) - min(s for s, _ in spans) - stopped
    slot_s = slots * wall
    share = {f"{k}_share": v / slot_s if slot_s > 0 else float("nan") for k, v in parts.items()}
    trial_s = sum(e - s for s, e in spans)
    return {"trials": trials, "slots": slots, "wall_s": wall,
            "stopped_s": stopped, "slot_s": slot_s,
            **{f"{k}_s": v for k, v in parts.items()}, **share,
            "other_s": slot_s - sum(parts.values()),
            # the trials' own time (their spans, all trials), and its training share:
            # what a trial costs beyond its training, idle slots apart
            "trial_s": trial_s, "busy_share": trial_s / slot_s if slot_s > 0 else float("nan"),
            "train_in_trials": parts["train"] / trial_s if trial_s > 0 else float("nan"),
            # a trial's start → its first result (what ASHA waits for), median over trials
            "first_result_s": float(np.median(firsts)) if firsts else float("nan")}


def sweep_time_markdown(t: dict) -> str:
    if not t:
        return "(no trial reported its time)\n"
    stopped = (f" (leaving out {t['stopped_s'] / 60:.1f} min with no trial running: the "
               f"sweep stopped, then resumed)" if t.get("stopped_s") else "")
    return (f"{t['trials']} trials on {t['slots']} slot(s) over {t['wall_s'] / 60:.1f} min"
            f"{stopped}: of "
            f"the slots' {t['slot_s'] / 60:.1f} min, training steps {t['train_share']:.0%}, "
            f"evaluation {t['eval_share']:.0%}, set-up {t['setup_share']:.0%}, the rest "
            f"(process starts, Ray, the search, idle slots) "
            f"{1 - t['train_share'] - t['eval_share'] - t['setup_share']:.0%}. The trials "
            f"kept the slots busy {t['busy_share']:.0%} of the time; inside them, training "
            f"steps took {t['train_in_trials']:.0%}; a trial's start → first result "
            f"{t['first_result_s']:.0f} s (median)\n")
