"""Prepared datasets: real files -> Parquet shards, low-shot subsets, domain-shift presets.

CLI::

    python -m cliptd.data prepare --task {vcr,snli_ve,vqa} --src DIR --out DIR
                                  [--boxes FILE | --grid N] [--domains FILE] [--variant vqacp]
    python -m cliptd.data subsets --data DIR --split train --seed 0

A prepared dataset is written whole or not at all: everything goes to ``<out>.tmp-<pid>``
and is moved into place by ``os.replace`` at the end, so a crash or a bad record leaves no
``<out>`` (and the next run removes the dead run's temp folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from cliptd.atomic import clean_stale, swap_into_place
from cliptd.errors import DataError
from cliptd.formats import ReadOptions, RegionSource, load_domains, reader
from cliptd.metrics import vqa_normalize, vqa_soft_score
from cliptd.schema import INSTANCE_SCHEMA, SCHEMA_VERSION

SHARD_ROWS = 50_000  # rows per Parquet file
BATCH_ROWS = 2_048  # rows buffered in memory before a write: bounds memory while streaming
FRACTIONS = (0.01, 0.05, 0.10, 0.25, 1.0)
KSHOTS = (1, 2, 4, 8, 16)
MANIFEST = "manifest.json"


# --- prepare ----------------------------------------------------------------------------


def prepare(
    task: str,
    src: str | Path,
    out: str | Path,
    *,
    boxes: str | Path | None = None,
    grid: int | None = None,
    domains: str | Path | None = None,
    variant: str | None = None,
    shard_rows: int = SHARD_ROWS,
    progress: bool = True,
) -> Path:
    """Read the real files of ``task`` under ``src`` and write a prepared dataset to ``out``.

    Returns ``out``. Raises DataError (and writes nothing) on bad input.
    """
    fmt = reader(task)
    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise DataError("source folder not found", file=src)
    opts = ReadOptions(
        regions=RegionSource(Path(boxes), None) if boxes else RegionSource(None, grid) if grid else None,
        domains=load_domains(Path(domains) if domains else None),
        variant=variant,
    )
    splits = fmt.splits(src, variant)
    if not splits:
        raise DataError(f"no {task} annotation files found", file=src)

    clean_stale(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        version = hashlib.sha256()
        version.update(json.dumps([SCHEMA_VERSION, task, variant, grid]).encode())
        for extra in (boxes, domains):
            if extra:
                _hash_file(version, Path(extra))
        counts, files = {}, []
        for split in splits:
            for path in fmt.source_files(src, split, variant):
                files.append(str(path.relative_to(src)))
                _hash_file(version, path)
            rows = fmt.read(src, split, opts)
            if progress:
                rows = tqdm(rows, desc=f"{task}/{split}", unit=" rows", mininterval=1.0)
            counts[split] = _write_split(rows, tmp / split, shard_rows, version)
        manifest = {
            "task": task,
            "schema_version": SCHEMA_VERSION,
            "version": version.hexdigest()[:16],
            "image_root": str(fmt.image_root(src, variant).resolve()),
            "counts": counts,
            "source": {
                "src": str(src),
                "files": files,
                "boxes": str(Path(boxes).resolve()) if boxes else None,
                "grid": grid,
                "domains": str(Path(domains).resolve()) if domains else None,
                "variant": variant,
            },
        }
        _write_json_atomic(tmp / MANIFEST, manifest)
        swap_into_place(tmp, out)
    except BaseException:  # incl. KeyboardInterrupt: never leave a half-written dataset
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_split(rows: Iterator[dict], folder: Path, shard_rows: int, version: Any) -> int:
    """Write rows as ``part-NNNNN.parquet`` shards of at most ``shard_rows`` rows."""
    folder.mkdir()
    n, shard, in_shard = 0, 0, 0
    writer: pq.ParquetWriter | None = None
    buffer: list[dict] = []

    def flush() -> None:
        nonlocal writer, shard, in_shard
        if not buffer:
            return
        if writer is None:
            writer = pq.ParquetWriter(folder / f"part-{shard:05d}.parquet", INSTANCE_SCHEMA)
        writer.write_table(pa.Table.from_pylist(buffer, schema=INSTANCE_SCHEMA))
        in_shard += len(buffer)
        buffer.clear()
        if in_shard >= shard_rows:
            writer.close()
            writer, shard, in_shard = None, shard + 1, 0

    last_image = None
    try:
        for row in rows:
            # What rows derive from files we do not hash whole (VCR metadata, image headers)
            # enters the version through these fields. Boxes are a function of the image,
            # and rows of one image are adjacent: hash them once per run of an image.
            boxes = row["boxes"] if row["image"] != last_image else len(row["boxes"])
            last_image = row["image"]
            version.update(f"{row['image']}|{row['width']}|{row['height']}|{boxes}\n".encode())
            buffer.append(row)
            n += 1
            if len(buffer) >= min(BATCH_ROWS, shard_rows - in_shard):
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return n


def _hash_file(h: Any, path: Path) -> None:
    h.update(path.name.encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --- reading ----------------------------------------------------------------------------


def load_manifest(data: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset."""
    path = Path(data) / MANIFEST
    if not path.is_file():
        raise DataError("not a prepared dataset (no manifest.json)", file=data)
    return json.loads(path.read_text())


