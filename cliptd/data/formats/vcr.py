"""VCR (Visual Commonsense Reasoning) as it ships.

``<src>/{train,val,test}.jsonl`` (or under ``<src>/vcr1annots/``), images and per-image
metadata JSON under ``<src>/vcr1images/``. Token lists mix words and object references,
``["Is", [0], "happy", "?"]``; they are rendered to words, each word keeping the region it
points to (object index + 1; region 0 is the whole image) and -1 for plain words.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cliptd.core.errors import DataError
from cliptd.data.formats.common import (
    ReadOptions,
    check_box,
    dump_meta,
    load_json,
    make_row,
    read_jsonl,
    require,
    whole_image,
)

SPLITS = ("train", "val", "test")
IMAGE_DIR = "vcr1images"

# The conventional list (R2C / VL-BERT), duplicate "Peyton" included: changing it would
# change every rendered sentence relative to published pipelines.
GENDER_NEUTRAL_NAMES = (
    "Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry",
    "Jody", "Kendall", "Peyton", "Skyler", "Frankie", "Pat", "Quinn",
)  # fmt: skip

# Question type: the FIRST rule whose keyword (a word, or a phrase of consecutive words)
# occurs in the lower-cased question words wins; object references are not words here.
# The synthetic world's kinds come first because their phrases are unambiguous; then
# "why" beats everything (an explanation of an activity is still an explanation), and
# "if/would" comes before the temporal "will/next" ("what would happen next if ...").
QTYPE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("color", ("what color", "which color", "what colour", "what colors")),
    ("shape", ("what shape", "which shape")),
    ("count", ("how many",)),
    ("explanation", ("why", "how come", "what caused", "reason")),
    ("hypothetical", ("if", "would", "could", "suppose", "imagine")),
    ("temporal", ("before", "after", "next", "will", "going to", "later", "earlier",
                  "about to", "previously", "happened", "happen", "when")),
    ("mental", ("feel", "feels", "feeling", "felt", "think", "thinks", "thinking", "want",
                "wants", "wanted", "mood", "emotion", "believe", "opinion", "afraid")),
    ("role", ("who", "relationship", "related", "relation", "job", "occupation",
              "profession", "role", "work")),
    ("scene", ("where", "place", "location", "setting")),
    ("position", ("left", "right", "leftmost", "rightmost", "furthest", "farthest")),
    ("activity", ("doing", "activity", "playing", "holding", "do")),
)  # fmt: skip
QTYPES = tuple(name for name, _ in QTYPE_RULES) + ("other",)

# Fields that become columns; everything else on the line is kept in ``meta``.
_COLUMN_FIELDS = ("question", "answer_choices", "answer_label", "rationale_choices", "rationale_label")

CHOICES = 4  # answers and rationales per question, in every official split


def question_type(tokens: list[Any]) -> str:
    """The qtype of a VCR question token list, by the ordered rule QTYPE_RULES."""
    words = [t.lower() for t in tokens if isinstance(t, str)]
    text = " " + " ".join(words) + " "
    for name, keys in QTYPE_RULES:
        if any(f" {k} " in text for k in keys):
            return name
    return "other"


def render(
    tokens: Any, objects: list[str], file: Path, line: int, name: str
) -> tuple[list[str], list[int]]:
    """Render a VCR mixed token list to (words, region per word)."""
    if not isinstance(tokens, list):
        raise DataError(f"expected a token list, got {type(tokens).__name__}", file=file, line=line, field=name)
    words: list[str] = []
    regions: list[int] = []
    for tok in tokens:
        if type(tok) is str:  # the common case first: this loop runs ~10 times per line
            words.append(tok)
            regions.append(-1)
            continue
        if not isinstance(tok, list) or not tok or not all(type(i) is int for i in tok):
            raise DataError(f"bad token {tok!r}", file=file, line=line, field=name)
        for k, i in enumerate(tok):
            if not 0 <= i < len(objects):
                raise DataError(
                    f"object reference {i} out of range ({len(objects)} objects)",
                    file=file, line=line, field=name,
                )  # fmt: skip
            if k > 0:  # "A and B", "A , B and C": connectives point at no region
                words.append("and" if k == len(tok) - 1 else ",")
                regions.append(-1)
            label = objects[i]
            # Same object index -> same name, so a person keeps their name in the instance.
            text = GENDER_NEUTRAL_NAMES[i % len(GENDER_NEUTRAL_NAMES)] if label == "person" else label
            for w in text.split():  # multi-word class names: every word grounds to the box
                words.append(w)
                regions.append(i + 1)
    return words, regions


def splits(src: Path, variant: str | None = None) -> list[str]:
    if variant is not None:
        raise DataError(f"VCR has no variant {variant!r}")
    return [s for s in SPLITS if _annotations(src, s).is_file()]


def _annotations(src: Path, split: str) -> Path:
    # The release unpacks to vcr1annots/; accept the files directly under src as well.
    direct = src / f"{split}.jsonl"
    return direct if direct.is_file() or not (src / "vcr1annots").is_dir() else src / "vcr1annots" / f"{split}.jsonl"


def source_files(src: Path, split: str, variant: str | None = None) -> list[Path]:
    return [_annotations(src, split)]


def image_root(src: Path, variant: str | None = None) -> Path:
    return src / IMAGE_DIR


class _MetadataCache:
    """Per-image (width, height, validated boxes), parsed once: the questions of one image
    are adjacent in the files, so a small LRU keeps memory bounded and avoids re-reading."""

    def __init__(self, root: Path, size: int = 256) -> None:
        self.root, self.size = root, size
        self.items: OrderedDict[str, tuple] = OrderedDict()

    def get(self, metadata_fn: str, file: Path, line: int) -> tuple:
        if metadata_fn in self.items:
            self.items.move_to_end(metadata_fn)
            return self.items[metadata_fn]
        path = self.root / metadata_fn
        if not path.is_file():
            raise DataError(f"missing metadata file {path}", file=file, line=line, field="metadata_fn")
        meta = load_json(path, "metadata file")
        raw = require(meta, "boxes", path, None, list)
        width = require(meta, "width", path, None, (int, float))
        height = require(meta, "height", path, None, (int, float))
        boxes = [check_box(b, width, height, path, None, f"boxes[{i}]") for i, b in enumerate(raw)]
        names = meta.get("names")  # the class name of each box, as `objects` lists them
        self.items[metadata_fn] = width, height, boxes, names
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return width, height, boxes, names


def read(src: Path, split: str, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    """Yield one schema row per line of ``<split>.jsonl``."""
    if opts.regions is not None:
        raise DataError("--boxes/--grid do not apply to VCR: its regions are the metadata boxes")
    path = _annotations(src, split)
    root = image_root(src)
    metadata = _MetadataCache(root)
    seen_images: set[str] = set()  # bounded by the number of images, not of questions
    seen_ids: set[str] = set()
    labelled = split != "test"  # the test split ships without labels
    for line, rec in read_jsonl(path):
        objects = require(rec, "objects", path, line, list)
        img_fn = require(rec, "img_fn", path, line, str)
        metadata_fn = require(rec, "metadata_fn", path, line, str)
        annot_id = require(rec, "annot_id", path, line, str)
        question = require(rec, "question", path, line, list)
        answers = require(rec, "answer_choices", path, line, list)
        rationales = require(rec, "rationale_choices", path, line, list)
        # what the official files guarantee and the metrics rely on
        for name, choices in (("answer_choices", answers), ("rationale_choices", rationales)):
            if len(choices) != CHOICES:
                raise DataError(f"VCR has {CHOICES} choices per question, got {len(choices)}",
                                file=path, line=line, field=name)
        for i, obj in enumerate(objects):
            if not isinstance(obj, str):
                raise DataError(f"expected a class name, got {type(obj).__name__}",
                                file=path, line=line, field=f"objects[{i}]")
        if annot_id in seen_ids:
            raise DataError(f"annot_id {annot_id!r} appears twice in the split", file=path,
                            line=line, field="annot_id")
        seen_ids.add(annot_id)

        if img_fn not in seen_images:
            if not (root / img_fn).is_file():
                raise DataError(f"missing image {root / img_fn}", file=path, line=line, field="img_fn")
            seen_images.add(img_fn)
        width, height, obj_boxes, names = metadata.get(metadata_fn, path, line)
        if names is not None and list(names[: len(objects)]) != list(objects):
            raise DataError(f"objects {objects} differ from the class names of {metadata_fn} "
                            f"({names[: len(objects)]})", file=path, line=line, field="objects")
        if len(obj_boxes) < len(objects):
            raise DataError(
                f"metadata {metadata_fn} has {len(obj_boxes)} boxes for {len(objects)} objects",
                file=path, line=line, field="objects",
            )  # fmt: skip
        boxes = [whole_image(width, height)] + obj_boxes[: len(objects)]

        label = _label(rec, "answer_label", len(answers), labelled, path, line)
        rationale_label = _label(rec, "rationale_label", len(rationales), labelled, path, line)

        q_words, q_regions = render(question, objects, path, line, "question")
        cands = [render(a, objects, path, line, f"answer_choices[{i}]") for i, a in enumerate(answers)]
        rats = [render(r, objects, path, line, f"rationale_choices[{i}]") for i, r in enumerate(rationales)]

        yield make_row(
            id=annot_id,
            split=split,
            image=img_fn,
            width=int(round(width)),
            height=int(round(height)),
            boxes=boxes,
            region_names=["image"] + [str(o) for o in objects],
            query=q_words,
            query_regions=q_regions,
            candidates=[w for w, _ in cands],
            candidates_regions=[r for _, r in cands],
            label=label,
            rationales=[w for w, _ in rats],
            rationales_regions=[r for _, r in rats],
            rationale_label=rationale_label,
            qtype=question_type(question),
            domain=opts.domains.get(img_fn, ""),
            meta=dump_meta({k: v for k, v in rec.items() if k not in _COLUMN_FIELDS}),
        )


def _label(rec: dict, name: str, n: int, labelled: bool, path: Path, line: int) -> int:
    if name not in rec and not labelled:
        return -1
    value = require(rec, name, path, line, int)
    if not 0 <= value < n:
        raise DataError(f"label {value} out of range for {n} choices", file=path, line=line, field=name)
    return value
