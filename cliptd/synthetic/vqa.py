"""VQA-v2-format questions and 10-annotator answers over synthetic scenes.

Kinds (25% each): "what color is the <shape> ?" (the only object of that shape), "what shape
is the <colour> object ?" (the only one of that colour), "how many <colour> objects are
there ?" ("0".."3", uniform) and "is there a <colour> <shape> ?" (yes/no, 50/50). Each
question gets 10 answers: most annotators give the gold, 0-3 give a spelling variant
("Red", "red.", "two") or a wrong answer, so the official answer normalisation matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cliptd.synthetic.plan import Req, cycle
from cliptd.synthetic.scene import COLOURS, SHAPES, SIZES, Scene, World
from cliptd.synthetic.text import NUMBER_WORDS, article

KINDS = ("color", "shape", "count", "yesno")
QUESTION_TYPE = {
    "color": "what color is the",
    "shape": "what shape is the",
    "count": "how many",
    "yesno": "is there a",
}
ANSWER_TYPE = {"color": "other", "shape": "other", "count": "number", "yesno": "yes/no"}
ANSWER_SET = {
    "color": COLOURS,
    "shape": SHAPES,
    "count": ("0", "1", "2", "3"),
    "yesno": ("yes", "no"),
}
INFO = {
    "description": "cliptd synthetic world, in the VQA v2 format",
    "url": "https://visualqa.org",
    "version": "2.0",
    "year": 2017,
    "contributor": "cliptd.synthetic",
    "date_created": "2017-04-26 17:07:13",  # fixed: the files must be byte-identical per seed
}
LICENSE = {
    "url": "http://creativecommons.org/licenses/by/4.0/",
    "name": "Creative Commons Attribution 4.0 License",
}


@dataclass
class Question:
    kind: str
    text: str
    answer: str


def requirements(rng: np.random.Generator, world: World, domain: str) -> Iterator[Req]:
    kinds, counts, colours, yes = (
        cycle(rng, KINDS),
        cycle(rng, range(4)),
        cycle(rng, COLOURS),
        cycle(rng, (True, False)),
    )
    while True:
        kind = next(kinds)
        shape, colour = world.sample_pair(rng, domain)
        size = SIZES[rng.integers(2)]
        if kind == "color":
            q = Question(kind, f"what color is the {shape} ?", colour)
            yield _req(q, forced=[(shape, colour, size)], excl_shapes=frozenset([shape]))
        elif kind == "shape":
            q = Question(kind, f"what shape is the {colour} object ?", shape)
            yield _req(q, forced=[(shape, colour, size)], excl_colours=frozenset([colour]))
        elif kind == "count":
            k, c = next(counts), next(colours)
            shapes = world.shapes_for(c, domain)
            forced = [
                (shapes[rng.integers(len(shapes))], c, SIZES[rng.integers(2)]) for _ in range(k)
            ]
            q = Question(kind, f"how many {c} objects are there ?", str(k))
            yield _req(q, forced=forced, excl_colours=frozenset([c]))
        elif next(yes):
            q = Question(kind, f"is there {article(colour)} {shape} ?", "yes")
            yield _req(q, forced=[(shape, colour, size)])
        else:
            q = Question(kind, f"is there {article(colour)} {shape} ?", "no")
            yield _req(q, forced=[], absent_pairs=frozenset([(shape, colour)]))


def _req(q: Question, **kw: Any) -> Req:
    return Req(build=lambda scene, idx, rng: q, **kw)


def _variant(kind: str, gold: str, rng: np.random.Generator) -> str:
    """A spelling that the official VQA normalisation maps back to ``gold``."""
    if kind == "count":
        options = [NUMBER_WORDS[int(gold)], gold + ".", NUMBER_WORDS[int(gold)].capitalize()]
    elif kind == "yesno":
        options = [gold.capitalize(), gold + ".", gold.upper()]
    else:
        options = [gold.capitalize(), gold + ".", ("a " if kind == "shape" else "the ") + gold]
    return options[int(rng.integers(len(options)))]


def answers(q: Question, rng: np.random.Generator) -> list[dict[str, Any]]:
    """10 annotator answers: the gold from at least 7, noise (variants, errors) from 0-3."""
    n_noisy = int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
    noisy = set(int(i) for i in rng.choice(10, n_noisy, replace=False))
    out = []
    for j in range(10):
        text, conf = q.answer, "yes"
        if j in noisy:
            if rng.random() < 0.5:
                text = _variant(q.kind, q.answer, rng)
            else:
                wrong = [a for a in ANSWER_SET[q.kind] if a != q.answer]
                text = wrong[int(rng.integers(len(wrong)))]
                conf = ("maybe", "no", "yes")[int(rng.choice(3, p=[0.5, 0.2, 0.3]))]
        elif rng.random() < 0.1:
            conf = "maybe"
        out.append({"answer": text, "answer_confidence": conf, "answer_id": j + 1})
    return out


def entries(
    scene: Scene, qs: list[Question], image_id: int, coco_split: str, rng: np.random.Generator
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(question entries, annotation entries) of one image; question_id = image_id*1000+k."""
    questions, annotations = [], []
    for k, q in enumerate(qs):
        qid = image_id * 1000 + k
        questions.append({"image_id": image_id, "question": q.text, "question_id": qid})
        annotations.append({
            "question_type": QUESTION_TYPE[q.kind],
            "multiple_choice_answer": q.answer,
            "answers": answers(q, rng),
            "image_id": image_id,
            "answer_type": ANSWER_TYPE[q.kind],
            "question_id": qid,
        })  # fmt: skip
    return questions, annotations


def image_path(coco_split: str, image_id: int) -> str:
    """Relative to the vqa/ folder, as the VQA reader, box file and domain file key it."""
    return f"{coco_split}/COCO_{coco_split}_{image_id:012d}.jpg"


def document(coco_split: str, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {"info": INFO, "license": LICENSE, "data_subtype": coco_split}
    if key == "questions":
        doc.update(task_type="Open-Ended", data_type="mscoco")
    doc[key] = items
    return doc
