"""``cliptd``'s default distillation knobs, derived from the sweeps' best configs.

The defaults in ``cliptd.core.config.DistillConfig`` are not a guess: they are what the
platform's own sweeps chose (issue 19). Each swept cell (task × data condition) has a best
``cliptd`` config (``runs/<sweep>/best/<task>-<condition>-cliptd.yaml``, written by
``cliptd.tune``); for every distillation knob the shipped search spaces search, the default
is the value those best configs agree on:

- a choice knob: the value most of them chose; a tie goes to the value listed first in
  ``cliptd.core.config.CHOICES`` (the simpler, paper-like setting);
- a number: the lower median (a value one of the searches really chose), rounded to two
  significant digits (finer than any of these searches can resolve).

``python -m cliptd.report defaults FILE_OR_FOLDER...`` prints the derivation per knob and
cell; ``tests/sweep/test_defaults.py`` checks that the shipped defaults are the derivation
from the best configs kept under ``bench/results/``.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

import yaml

from cliptd.core.config import CHOICES, DistillConfig
from cliptd.sweep.space import load_space, shipped_spaces


def searched_knobs() -> list[str]:
    """The distillation knobs (without the ``distill.`` prefix) any shipped space searches,
    in ``DistillConfig``'s field order."""
    names = {k.removeprefix("distill.") for task in shipped_spaces()
             for k in load_space(task).search if k.startswith("distill.")}
    return [k for k in DistillConfig().as_dict() if k in names]


def best_configs(paths: list[Path]) -> dict[str, dict]:
    """Each ``cliptd`` best config under ``paths`` (a YAML file, or a folder holding
    ``*-cliptd.yaml`` files) → {its file name: the config}."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*-cliptd.yaml"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        raise ValueError(f"no cliptd best config (*-cliptd.yaml) in {', '.join(map(str, paths))}")
    out = {}
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        method = (cfg or {}).get("distill", {}).get("method") if isinstance(cfg, dict) else None
        if method != "cliptd":
            raise ValueError(f"{f}: not a cliptd best config (distill.method is {method!r})")
        out[f.name] = cfg
    return out


def _significant(x: float, digits: int = 2) -> float:
    if x == 0:
        return 0.0
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def derive(configs: list[dict], knobs: list[str] | None = None) -> dict:
    """knob → the default the configs' ``distill`` knobs give (the rules above)."""
    if not configs:
        raise ValueError("no best configs to derive the defaults from")
    out = {}
    for knob in knobs or searched_knobs():
        values = [c["distill"][knob] for c in configs]
        if knob in CHOICES:
            counts = Counter(values)
            top = max(counts.values())
            out[knob] = next(v for v in CHOICES[knob] if counts.get(v) == top)
        else:
            out[knob] = _significant(statistics.median_low(float(v) for v in values))
    return out


def derivation_rows(named: dict[str, dict]) -> list[dict]:
    """One row per knob: each cell's value, the derived default and the shipped one."""
    derived = derive(list(named.values()))
    shipped = DistillConfig().as_dict()
    rows = []
    for knob, value in derived.items():
        cells = {name: c["distill"][knob] for name, c in named.items()}
        rows.append({"knob": knob, **{n: _show(v) for n, v in cells.items()},
                     "derived": _show(value), "shipped": _show(shipped[knob]),
                     "same": value == shipped[knob]})
    return rows


def _show(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