def _split_files(data: str | Path, split: str) -> list[Path]:
    manifest = load_manifest(data)
    if split not in manifest["counts"]:
        raise DataError(f"no split {split!r}; prepared splits: {', '.join(manifest['counts'])}", file=data)
    return sorted((Path(data) / split).glob("part-*.parquet"))


def read_split(data: str | Path, split: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A whole split as one table (optionally only ``columns``)."""
    files = _split_files(data, split)
    columns = list(columns) if columns is not None else None
    if not files:
        empty = INSTANCE_SCHEMA.empty_table()
        return empty.select(columns) if columns is not None else empty
    return pa.concat_tables([pq.read_table(f, columns=columns, schema=INSTANCE_SCHEMA) for f in files])


def iter_batches(
    data: str | Path, split: str, batch_size: int, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a split as record batches of at most ``batch_size`` rows (a batch never spans
    two shards, so the last batch of each shard may be shorter)."""
    for f in _split_files(data, split):
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


# --- low-shot subsets -------------------------------------------------------------------

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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.table({"id": result}, schema=schema), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return result


# --- domain-shift presets ---------------------------------------------------------------

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


# --- VQA answers ------------------------------------------------------------------------


def answer_vocab(table: pa.Table, top_k: int) -> list[str]:
    """The ``top_k`` most frequent normalized ``multiple_choice_answer``s (ties by string)."""
    counts = Counter(vqa_normalize(json.loads(m)["multiple_choice_answer"]) for m in table["meta"].to_pylist())
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


def soft_targets(answers: Sequence[str], index: Mapping[str, int]) -> dict[int, float]:
    """Soft training targets from the annotators' answers: ``{vocab index: score}`` with
    score = vqa_soft_score(#annotators giving that normalized answer); answers outside the
    vocabulary are dropped. ``index`` maps answer -> position in the vocabulary."""
    counts = Counter(vqa_normalize(a) for a in answers)
    return {index[a]: vqa_soft_score(c) for a, c in counts.items() if a in index}


# --- CLI --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cliptd.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="real files -> Parquet shards + manifest")
    pr.add_argument("--task", required=True, help="vcr, snli_ve or vqa")
    pr.add_argument("--src", required=True, type=Path)
    pr.add_argument("--out", required=True, type=Path)
    regions = pr.add_mutually_exclusive_group()
    regions.add_argument("--boxes", type=Path, help="JSON: image path -> [[x1, y1, x2, y2], ...]")
    regions.add_argument("--grid", type=int, help="N: an N x N grid of regions")
    pr.add_argument("--domains", type=Path, help="JSON: image path -> domain")
    pr.add_argument("--variant", choices=["vqacp"])
    pr.add_argument("--shard-rows", type=int, default=SHARD_ROWS)
    su = sub.add_parser("subsets", help="write the low-shot id lists of a split")
    su.add_argument("--data", required=True, type=Path)
    su.add_argument("--split", default="train")
    su.add_argument("--seed", type=int, default=0)
    su.add_argument("--fractions", type=float, nargs="*", default=list(FRACTIONS))
    su.add_argument("--kshots", type=int, nargs="*", default=list(KSHOTS))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            out = prepare(
                args.task, args.src, args.out, boxes=args.boxes, grid=args.grid,
                domains=args.domains, variant=args.variant, shard_rows=args.shard_rows,
            )  # fmt: skip
            m = load_manifest(out)
            print(f"wrote {out} (version {m['version']}): {m['counts']}")
        else:
            for f in args.fractions:
                print(f"{args.split} frac {f:g} seed {args.seed}: {len(subset_ids(args.data, args.split, fraction=f, seed=args.seed))} ids")
            for k in args.kshots:
                print(f"{args.split} k={k} seed {args.seed}: {len(subset_ids(args.data, args.split, kshot=k, seed=args.seed))} ids")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
