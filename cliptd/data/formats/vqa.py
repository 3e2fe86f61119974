"""VQA v2 and VQA-CP v2 as they ship.

VQA v2: ``v2_OpenEnded_mscoco_{train,val}2014_questions.json`` (``{"questions": [...]}``)
and ``v2_mscoco_{train,val}2014_annotations.json`` (``{"annotations": [...]}``), joined by
``question_id``; images ``train2014/COCO_train2014_{image_id:012d}.jpg`` (val likewise).
VQA-CP v2 (``variant="vqacp"``): ``vqacp_v2_{train,test}_{questions,annotations}.json``,
plain JSON lists of the same objects, each with ``coco_split`` naming the image folder.
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
    iter_json_array,
    make_row,
    require,
    tokenize,
    whole_image,
)

VARIANTS = (None, "vqacp")
_SPLITS = {None: ("train", "val"), "vqacp": ("train", "test")}

ANNOTATORS = 10


def _files(src: Path, split: str, variant: str | None) -> tuple[Path, Path]:
    if variant == "vqacp":
        return src / f"vqacp_v2_{split}_questions.json", src / f"vqacp_v2_{split}_annotations.json"
    return (
        src / f"v2_OpenEnded_mscoco_{split}2014_questions.json",
        src / f"v2_mscoco_{split}2014_annotations.json",
    )


def _check_variant(variant: str | None) -> None:
    if variant not in VARIANTS:
        raise DataError(f"unknown VQA variant {variant!r}; expected 'vqacp' or none")


def splits(src: Path, variant: str | None = None) -> list[str]:
    _check_variant(variant)
    present = []
    for split in _SPLITS[variant]:
        questions, annotations = _files(src, split, variant)
        if questions.is_file() != annotations.is_file():
            missing = annotations if questions.is_file() else questions
            raise DataError(f"missing file (the {split} split needs questions and annotations)", file=missing)
        if questions.is_file():
            present.append(split)
    return present


def source_files(src: Path, split: str, variant: str | None = None) -> list[Path]:
    return list(_files(src, split, variant))


def image_root(src: Path, variant: str | None = None) -> Path:
    return src  # images live in train2014/ and val2014/ side by side: keep the folder in `image`


def image_path(coco_split: str, image_id: int) -> str:
    return f"{coco_split}/COCO_{coco_split}_{image_id:012d}.jpg"


def _questions(path: Path, variant: str | None) -> Iterator[tuple[int, int, dict[str, Any]]]:
    for line, q in iter_json_array(path, None if variant == "vqacp" else "questions"):
        qid = require(q, "question_id", path, line, int)
        require(q, "question", path, line, str)
        require(q, "image_id", path, line, int)
        yield qid, line, q


def read(src: Path, split: str, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    """Yield one schema row per annotation, joined with its question.

    The join streams both files: questions are read ahead only until the annotation's
    question turns up. The official files list both in the same order, so the look-ahead
    stays tiny; files in another order still work, at the cost of memory for the
    questions read ahead.
    """
    _check_variant(opts.variant)
    q_path, a_path = _files(src, split, opts.variant)
    questions = _questions(q_path, opts.variant)
    pending: dict[int, dict[str, Any]] = {}
    root = image_root(src)
    regions = opts.regions or RegionSource()
    key = None if opts.variant == "vqacp" else "annotations"
    for line, ann in iter_json_array(a_path, key):
        qid = require(ann, "question_id", a_path, line, int)
        image_id = require(ann, "image_id", a_path, line, int)
        qtype = require(ann, "question_type", a_path, line, str)
        require(ann, "answer_type", a_path, line, str)
        require(ann, "multiple_choice_answer", a_path, line, str)
        raw = require(ann, "answers", a_path, line, list)
        if len(raw) != ANNOTATORS:  # the accuracy is a mean over 10 annotators
            raise DataError(f"VQA has {ANNOTATORS} answers per question (one per annotator), "
                            f"got {len(raw)}", file=a_path, line=line, field="answers")
        answers = [require(a, "answer", a_path, line, str) for a in raw]

        while qid not in pending:
            q = next(questions, None)
            if q is None:
                raise DataError(f"question {qid} not in {q_path.name}", file=a_path, line=line, field="question_id")
            pending[q[0]] = q[2]
        q = pending.pop(qid)
        if q["image_id"] != image_id:
            raise DataError(
                f"image_id {image_id} differs from the question's {q['image_id']}",
                file=a_path, line=line, field="image_id",
            )  # fmt: skip

        if opts.variant == "vqacp":
            coco_split = require(ann, "coco_split", a_path, line, str)
        else:
            coco_split = f"{split}2014"
        image = image_path(coco_split, image_id)
        width, height = image_size(root / image, a_path, line, "image_id")
        boxes, names = regions.regions(image, width, height)
        meta = {k: v for k, v in {**q, **ann}.items() if k != "answers"}
        meta["answer_confidences"] = [a.get("answer_confidence") for a in raw]
        yield make_row(
            id=str(qid),
            split=split,
            image=image,
            width=width,
            height=height,
            boxes=[whole_image(width, height)] + boxes,
            region_names=["image"] + names,
            query=(words := tokenize(q["question"])),
            query_regions=[-1] * len(words),
            answers=answers,
            qtype=qtype,
            domain=opts.domains.get(image, ""),
            meta=dump_meta(meta),
        )
    leftover = next(iter(pending), None)
    if leftover is None:
        leftover = next((q[0] for q in questions), None)
    if leftover is not None:
        raise DataError(f"question {leftover} has no annotation in {a_path.name}", file=q_path, field="question_id")
