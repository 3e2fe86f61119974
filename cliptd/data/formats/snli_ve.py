"""SNLI-VE (visual entailment) as it ships.

``<src>/snli_ve_{train,dev,test}.jsonl``, images under ``<src>/flickr30k_images/``. The
image key is spelled ``Flikr30kID`` in the data (value ``"<id>.jpg"``); the premise is the
image, ``sentence2`` the hypothesis, ``gold_label`` one of ``SNLI_VE_LABELS``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cliptd.core.errors import DataError
from cliptd.data.formats.common import (
    ReadOptions,
    RegionSource,
    dump_meta,
    image_size,
    make_row,
    read_jsonl,
    require,
    tokenize,
    whole_image,
)
from cliptd.data.schema import SNLI_VE_LABELS

SPLITS = ("train", "dev", "test")
IMAGE_DIR = "flickr30k_images"
IMAGE_KEY = "Flikr30kID"  # sic


def splits(src: Path, variant: str | None = None) -> list[str]:
    if variant is not None:
        raise DataError(f"SNLI-VE has no variant {variant!r}")
    return [s for s in SPLITS if _annotations(src, s).is_file()]


def _annotations(src: Path, split: str) -> Path:
    return src / f"snli_ve_{split}.jsonl"


def source_files(src: Path, split: str, variant: str | None = None) -> list[Path]:
    return [_annotations(src, split)]


def image_root(src: Path, variant: str | None = None) -> Path:
    return src / IMAGE_DIR


def read(src: Path, split: str, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    """Yield one schema row per line of ``snli_ve_<split>.jsonl``."""
    path = _annotations(src, split)
    root = image_root(src)
    regions = opts.regions or RegionSource()
    seen: set[str] = set()
    for line, rec in read_jsonl(path):
        image = require(rec, IMAGE_KEY, path, line, str)
        hypothesis = require(rec, "sentence2", path, line, str)
        gold = require(rec, "gold_label", path, line, str)
        pair_id = require(rec, "pairID", path, line, str)
        if pair_id in seen:  # one id per premise-hypothesis pair in the official files
            raise DataError(f"pairID {pair_id!r} appears twice in the split", file=path,
                            line=line, field="pairID")
        seen.add(pair_id)
        if gold not in SNLI_VE_LABELS:
            raise DataError(
                f"label {gold!r} out of range; expected one of {', '.join(SNLI_VE_LABELS)}",
                file=path, line=line, field="gold_label",
            )  # fmt: skip
        width, height = image_size(root / image, path, line, IMAGE_KEY)
        boxes, names = regions.regions(image, width, height)
        # The parse trees are derived from the sentences and triple the row size: dropped.
        meta = {k: v for k, v in rec.items() if not k.endswith("_parse")}
        yield make_row(
            id=pair_id,
            split=split,
            image=image,
            width=width,
            height=height,
            boxes=[whole_image(width, height)] + boxes,
            region_names=["image"] + names,
            query=(words := tokenize(hypothesis)),
            query_regions=[-1] * len(words),
            label=SNLI_VE_LABELS.index(gold),
            domain=opts.domains.get(image, ""),
            meta=dump_meta(meta),
        )
