"""Search spaces: the shipped ``cliptd/sweep/spaces/<task>.yaml`` or any file, validated first.

A space file holds the fixed grid (data conditions × methods), the searchable knobs with
their distributions, fixed config values, the metric and named budgets. ``load_space``
rejects an unknown knob, an impossible range or a malformed entry with a message naming the
file and the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml

from cliptd.core.config import CHOICES, DEFAULT_CONFIG, DistillConfig, is_count, parse_shots

# The shipped spaces live in the package (cliptd/sweep/spaces/), read through
# importlib.resources: the same under an installed wheel as in a checkout.
SPACES_DIR = resources.files("cliptd") / "sweep" / "spaces"
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint")
# Knobs each method actually uses: `none` and `clip_features` have no teacher term, `naive`
# fixes selection, weighting and schedule (SPEC section 2), so searching them would only
# waste trials.
NAIVE_KNOBS = {"distill.lam", "distill.distance", "distill.text_target", "distill.modalities"}
BUDGET_KEYS = {"num_samples", "epochs", "seeds", "grace_period", "reduction_factor",
               "min_steps", "max_concurrent", "eval_limit", "patience", "patience_after",
               "methods"}
TOP_KEYS = {"task", "metric", "conditions", "methods", "fixed", "search", "budgets"}


class SpaceError(ValueError):
    pass


@dataclass
class Budget:
    num_samples: int = 4
    epochs: int = 3
    seeds: int = 3
    grace_period: int = 1
    reduction_factor: int = 2
    min_steps: int = 0
    max_concurrent: int = 0  # 0: sized from the cluster's resources
    eval_limit: int = 0  # epochs before the last evaluate on a fixed sample (0: all)
    # stop a run after this many epochs without a better (sampled) score (0: never); ASHA
    # still compares trials at its rungs, and a seed re-run stops as its search's trials did
    patience: int = 0
    # epochs patience does not count (set it to grace_period: ASHA alone judges the first ones)
    patience_after: int = 0
    # the methods this budget compares (a subset of the space's; None: all of them)
    methods: list[str] | None = None


@dataclass
class Space:
    path: Path | Traversable  # a shipped space (cliptd/sweep/spaces/) or a file
    task: str
    metric: str
    shots: list
    presets: list[str]
    methods: list[str]
    fixed: dict
    search: dict[str, dict]
    budgets: dict[str, Budget] = field(default_factory=dict)

    def conditions(self) -> list[tuple]:
        return [(s, p) for p in self.presets for s in self.shots]

    def knobs_for(self, method: str) -> dict[str, dict]:
        if method in ("none", "clip_features"):  # task loss only: no distill knob matters
            return {k: v for k, v in self.search.items() if not k.startswith("distill.")}
        if method == "naive":
            return {k: v for k, v in self.search.items()
                    if not k.startswith("distill.") or k in NAIVE_KNOBS}
        return dict(self.search)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def _numbers(value):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; users mean a number."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    return value


def _fail(path, field_name, msg):
    raise SpaceError(f"{path}: {field_name}: {msg}")


def _check_knob(path, name: str, spec) -> None:
    where = f"search.{name}"
    if name.startswith("distill."):
        knob = name.split(".", 1)[1]
        if knob not in DistillConfig.__dataclass_fields__ or knob == "method":
            _fail(path, where, f"unknown knob; distill knobs: "
                  f"{sorted(set(DistillConfig.__dataclass_fields__) - {'method'})}")
    elif name not in DEFAULT_CONFIG or name in ("task", "data", "distill", "tracking", "fault",
                                                "teacher_cache", "student"):
        _fail(path, where, "unknown knob; searchable: lr, weight_decay, warmup_frac, "
              "batch_size, grad_accum, epochs, max_length, distill.*")
    if not isinstance(spec, dict) or len(spec) != 1:
        _fail(path, where, f"expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        _fail(path, where, f"unknown distribution {kind!r}; use one of {DISTRIBUTIONS}")
    categorical = CHOICES.get(name.split(".", 1)[-1]) if name.startswith("distill.") else None
    if kind == "choice":
        if not isinstance(args, list) or not args:
            _fail(path, where, "choice needs a non-empty list")
        for v in args:
            if categorical and v not in categorical:
                _fail(path, where, f"{v!r} is not one of {categorical}")
            if not categorical:
                _check_value_range(path, where, name, v, v)
        return
    if categorical:
        _fail(path, where, f"a categorical knob takes {{choice: [...]}} from {categorical}, "
              f"not {kind}")
    if not (isinstance(args, list) and len(args) == 2 and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        _fail(path, where, f"{kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high:
        _fail(path, where, f"impossible range: low {low} >= high {high}")
    if kind == "loguniform" and low <= 0:
        _fail(path, where, f"loguniform needs low > 0, got {low}")
    _check_value_range(path, where, name, low, high)


def _check_value_range(path, where: str, name: str, low, high) -> None:
    """Bounds a knob's values must respect, whatever distribution draws them."""
    if name in ("distill.select_ratio_v", "distill.select_ratio_t") and (low <= 0 or high > 1):
        _fail(path, where, f"a selection ratio lies in (0, 1], got [{low}, {high}]")
    if name in ("lr", "distill.lam", "weight_decay") and low < 0:
        _fail(path, where, f"must be >= 0, got {low}")
    if name in ("batch_size", "grad_accum", "epochs", "max_length") and (
            not isinstance(low, int) or low < 1):
        _fail(path, where, f"must be an integer >= 1, got {low}")
    if name in ("warmup_frac", "distill.warmup_frac") and not (0 <= low and high < 1):
        _fail(path, where, f"must lie in [0, 1), got [{low}, {high}]")


