"""Low-shot subsets (nested, seeded, stored) and domain-shift presets of a prepared dataset."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cliptd.core.atomic import atomic_file
from cliptd.core.errors import DataError
from cliptd.data.metrics import vqa_normalize
from cliptd.data.prepare import load_manifest, read_split

FRACTIONS = (0.01, 0.05, 0.10, 0.25, 1.0)


KSHOTS = (1, 2, 4, 8, 16)


_ORDER_RULE = "ids sorted, then shuffled by numpy.random.default_rng(seed).permutation"


def _class_of(task: str, table: pa.Table) -> list[Any]:
    """Per row, the class that k-shot counts (None = unlabelled, never sampled)."""
    if task == "vqa":
        return [vqa_normalize(json.loads(m)["multiple_choice_answer"]) for m in table["meta"].to_pylist()]
    return [None if v < 0 else v for v in table["label"].to_pylist()]


_CLASS_RULE = {
    "vcr": "class = answer_label",
    "snli_ve": "class = label (entailment/neutral/contradiction)",
    "vqa": "class = normalized multiple_choice_answer",
}


def subset_ids(
    data: str | Path,
    split: str,
    *,
    fraction: float | None = None,
    kshot: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Ids of a seeded low-shot subset of ``split``, computed once and stored.

    ``fraction``: the first ``ceil(fraction * n)`` ids of one seeded permutation, so that
    subsets of one seed are nested (1% in 5% in 10% ...). ``kshot``: the first ``k`` ids
    of each class in the order of the same permutation, nested in ``k`` too.
    """
    if (fraction is None) == (kshot is None):
        raise DataError("give exactly one of fraction or kshot")
    if fraction is not None and not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    if kshot is not None and kshot < 1:
        raise DataError(f"kshot must be >= 1, got {kshot}")
    data = Path(data)
    manifest = load_manifest(data)
    name = f"frac{fraction:g}" if fraction is not None else f"k{kshot}"
    request = f"{split}-{name}-seed{seed}"
    path = data / "subsets" / f"{request}.parquet"
    if path.is_file():
        stored = pq.read_table(path)
        meta = stored.schema.metadata or {}
        if meta.get(b"version", b"").decode() == manifest["version"]:
            return stored["id"].to_pylist()

    table = read_split(data, split, columns=["id", "label", "meta"])
    ids = table["id"].to_pylist()
    if len(set(ids)) != len(ids):
        raise DataError(f"duplicate ids in split {split!r}; subsets need unique ids", file=data)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    perm = [order[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if fraction is not None:
        picked = perm[: math.ceil(fraction * len(ids))]
        rule = f"first ceil({fraction:g} * n) of: {_ORDER_RULE}"
    else:
        classes = _class_of(manifest["task"], table)
        taken: Counter = Counter()
        picked = []
        for i in perm:
            c = classes[i]
            if c is not None and taken[c] < kshot:
                taken[c] += 1
                picked.append(i)
        rule = f"first {kshot} per class ({_CLASS_RULE[manifest['task']]}) in the order of: {_ORDER_RULE}"
    if not picked:
        raise DataError(f"subset {request} is empty (split {split!r} has {len(ids)} rows, none eligible)", file=data)

    result = [ids[i] for i in picked]
    schema = pa.schema([pa.field("id", pa.string(), nullable=False)]).with_metadata(
        {"seed": str(seed), "rule": rule, "version": manifest["version"], "split": split, "request": request}
    )
    path.parent.mkdir(exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(pa.table({"id": result}, schema=schema), tmp)
    return result


Mask = Callable[[pa.Table], np.ndarray]


def _all(table: pa.Table) -> np.ndarray:
    return np.ones(table.num_rows, dtype=bool)


def _column_in(column: str, values: Sequence[str]) -> Mask:
    def mask(table: pa.Table) -> np.ndarray:
        return pc.is_in(table[column], value_set=pa.array(values)).to_numpy(zero_copy_only=False)

    return mask


@dataclass(frozen=True)
class DomainPreset:
    """A train/eval domain split. ``train_mask`` / ``eval_mask`` select rows of the train
    and eval tables (they need the columns the rule reads: ``qtype`` or ``domain``)."""

    name: str
    rule: str
    train_mask: Mask
    eval_mask: Mask
    tasks: tuple[str, ...] = ("vcr", "snli_ve", "vqa")
    variant: str | None = None  # the dataset must be prepared with this --variant
    eval_split: str | None = None  # None: the task's usual eval split

    def check(self, manifest: Mapping[str, Any]) -> None:
        """DataError unless the prepared dataset fits this preset."""
        if manifest["task"] not in self.tasks:
            raise DataError(f"domain preset {self.name!r} applies to {', '.join(self.tasks)}, not {manifest['task']}")
        if self.variant is not None and manifest["source"].get("variant") != self.variant:
            raise DataError(f"domain preset {self.name!r} needs a dataset prepared with --variant {self.variant}")


class _Presets(dict):
    def __missing__(self, name: str) -> DomainPreset:
        raise DataError(f"unknown domain preset {name!r}; known: {', '.join(self)}")


VCR_TRAIN_QTYPES = ("explanation", "activity", "temporal", "mental")


VCR_EVAL_QTYPES = ("role", "scene", "hypothetical")


DOMAIN_PRESETS: dict[str, DomainPreset] = _Presets(
    {
        "none": DomainPreset("none", "in-domain: all train rows, all eval rows", _all, _all),
        "vcr-qtype": DomainPreset(
            "vcr-qtype",
            f"VCR by question type: train on qtype in {VCR_TRAIN_QTYPES}, evaluate on qtype in {VCR_EVAL_QTYPES}",
            _column_in("qtype", VCR_TRAIN_QTYPES),
            _column_in("qtype", VCR_EVAL_QTYPES),
            tasks=("vcr",),
        ),
        "synthetic": DomainPreset(
            "synthetic",
            'train on domain == "source", evaluate on domain == "target" (the --domains mapping)',
            _column_in("domain", ("source",)),
            _column_in("domain", ("target",)),
        ),
        "vqa-cp": DomainPreset(
            "vqa-cp",
            "VQA-CP v2: all rows of its train split, evaluate on all rows of its test split "
            "(answer distributions per question type differ between the two)",
            _all,
            _all,
            tasks=("vqa",),
            variant="vqacp",
            eval_split="test",
        ),
    }
)


def domain_preset(name: str) -> DomainPreset:
    return DOMAIN_PRESETS[name]
