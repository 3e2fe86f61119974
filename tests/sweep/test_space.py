"""Search spaces: every shipped file validates; every kind of malformed entry is rejected
with a message naming the file and the field; samples map into the run config."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cliptd.core.config import DEFAULT_CONFIG, DistillConfig, resolve_config
from cliptd.sweep.space import (
    NAIVE_KNOBS,
    SPACES_DIR,
    Space,
    SpaceError,
    apply_sample,
    load_space,
    shipped_spaces,
)

SHIPPED = [shipped_spaces()[name] for name in sorted(shipped_spaces())]

GOOD = """\
task: vcr
metric: score
conditions:
  shots: [0.05, k4]
  presets: [synthetic]
methods: [none, naive, cliptd]
fixed:
  batch_size: 16
search:
  lr: {loguniform: [5.0e-5, 5.0e-4]}
  weight_decay: {uniform: [0.0, 0.1]}
  epochs: {randint: [1, 3]}
  distill.lam: {loguniform: [0.3, 3.0]}
  distill.select_ratio_v: {uniform: [0.3, 1.0]}
  distill.weighting: {choice: [confidence, threshold, uniform]}
  distill.distance: {choice: [cosine, l2]}
  distill.text_target: {choice: [pooled, tokens]}
budgets:
  small: {num_samples: 2, epochs: 2, seeds: 1}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def test_shipped_files_exist():
    assert SHIPPED, f"no *.yaml under {SPACES_DIR}"
    # one per task, inside the package (a wheel ships them: tests/e2e/test_package.py)
    assert sorted(shipped_spaces()) == ["snli_ve", "vcr", "vqa"]
    assert SPACES_DIR == Path(__file__).resolve().parents[2] / "cliptd" / "sweep" / "spaces"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_space_is_valid(path):
    space = load_space(path)
    assert isinstance(space, Space)
    assert space.task == path.name.removesuffix(".yaml")
    assert space.methods and space.shots and space.search
    assert {"default", "small"} <= set(space.budgets)
    # the fixed values resolve into a valid run config
    resolve_config({**space.fixed, "task": space.task})
    # the same file is found by task name
    assert load_space(space.task).search == space.search


def test_knobs_for_methods():
    space = load_space("vcr")
    all_knobs = space.knobs_for("cliptd")
    assert all_knobs == space.search
    none = space.knobs_for("none")
    assert none and not any(k.startswith("distill.") for k in none)
    assert set(none) == {k for k in space.search if not k.startswith("distill.")}
    assert space.knobs_for("clip_features") == none  # task loss only, like none
    naive = space.knobs_for("naive")
    naive_distill = {k for k in naive if k.startswith("distill.")}
    assert naive_distill <= NAIVE_KNOBS
    assert naive_distill == {k for k in space.search if k in NAIVE_KNOBS}
    assert naive_distill == {"distill.lam", "distill.distance", "distill.text_target",
                             "distill.modalities"}  # what vcr.yaml searches
    assert "distill.select_ratio_v" not in naive and "distill.weighting" not in naive


