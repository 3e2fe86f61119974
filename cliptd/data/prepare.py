"""Prepared datasets: real files → Parquet shards and a manifest, read back by split.

A prepared dataset is written whole or not at all: everything goes to ``<out>.tmp-<pid>``
and is moved into place by ``os.replace`` at the end, so a crash or a bad record leaves no
``<out>`` (and the next run removes the dead run's temp folder). The command is
``python -m cliptd.data prepare`` (``cliptd.data.__main__``); the low-shot subsets and
domain presets of a prepared dataset are ``cliptd.data.subsets``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cliptd.core.atomic import atomic_write, clean_stale, swap_into_place
from cliptd.core.errors import DataError
from cliptd.data.formats.common import ReadOptions, RegionSource, load_domains, reader
from cliptd.data.metrics import vqa_normalize, vqa_soft_score
from cliptd.data.schema import INSTANCE_SCHEMA, SCHEMA_VERSION

SHARD_ROWS = 50_000  # rows per Parquet file


BATCH_ROWS = 2_048  # rows buffered in memory before a write: bounds memory while streaming


MANIFEST = "manifest.json"


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
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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