def shipped_spaces() -> dict[str, Traversable]:
    """The search spaces shipped in the package, by name (``vcr`` for ``spaces/vcr.yaml``)."""
    return {p.name.removesuffix(".yaml"): p for p in SPACES_DIR.iterdir()
            if p.name.endswith(".yaml")}


def load_space(task_or_path: str | Path) -> Space:
    """A shipped space by name (``vcr``), or a space file by path."""
    path = Path(task_or_path)
    if not path.suffix:
        path = SPACES_DIR / f"{task_or_path}.yaml"
    if not path.is_file():
        raise SpaceError(f"no search space {path} (shipped: {sorted(shipped_spaces())})")
    try:
        raw = _numbers(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        _fail(path, sorted(unknown)[0], f"unknown key; allowed: {sorted(TOP_KEYS)}")
    for key in ("task", "conditions", "methods", "search"):
        if key not in raw:
            _fail(path, key, "required field is missing")
    task = raw["task"]
    if task not in ("vcr", "snli_ve", "vqa"):
        _fail(path, "task", f"unknown task {task!r}")
    cond = raw["conditions"]
    if not isinstance(cond, dict) or not cond.get("shots"):
        _fail(path, "conditions.shots", "a non-empty list of shot levels is required")
    for s in cond["shots"]:
        try:
            parse_shots(s)
        except ValueError as exc:
            _fail(path, "conditions.shots", str(exc))
    presets = cond.get("presets", ["none"])
    from cliptd.data.subsets import DOMAIN_PRESETS

    for p in presets:
        if p not in DOMAIN_PRESETS:
            _fail(path, "conditions.presets", f"unknown preset {p!r}; known: "
                  f"{sorted(DOMAIN_PRESETS)}")
    methods = raw["methods"]
    if not isinstance(methods, list) or not methods:
        _fail(path, "methods", "a non-empty list is required")
    for m in methods:
        if m not in CHOICES["method"]:
            _fail(path, "methods", f"unknown method {m!r}; known: {CHOICES['method']}")
    search = raw["search"] or {}
    if not isinstance(search, dict):
        _fail(path, "search", "expected a mapping knob → distribution")
    for name, spec in search.items():
        _check_knob(path, name, spec)
    fixed = raw.get("fixed") or {}
    try:
        from cliptd.core.config import resolve_config

        resolve_config({k: v for k, v in fixed.items()} | {"task": task})
    except ValueError as exc:
        _fail(path, "fixed", str(exc))
    budgets = {}
    for bname, b in (raw.get("budgets") or {}).items():
        if not isinstance(b, dict) or set(b) - BUDGET_KEYS:
            _fail(path, f"budgets.{bname}", f"allowed keys: {sorted(BUDGET_KEYS)}")
        budgets[bname] = Budget(**b)
        if budgets[bname].num_samples < 1 or budgets[bname].epochs < 1 or \
                budgets[bname].seeds < 1:
            _fail(path, f"budgets.{bname}", "num_samples, epochs and seeds must be >= 1")
        for key in ("patience", "patience_after"):
            value = getattr(budgets[bname], key)
            if not is_count(value):
                _fail(path, f"budgets.{bname}.{key}", f"an integer >= 0, got {value!r}")
        chosen = budgets[bname].methods
        if chosen is not None and (not isinstance(chosen, list) or not chosen or
                                   set(chosen) - set(methods)):
            _fail(path, f"budgets.{bname}.methods",
                  f"a non-empty list drawn from the space's methods {methods}, got {chosen!r}")
    for required in ("default", "small"):
        budgets.setdefault(required, Budget())
    metric = raw.get("metric", "score")
    return Space(path=path, task=task, metric=metric, shots=list(cond["shots"]),
                 presets=list(presets), methods=list(methods), fixed=dict(fixed),
                 search=dict(search), budgets=budgets)


def to_tune(knobs: dict[str, dict]) -> dict:
    """Ray Tune distributions (OptunaSearch converts them), keyed by dotted knob name."""
    from ray import tune

    out = {}
    for name, spec in knobs.items():
        (kind, args), = spec.items()
        if kind == "uniform":
            out[name] = tune.uniform(*args)
        elif kind == "loguniform":
            out[name] = tune.loguniform(*args)
        elif kind == "randint":
            out[name] = tune.randint(int(args[0]), int(args[1]) + 1)
        else:
            out[name] = tune.choice(args)
    return out


def apply_sample(base: dict, sample: dict) -> dict:
    """Dotted knob names → the nested run config (distill.lam → cfg['distill']['lam'])."""
    cfg = {**base, "distill": dict(base.get("distill") or {})}
    for name, value in sample.items():
        if name.startswith("distill."):
            cfg["distill"][name.split(".", 1)[1]] = value
        else:
            cfg[name] = value.item() if hasattr(value, "item") else value
    return cfg


def describe(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)
