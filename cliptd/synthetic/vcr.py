"""VCR-format questions (Q->A and QA->R, 4-way multiple choice) over synthetic scenes.

Question types, each 25% of a split:

- ``color``: "What color is [i] ?" -> "It is red ." A reference renders as its class name,
  i.e. its *shape*, so the colour is never in the question.
- ``shape``: "What shape is the red thing ?" (the only red object) -> "It is a circle ."
- ``count``: "How many blue things are there ?" -> "There are two ." (0-3, uniform)
- ``position``: "Which object is furthest to the left ?" -> ``["The", [3], "."]``: the four
  candidates are references to four different objects, so only grounding answers it.

A size question ("How big is [i] ?") is left out: it has two honest answers, not four.

Text-only balance: distractors come from the gold's own answer set and, on source, only
from values that the referenced attribute can take on source (a held-out colour of a shape
is never a distractor there), so every candidate is equally plausible without the image;
gold positions cycle through 0-3. Rationales are four statements about one object that
differ in one visual attribute with four values (quadrant; size x side; the colour of one
object), all consistent with the question and the gold answer: only the image decides.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cliptd.synthetic.plan import Req, cycle
from cliptd.synthetic.scene import COLOURS, SHAPES, SIZES, Scene, World, shape_polygon
from cliptd.synthetic.text import (
    EXTREMES,
    as_json_tokens,
    clear_of_midline,
    extreme,
    quadrant,
    render_orig,
)

QTYPES = ("color", "shape", "count", "position")
SPLITS = ("train", "val", "test")
COUNT_ANSWERS = (
    ["There", "are", "none", "."],
    ["There", "is", "one", "."],
    ["There", "are", "two", "."],
    ["There", "are", "three", "."],
)


@dataclass
class Question:
    qtype: str
    question: list[Any]
    answers: list[list[Any]]
    label: int
    rationales: list[list[Any]]
    rationale_label: int


def _arrange(rng: np.random.Generator, gold: Any, pool: list[Any], pos: int) -> list[Any]:
    """Gold at ``pos`` among 3 distractors drawn without replacement from ``pool``."""
    picks = [pool[int(i)] for i in rng.choice(len(pool), 3, replace=False)]
    return picks[:pos] + [gold] + picks[pos:]


def _other_shapes(world: World, colour: str, domain: str, gold: str) -> list[str]:
    pool = [s for s in world.shapes_for(colour, domain) if s != gold]
    # A colour with two held-out shapes has only 3 source shapes: top up with a held-out
    # shape (the only way to keep 4 choices). A text model would need the (colour, shape)
    # interaction to notice; bag-of-words cannot.
    return pool if len(pool) >= 3 else pool + [s for s in SHAPES if s not in pool and s != gold]


def requirements(rng: np.random.Generator, world: World, domain: str) -> Iterator[Req]:
    """An endless, balanced stream of VCR question requirements for ``domain``."""
    qtypes, golds, rgolds = cycle(rng, QTYPES), cycle(rng, range(4)), cycle(rng, range(4))
    counts, colours, directions = (
        cycle(rng, range(4)),
        cycle(rng, COLOURS),
        cycle(rng, list(EXTREMES)),
    )
    while True:
        qtype, pos, rpos = next(qtypes), next(golds), next(rgolds)
        if qtype == "color":
            yield _colour_req(rng, world, domain, pos, rpos)
        elif qtype == "shape":
            yield _shape_req(rng, world, domain, pos, rpos)
        elif qtype == "count":
            yield _count_req(rng, world, domain, next(counts), next(colours), pos, rpos)
        else:
            yield _position_req(world, domain, next(directions), pos, rpos)


def _colour_req(rng: np.random.Generator, world: World, domain: str, pos: int, rpos: int) -> Req:
    shape, colour = world.sample_pair(rng, domain)
    size = SIZES[rng.integers(2)]

    def build(scene: Scene, idx: list[int], rng: np.random.Generator) -> Question | None:
        i, o = idx[0], scene.objects[idx[0]]
        if not (clear_of_midline(o, 0) and clear_of_midline(o, 1)):
            return None  # the rationale names a quadrant: it must be unambiguous
        pool = [c for c in world.colours_for(shape, domain) if c != colour]
        answers = [["It", "is", c, "."] for c in _arrange(rng, colour, pool, pos)]
        gold_q = quadrant(o)
        quads = [
            q for q in ((v, h) for v in ("top", "bottom") for h in ("left", "right")) if q != gold_q
        ]
        order = [quads[int(j)] for j in rng.permutation(3)]
        order.insert(rpos, gold_q)
        rats = [[[i], "is", "a", size, colour, shape, "in", "the", v, h, "."] for v, h in order]
        return Question("color", ["What", "color", "is", [i], "?"], answers, pos, rats, rpos)

    return Req(forced=[(shape, colour, size)], build=build)


def _shape_req(rng: np.random.Generator, world: World, domain: str, pos: int, rpos: int) -> Req:
    shape, colour = world.sample_pair(rng, domain)
    size = SIZES[rng.integers(2)]

    def build(scene: Scene, idx: list[int], rng: np.random.Generator) -> Question | None:
        i, o = idx[0], scene.objects[idx[0]]
        if not clear_of_midline(o, 0):
            return None
        pool = _other_shapes(world, colour, domain, shape)
        answers = [["It", "is", "a", s, "."] for s in _arrange(rng, shape, pool, pos)]
        gold_r = (size, quadrant(o)[1])
        others = [(z, h) for z in SIZES for h in ("left", "right") if (z, h) != gold_r]
        order = [others[int(j)] for j in rng.permutation(3)]
        order.insert(rpos, gold_r)
        rats = [
            [
                [i],
                "is",
                "the",
                "only",
                colour,
                "thing",
                ",",
                "it",
                "is",
                z,
                "and",
                "on",
                "the",
                h,
                ".",
            ]
            for z, h in order
        ]
        question = ["What", "shape", "is", "the", colour, "thing", "?"]
        return Question("shape", question, answers, pos, rats, rpos)

    return Req(forced=[(shape, colour, size)], build=build, excl_colours=frozenset([colour]))


def _shape_with(rng: np.random.Generator, world: World, colour: str, domain: str) -> str:
    """A shape for an object of ``colour``, with the domain's pair distribution."""
    held = [s for s, c in world.held_out if c == colour]
    if domain == "target" and held and rng.random() < 0.5:
        return held[rng.integers(len(held))]
    shapes = world.shapes_for(colour, domain)
    return shapes[rng.integers(len(shapes))]