def test_good_space_loads(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    assert space.shots == [0.05, "k4"]
    assert space.conditions() == [(0.05, "synthetic"), ("k4", "synthetic")]
    assert space.budgets["small"].epochs == 2 and space.budgets["default"].num_samples == 4
    naive = space.knobs_for("naive")
    assert {k for k in naive if k.startswith("distill.")} == {
        "distill.lam", "distill.distance", "distill.text_target"}


BAD = [
    # (name, old, new, field in the message, words in the message)
    ("unknown-knob", "distill.select_ratio_v:", "distill.selct_ratio_v:",
     "search.distill.selct_ratio_v", "unknown knob"),
    ("unknown-top-knob", "weight_decay:", "weight_decy:", "search.weight_decy", "unknown knob"),
    ("method-as-knob", "distill.lam:", "distill.method:", "search.distill.method",
     "unknown knob"),
    ("impossible-range", "lr: {loguniform: [5.0e-5, 5.0e-4]}",
     "lr: {loguniform: [1.0e-3, 1.0e-4]}", "search.lr", "impossible range"),
    ("equal-range", "weight_decay: {uniform: [0.0, 0.1]}", "weight_decay: {uniform: [0.1, 0.1]}",
     "search.weight_decay", "impossible range"),
    ("loguniform-zero", "distill.lam: {loguniform: [0.3, 3.0]}",
     "distill.lam: {loguniform: [0.0, 3.0]}", "search.distill.lam", "low > 0"),
    ("loguniform-negative", "lr: {loguniform: [5.0e-5, 5.0e-4]}",
     "lr: {loguniform: [-1.0, 5.0e-4]}", "search.lr", "low > 0"),
    ("ratio-above-1", "distill.select_ratio_v: {uniform: [0.3, 1.0]}",
     "distill.select_ratio_v: {uniform: [0.5, 1.5]}", "search.distill.select_ratio_v",
     "selection ratio"),
    ("ratio-zero", "distill.select_ratio_v: {uniform: [0.3, 1.0]}",
     "distill.select_ratio_v: {uniform: [0.0, 0.5]}", "search.distill.select_ratio_v",
     "selection ratio"),
    ("unknown-distribution", "weight_decay: {uniform: [0.0, 0.1]}",
     "weight_decay: {normal: [0.0, 0.1]}", "search.weight_decay", "unknown distribution"),
    ("two-distributions", "weight_decay: {uniform: [0.0, 0.1]}",
     "weight_decay: {uniform: [0.0, 0.1], choice: [0.0]}", "search.weight_decay",
     "expected one of"),
    ("not-a-mapping", "weight_decay: {uniform: [0.0, 0.1]}", "weight_decay: 0.1",
     "search.weight_decay", "expected one of"),
    ("range-not-pair", "weight_decay: {uniform: [0.0, 0.1]}", "weight_decay: {uniform: [0.1]}",
     "search.weight_decay", "needs [low, high]"),
    ("range-strings", "weight_decay: {uniform: [0.0, 0.1]}",
     "weight_decay: {uniform: [a, b]}", "search.weight_decay", "needs [low, high]"),
    ("bad-choice-value", "distill.distance: {choice: [cosine, l2]}",
     "distill.distance: {choice: [cosine, kl]}", "search.distill.distance", "'kl'"),
    ("empty-choice", "distill.distance: {choice: [cosine, l2]}", "distill.distance: {choice: []}",
     "search.distill.distance", "non-empty"),
    ("unknown-method", "methods: [none, naive, cliptd]", "methods: [none, fancy]",
     "methods", "unknown method 'fancy'"),
    ("empty-methods", "methods: [none, naive, cliptd]", "methods: []", "methods", "non-empty"),
    ("unknown-preset", "presets: [synthetic]", "presets: [nowhere]", "conditions.presets",
     "unknown preset 'nowhere'"),
    ("bad-shots-fraction", "shots: [0.05, k4]", "shots: [0.05, 2.0]", "conditions.shots",
     "shots must be"),
    ("bad-shots-k", "shots: [0.05, k4]", "shots: [kx]", "conditions.shots", "shots must be"),
    ("bad-shots-zero", "shots: [0.05, k4]", "shots: [0]", "conditions.shots", "shots must be"),
    ("empty-shots", "shots: [0.05, k4]", "shots: []", "conditions.shots", "non-empty"),
    ("unknown-top-level", "metric: score", "metric: score\nmetrics: score", "metrics",
     "unknown key"),
    ("unknown-task", "task: vcr", "task: gqa", "task", "unknown task 'gqa'"),
    ("bad-fixed", "batch_size: 16", "batch_sise: 16", "fixed", "batch_sise"),
    ("bad-fixed-value", "batch_size: 16", "batch_size: 0", "fixed", "batch_size"),
    ("bad-budget-key", "small: {num_samples: 2, epochs: 2, seeds: 1}",
     "small: {num_samples: 2, epoch: 2}", "budgets.small", "allowed keys"),
    ("bad-budget-value", "small: {num_samples: 2, epochs: 2, seeds: 1}",
     "small: {num_samples: 0, epochs: 2, seeds: 1}", "budgets.small", ">= 1"),
    ("budget-method-not-in-space", "small: {num_samples: 2, epochs: 2, seeds: 1}",
     "small: {num_samples: 2, epochs: 2, seeds: 1, methods: [none, clip_features]}",
     "budgets.small.methods", "'clip_features'"),
    ("budget-methods-empty", "small: {num_samples: 2, epochs: 2, seeds: 1}",
     "small: {num_samples: 2, epochs: 2, seeds: 1, methods: []}", "budgets.small.methods",
     "non-empty"),
]


@pytest.mark.parametrize("name,old,new,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_space_rejected_naming_file_and_field(tmp_path, name, old, new, field, words):
    path = write(tmp_path, edit(GOOD, old, new), f"{name}.yaml")
    with pytest.raises(SpaceError) as err:
        load_space(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {field}: "), msg
    assert words in msg, msg


@pytest.mark.parametrize("missing", ["task", "conditions", "methods", "search"])
def test_missing_required_field(tmp_path, missing):
    lines = GOOD.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{missing}:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")),
               len(lines))
    path = write(tmp_path, "".join(lines[:start] + lines[end:]))
    with pytest.raises(SpaceError, match=rf"^{re.escape(str(path))}: {missing}: required"):
        load_space(path)


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "task: vcr\nsearch: {lr: [1, 2\n")
    with pytest.raises(SpaceError, match=rf"^{re.escape(str(path))}: not valid YAML"):
        load_space(path)


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "- task\n- vcr\n")
    with pytest.raises(SpaceError, match=re.escape(str(path))):
        load_space(path)


