"""The prepared-dataset contract: one Parquet schema for VCR, SNLI-VE and VQA rows.

Every reader (real files or the synthetic world, which writes the real formats) produces
rows of ``INSTANCE_SCHEMA``; every consumer (teacher cache, training, metrics) reads them.

Regions: region 0 is always the whole image ``[0, 0, width, height]``; regions 1.. are the
dataset's objects (VCR boxes) or a grid / user box file (SNLI-VE, VQA). Token lists are
rendered words; ``*_regions`` gives, per token, the region it refers to, or -1.

A prepared dataset is a folder::

    <out>/manifest.json          task, version (content hash), image_root, counts, source
    <out>/<split>/part-00000.parquet ...
    <out>/subsets/<split>-<name>.parquet   low-shot id lists (seed in schema metadata)
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")

_tokens = pa.list_(pa.string())
_regions = pa.list_(pa.int32())

INSTANCE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # annot_id / pairID / question_id
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),  # relative to manifest image_root
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4)), nullable=False),
        pa.field("region_names", _tokens, nullable=False),
        pa.field("query", _tokens, nullable=False),  # question / hypothesis words
        pa.field("query_regions", _regions, nullable=False),
        pa.field("candidates", pa.list_(_tokens), nullable=False),  # VCR answers, else []
        pa.field("candidates_regions", pa.list_(_regions), nullable=False),
        pa.field("label", pa.int32(), nullable=False),  # gold candidate / class, -1 unknown
        pa.field("rationales", pa.list_(_tokens), nullable=False),  # VCR only, else []
        pa.field("rationales_regions", pa.list_(_regions), nullable=False),
        pa.field("rationale_label", pa.int32(), nullable=False),  # VCR only, else -1
        pa.field("answers", _tokens, nullable=False),  # VQA: the 10 raw annotator answers
        pa.field("qtype", pa.string(), nullable=False),  # question type, for per-type metrics
        pa.field("domain", pa.string(), nullable=False),  # domain tag ("" when none)
        pa.field("meta", pa.string(), nullable=False),  # JSON of the other source fields
    ]
)
