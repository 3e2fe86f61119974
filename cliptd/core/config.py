"""A run's configuration: the defaults, the distillation knobs and their validation.

Light on purpose (no torch, no model code): the sweep driver, every Tune trial driver and
Ray Train's controller import it to resolve and record a config, and each of those is a
separate process on a 2-core machine, where importing torch and transformers costs seconds.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields, replace

# clip_features: no distillation; CLIP's frozen image tower supplies the student's region
# features (the CLIP-ViL way of using CLIP, cliptd.clip_regions), so CLIP runs at inference.
METHODS = ("none", "naive", "cliptd", "clip_features")
CHOICES = {
    "method": METHODS,
    "select_by": ("relevance", "random", "all"),
    "weighting": ("confidence", "threshold", "uniform"),
    "weight_norm": ("none", "batch_mean"),
    "schedule": ("constant", "linear", "cosine", "warmup"),
    "distance": ("cosine", "l2", "l1", "smooth_l1"),
    "text_target": ("pooled", "tokens"),
    "modalities": ("both", "visual", "text"),
    # what the visual term distils into: the encoder's final-layer region states (per
    # candidate row), the region features every row of an image shares (the region
    # encoder's output, before any cross-modal layer), or both
    "visual_layer": ("final", "features", "both"),
    # how the selected regions of one instance weigh in its visual term: the same, or by
    # the teacher's zero-shot confidence in the gold answer from that region's crop alone
    "region_weighting": ("uniform", "confidence"),
}


@dataclass(frozen=True)
class DistillConfig:
    """The distillation knobs. The defaults of the knobs the search spaces search are the
    platform's own sweeps' result, not a guess: per knob, what the best ``cliptd`` configs
    of the swept cells (``bench/results/v2-*-sweep/``) agree on, by the rule in
    ``cliptd.sweep.defaults`` (``python -m cliptd.report defaults`` shows the derivation;
    ``tests/sweep/test_defaults.py`` keeps the two equal)."""

    method: str = "cliptd"
    select_by: str = "relevance"
    select_ratio_v: float = 0.65  # ρ for region tokens
    select_ratio_t: float = 0.73  # ρ for text tokens
    # The sweeps split 3 confidence / 3 uniform / 2 threshold; a tie goes to the value
    # CHOICES lists first (cliptd.sweep.defaults).
    weighting: str = "confidence"
    # Confidence weights average well below 1 with a mediocre teacher, which silently
    # shrinks λ; "batch_mean" rescales them to mean 1 so λ keeps its meaning. Five of the
    # eight sweeps' best configs left them as they are.
    weight_norm: str = "none"
    lam: float = 0.26
    schedule: str = "cosine"
    warmup_frac: float = 0.1  # for schedule=warmup: share of steps ramping λ up
    distance: str = "cosine"
    text_target: str = "tokens"
    modalities: str = "both"
    visual_layer: str = "features"
    region_weighting: str = "uniform"

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"distill.{name}={getattr(self, name)!r}; choose from {allowed}")
        for name in ("select_ratio_v", "select_ratio_t"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"distill.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.lam < 0 or not 0 <= self.warmup_frac < 1:
            raise ValueError("distill.lam must be >= 0 and distill.warmup_frac in [0, 1)")

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown distill knobs {sorted(unknown)}; known: {sorted(allowed)}")
        return cls(**data).resolved()

    def resolved(self) -> DistillConfig:
        """Apply the method presets: ``none`` has no teacher term, ``naive`` distils every
        token with uniform weight and constant λ, ``cliptd`` uses the knobs as given;
        ``clip_features`` is fine-tuned with the task loss only, like ``none``."""
        if self.method == "naive":
            return replace(self, select_by="all", weighting="uniform", schedule="constant",
                           weight_norm="none")
        if self.method in ("none", "clip_features"):
            return replace(self, lam=0.0)
        return self

    def as_dict(self) -> dict:
        return asdict(self)


TASKS = ("vcr", "snli_ve", "vqa")  # the one list of tasks every layer refers to
PRIMARY_METRIC = {"vcr": "q_a", "snli_ve": "acc", "vqa": "vqa_acc"}
HEAD = {"vcr": ("multiple_choice", 1), "snli_ve": ("classify", 3), "vqa": ("vqa", None)}

DEFAULT_CONFIG = {
    "task": "vcr",
    "data": None,  # prepared dataset folder
    "eval_split": None,  # default: the task's usual eval split
    "shots": 1.0,  # fraction of the train split, or "k<N>" for N per class
    "subset_seed": 0,
    "preset": "none",  # domain-shift preset (cliptd.data.subsets.DOMAIN_PRESETS)
    # a cliptd student export, a downloaded VisualBERT / LXMERT folder, or a shipped config
    "student": "visualbert-tiny",
    "tokenizer": None,  # tokenizer folder of a downloaded checkpoint that ships none
    "student_config": None,  # region backbone / image size for a downloaded checkpoint
    "teacher_cache": None,  # teacher-cache folder (None: no distillation possible)
    "distill": DistillConfig().as_dict(),
    "lr": 3e-4,
    "weight_decay": 0.01,
    "warmup_frac": 0.1,
    "batch_size": 32,
    "grad_accum": 1,
    "epochs": 4,
    "min_steps": 0,  # low-shot runs: at least this many optimizer steps in all
    # stop after this many epochs without a better (sampled) validation score (0: never);
    # `epochs` is then the most a run trains
    "patience": 0,
    # the first epochs patience does not count (e.g. ASHA's grace period): a run still on its
    # chance plateau then is not stopped for it; the best score is still tracked from epoch 1
    "patience_after": 0,
    "max_length": 64,
    "vqa_vocab": 100,
    "eval_batch_size": 128,
    "eval_limit": 0,  # epochs before the last evaluate on a fixed sample of this many (0: all)
    # name → words: also score the eval instances whose question or gold answer says one of
    # them (val/<group>/words/<name>/<metric>), e.g. the concepts a student never saw
    "eval_words": {},
    "seed": 0,
    "threads": 0,  # torch intra-op threads per worker (0: torch's default)
    # DataLoader worker processes decoding and resizing images beside each Train worker
    # (-1: on GPU, one per CPU the worker holds beyond the one its training process uses;
    # on CPU none)
    "loader_workers": -1,
    "tracking": None,  # {"uri":..., "run_id":...}: rank 0 logs per-epoch metrics to MLflow
    "fault": None,  # {"exit_at_step": n, "marker": path}: fault injection for tests
}


def is_count(value) -> bool:
    """An integer >= 0 (a bool is not one, though Python says it is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def resolve_config(overrides: dict) -> dict:
    """Defaults + overrides, validated; the result is what gets recorded everywhere."""
    unknown = set(overrides) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    for k, v in overrides.items():
        if k == "distill" and v is not None:
            cfg["distill"] = {**cfg["distill"], **v}
        else:
            cfg[k] = v
    if cfg["task"] not in PRIMARY_METRIC:
        raise ValueError(f"unknown task {cfg['task']!r}; known: {sorted(PRIMARY_METRIC)}")
    cfg["distill"] = DistillConfig.from_dict(cfg["distill"]).as_dict()
    parse_shots(cfg["shots"])
    words = cfg["eval_words"]
    if not (isinstance(words, dict) and all(
            isinstance(k, str) and k and "/" not in k and isinstance(v, list) and v
            and all(isinstance(w, str) for w in v) for k, v in words.items())):
        raise ValueError("eval_words must map names (no '/') to non-empty lists of words, "
                         f"got {words!r}")
    for key in ("patience", "patience_after"):
        if not is_count(cfg[key]):
            raise ValueError(f"{key} must be an integer >= 0, got {cfg[key]!r}")
    for key in ("lr", "batch_size", "epochs", "grad_accum"):
        if not (isinstance(cfg[key], (int, float)) and cfg[key] > 0):
            raise ValueError(f"{key} must be > 0, got {cfg[key]!r}")
    return cfg


def parse_shots(shots) -> dict:
    if isinstance(shots, str) and shots.startswith("k") and shots[1:].isdigit():
        return {"kshot": int(shots[1:])}
    try:
        frac = float(shots)
    except (TypeError, ValueError):
        raise ValueError(f"shots must be a fraction in (0, 1] or 'k<N>', got {shots!r}") from None
    if not 0 < frac <= 1:
        raise ValueError(f"shots must be a fraction in (0, 1] or 'k<N>', got {shots!r}")
    return {"fraction": frac}