def test_unknown_space_name():
    with pytest.raises(SpaceError, match="no search space.*shipped.*vcr"):
        load_space("nonexistent_task")


def test_space_error_is_value_error():
    assert issubclass(SpaceError, ValueError)


def test_scientific_notation_without_dot_accepted(tmp_path):
    path = write(tmp_path, edit(GOOD, "lr: {loguniform: [5.0e-5, 5.0e-4]}",
                                "lr: {loguniform: [1e-4, 1e-3]}"))
    assert load_space(path).search["lr"] == {"loguniform": [1e-4, 1e-3]}


def test_choice_of_impossible_ratio_rejected(tmp_path):
    path = write(tmp_path, edit(GOOD, "distill.select_ratio_v: {uniform: [0.3, 1.0]}",
                                "distill.select_ratio_v: {choice: [0.5, 1.5]}"))
    with pytest.raises(SpaceError, match="search.distill.select_ratio_v"):
        load_space(path)


def test_numeric_distribution_on_categorical_knob_rejected(tmp_path):
    path = write(tmp_path, edit(GOOD, "distill.distance: {choice: [cosine, l2]}",
                                "distill.schedule: {uniform: [0.0, 1.0]}"))
    with pytest.raises(SpaceError, match="search.distill.schedule"):
        load_space(path)


# --------------------------------------------------------------------------------------
# apply_sample / resolve_config


def test_apply_sample_maps_dotted_names():
    base = resolve_config({"task": "vcr", "batch_size": 8})
    before = {**base, "distill": dict(base["distill"])}
    sample = {"lr": np.float64(3e-4), "epochs": np.int64(2), "distill.lam": 2.5,
              "distill.select_ratio_v": 0.4, "distill.weighting": "threshold"}
    cfg = apply_sample(base, sample)
    assert cfg["lr"] == 3e-4 and type(cfg["lr"]) is float
    assert cfg["epochs"] == 2 and type(cfg["epochs"]) is int
    assert cfg["distill"]["lam"] == 2.5
    assert cfg["distill"]["select_ratio_v"] == 0.4
    assert cfg["distill"]["weighting"] == "threshold"
    assert cfg["distill"]["distance"] == base["distill"]["distance"]  # untouched knobs kept
    assert cfg["batch_size"] == 8
    assert "distill.lam" not in cfg and "lam" not in cfg
    assert base == before  # the base config is not mutated
    # the result is a valid run config with the sampled values
    resolved = resolve_config(cfg)
    assert resolved["distill"]["lam"] == 2.5 and resolved["lr"] == 3e-4


def test_apply_sample_without_distill_in_base():
    cfg = apply_sample({"task": "vcr"}, {"distill.lam": 0.5})
    assert cfg["distill"] == {"lam": 0.5}