def _count_req(
    rng: np.random.Generator, world: World, domain: str, k: int, colour: str, pos: int, rpos: int
) -> Req:
    forced = [
        (_shape_with(rng, world, colour, domain), colour, SIZES[rng.integers(2)]) for _ in range(k)
    ]

    def build(scene: Scene, idx: list[int], rng: np.random.Generator) -> Question | None:
        # The rationale lists every object's colour left to right; candidates differ in the
        # colour of one object that is *not* counted, so all four agree with the answer.
        objs = scene.objects
        order = sorted(range(len(objs)), key=lambda j: objs[j].centre[0])
        free = [j for j in order if objs[j].colour != colour]
        o = free[rng.integers(len(free))]
        pool = [
            c for c in world.colours_for(objs[o].shape, domain) if c not in (colour, objs[o].colour)
        ]
        variants = _arrange(rng, objs[o].colour, pool, rpos)
        rats = []
        for v in variants:
            toks: list[Any] = []
            for n, j in enumerate(order):
                toks += [
                    [j],
                    "is",
                    v if j == o else objs[j].colour,
                    "," if n < len(order) - 1 else ".",
                ]
            rats.append(toks)
        answers = [COUNT_ANSWERS[j] for j in range(4) if j != k]
        answers.insert(pos, COUNT_ANSWERS[k])
        question = ["How", "many", colour, "things", "are", "there", "?"]
        return Question("count", question, [list(a) for a in answers], pos, rats, rpos)

    return Req(
        forced=forced, build=build, excl_colours=frozenset([colour]), min_objects=max(2, k + 1)
    )


def _position_req(world: World, domain: str, direction: str, pos: int, rpos: int) -> Req:
    phrase = EXTREMES[direction][0]

    def build(scene: Scene, idx: list[int], rng: np.random.Generator) -> Question | None:
        g = extreme(scene, direction)
        if g is None:
            return None
        others = [j for j in range(len(scene.objects)) if j != g]
        answers = [["The", [j], "."] for j in _arrange(rng, g, others, pos)]
        o = scene.objects[g]
        pool = [c for c in world.colours_for(o.shape, domain) if c != o.colour]
        rats = [[[g], "is", c, "and", *phrase, "."] for c in _arrange(rng, o.colour, pool, rpos)]
        return Question(
            "position", ["Which", "object", "is", *phrase, "?"], answers, pos, rats, rpos
        )

    return Req(forced=[], build=build, min_objects=4)


def metadata(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """The per-image VCR metadata JSON: detector-style boxes with a score, polygons, names."""
    return {
        "boxes": [
            [float(v) for v in o.box] + [round(float(rng.uniform(0.9, 1.0)), 4)]
            for o in scene.objects
        ],
        "segms": [
            [[[float(x), float(y)] for x, y in shape_polygon(o.shape, o.box)]]
            for o in scene.objects
        ],
        "names": [o.shape for o in scene.objects],
        "width": scene.width,
        "height": scene.height,
    }


def record(
    q: Question, scene: Scene, split: str, annot: int, img_id: str, img_fn: str, qnum: int,
    rng: np.random.Generator,
) -> dict[str, Any]:  # fmt: skip
    """One VCR jsonl line, with every field the real files have (labels hidden on test)."""
    movie = img_fn.split("/")[0]
    rec: dict[str, Any] = {
        "movie": movie,
        "objects": [o.shape for o in scene.objects],
        "interesting_scores": [int(v) for v in rng.integers(-1, 3, size=int(rng.integers(1, 4)))],
        "answer_likelihood": ("likely", "possible", "unlikely")[
            int(rng.choice(3, p=[0.7, 0.2, 0.1]))
        ],
        "img_fn": img_fn,
        "metadata_fn": img_fn[: -len(".jpg")] + ".json",
        "answer_orig": render_orig(q.answers[q.label]),
        "question_orig": render_orig(q.question),
        "rationale_orig": render_orig(q.rationales[q.rationale_label]),
        "question": as_json_tokens(q.question),
        "answer_choices": [as_json_tokens(a) for a in q.answers],
        "answer_label": q.label,
        "rationale_choices": [as_json_tokens(r) for r in q.rationales],
        "rationale_label": q.rationale_label,
        "img_id": img_id,
        "question_number": qnum,
        "annot_id": f"{split}-{annot}",
        "question_type": q.qtype,  # synthetic extra: for per-type diagnosis
    }
    if split == "test":
        # Like the real test set: no labels, and no *_orig text that would give them away.
        for key in ("answer_label", "rationale_label", "answer_orig", "rationale_orig"):
            del rec[key]
    return rec


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