def test_resolve_config_defaults_and_presets():
    cfg = resolve_config({"task": "snli_ve", "distill": {"method": "naive", "select_by": "random"}})
    assert set(cfg) == set(DEFAULT_CONFIG)
    assert cfg["task"] == "snli_ve"
    assert cfg["distill"]["select_by"] == "all"  # the preset applied
    assert resolve_config({"distill": {"method": "none"}})["distill"]["lam"] == 0.0
    # defaults not mutated by resolving
    assert DEFAULT_CONFIG["distill"] == DistillConfig().as_dict()


@pytest.mark.parametrize("overrides,match", [
    ({"learning_rate": 1e-4}, "unknown config keys.*learning_rate"),
    ({"task": "gqa"}, "unknown task 'gqa'"),
    ({"shots": 1.5}, "shots must be"),
    ({"shots": 0}, "shots must be"),
    ({"shots": "k"}, "shots must be"),
    ({"shots": "five"}, "shots must be"),
    ({"lr": 0}, "lr must be > 0"),
    ({"batch_size": -2}, "batch_size must be > 0"),
    ({"distill": {"lamda": 1.0}}, "unknown distill knobs.*lamda"),
    ({"distill": {"select_ratio_v": 2.0}}, "distill.select_ratio_v"),
])
def test_resolve_config_rejects(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(overrides)


@pytest.mark.parametrize("shots", [1.0, 0.05, "0.5", "k4", "k16"])
def test_resolve_config_accepts_shots(shots):
    assert resolve_config({"shots": shots})["shots"] == shots


def test_default_vcr_space_compares_clip_features():
    """The CLIP-inside baseline runs in the default VCR sweep, next to none and cliptd."""
    assert {"none", "cliptd", "clip_features"} <= set(load_space("vcr").methods)


def test_budget_methods_subset(tmp_path):
    """A budget may compare a subset of the space's methods; the others compare all."""
    path = write(tmp_path, edit(GOOD, "small: {num_samples: 2, epochs: 2, seeds: 1}",
                                "small: {num_samples: 2, epochs: 2, seeds: 1, "
                                "methods: [none, cliptd]}"))
    space = load_space(path)
    assert space.budgets["small"].methods == ["none", "cliptd"]
    assert space.budgets["default"].methods is None
    vcr = load_space("vcr")
    assert "clip_features" not in vcr.budgets["default"].methods  # the 2-core first look
    assert vcr.budgets["small"].methods is None and vcr.budgets["full"].methods is None


def test_budget_patience_is_checked_and_reaches_the_runs(tmp_path):
    """A budget's patience stops its runs early; a negative one is refused, naming it."""
    path = write(tmp_path, edit(GOOD, "small: {num_samples: 2, epochs: 2, seeds: 1}",
                                "small: {num_samples: 2, epochs: 2, seeds: 1, patience: 3}"))
    assert load_space(path).budgets["small"].patience == 3
    assert load_space(write(tmp_path, GOOD, "plain.yaml")).budgets["small"].patience == 0
    bad = write(tmp_path, edit(GOOD, "small: {num_samples: 2, epochs: 2, seeds: 1}",
                               "small: {num_samples: 2, epochs: 2, seeds: 1, patience: -1}"),
                "bad.yaml")
    with pytest.raises(SpaceError, match=r"budgets\.small\.patience"):
        load_space(bad)
    assert load_space("vcr").budgets["full"].patience == 2  # issue 19's protocol


def test_budget_patience_after_is_read_and_checked(tmp_path):
    """patience_after (the first epochs patience does not count) is read and validated
    like patience."""
    path = write(tmp_path, edit(GOOD, "small: {num_samples: 2, epochs: 2, seeds: 1}",
                                "small: {num_samples: 2, epochs: 2, seeds: 1, patience: 2, "
                                "patience_after: 3}"))
    assert load_space(path).budgets["small"].patience_after == 3
    assert load_space(write(tmp_path, GOOD, "plain.yaml")).budgets["small"].patience_after == 0
    bad = write(tmp_path, edit(GOOD, "small: {num_samples: 2, epochs: 2, seeds: 1}",
                               "small: {num_samples: 2, epochs: 2, seeds: 1, "
                               "patience_after: -2}"), "bad.yaml")
    with pytest.raises(SpaceError, match=r"budgets\.small\.patience_after"):
        load_space(bad)
