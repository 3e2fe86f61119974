"""SNLI-VE-format hypotheses over synthetic scenes.

The documented labelling rule:

- entailment: the hypothesis is true of the image ("There is a small red circle .");
- contradiction: the named object (shape + colour) is in the image, but a stated attribute
  is wrong: its size, or its left/right relation to another named object;
- neutral: the hypothesis names a shape + colour object that the image does not show.

Two templates, ``exists`` ("There is a <size> <colour> <shape> .") and ``relation`` ("The
<colour> <shape> is left of the <colour> <shape> ."); every (template, label) combination is
one sixth of a split, and the words of a hypothesis have the same distribution under each
label, so the hypothesis alone is at chance. ``sentence1`` is a caption of the scene (as
the Flickr30k caption is in the real data): the premise of visual entailment is the image,
a model must not read ``sentence1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cliptd.synthetic.plan import Req, cycle
from cliptd.synthetic.scene import SIZES, Scene, World
from cliptd.synthetic.text import scene_caption

LABELS = ("entailment", "neutral", "contradiction")
TEMPLATES = ("exists", "relation")
SPLITS = ("train", "dev", "test")
MIN_SEPARATION_PX = 4  # centres this far apart make "left of" unambiguous


@dataclass
class Hypothesis:
    template: str
    label: str
    words: list[str]


def _flip(size: str) -> str:
    return SIZES[1 - SIZES.index(size)]


def requirements(rng: np.random.Generator, world: World, domain: str) -> Iterator[Req]:
    combos = cycle(rng, [(t, lab) for t in TEMPLATES for lab in LABELS])
    while True:
        template, label = next(combos)
        if template == "exists":
            yield _exists_req(rng, world, domain, label)
        else:
            yield _relation_req(rng, world, domain, label)


def _exists_req(rng: np.random.Generator, world: World, domain: str, label: str) -> Req:
    shape, colour = world.sample_pair(rng, domain)
    size = SIZES[rng.integers(2)]
    said = _flip(size) if label == "contradiction" else size
    hyp = Hypothesis("exists", label, ["There", "is", "a", said, colour, shape, "."])

    def build(scene: Scene, idx: list[int], rng: np.random.Generator) -> Hypothesis:
        return hyp

    if label == "neutral":
        return Req(forced=[], build=build, absent_pairs=frozenset([(shape, colour)]))
    absent = frozenset([(shape, colour, said)]) if label == "contradiction" else frozenset()
    return Req(forced=[(shape, colour, size)], build=build, absent_triples=absent)


def _relation_req(rng: np.random.Generator, world: World, domain: str, label: str) -> Req:
    a = world.sample_pair(rng, domain)
    b = a
    while b == a:
        b = world.sample_pair(rng, domain)
    sizes = [SIZES[rng.integers(2)] for _ in range(2)]

    def words(rel: str) -> list[str]:
        return ["The", a[1], a[0], "is", rel, "of", "the", b[1], b[0], "."]

    if label == "neutral":
        rel = ("left", "right")[rng.integers(2)]
        # One named object is shown (and unique), the other is absent; which one is random.
        shown, missing = (a, b) if rng.random() < 0.5 else (b, a)
        hyp = Hypothesis("relation", label, words(rel))
        return Req(
            forced=[(*shown, sizes[0])],
            build=lambda scene, idx, rng: hyp,
            excl_pairs=frozenset([shown]),
            absent_pairs=frozenset([missing]),
        )

    def build(scene: Scene, idx: list[int], rng: np.random.Generator) -> Hypothesis | None:
        xa, xb = (scene.objects[i].centre[0] for i in idx)
        if abs(xa - xb) < MIN_SEPARATION_PX:
            return None
        true_rel = "left" if xa < xb else "right"
        rel = true_rel if label == "entailment" else {"left": "right", "right": "left"}[true_rel]
        return Hypothesis("relation", label, words(rel))

    forced = [(*a, sizes[0]), (*b, sizes[1])]
    return Req(forced=forced, build=build, excl_pairs=frozenset([a, b]))


def caption(scene: Scene) -> str:
    text = scene_caption(scene, full=True)
    return text[0].upper() + text[1:] + " ."


def records(
    scene: Scene, hyps: list[Hypothesis], image: str, split: str, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """The jsonl lines of one image (one caption, its hypotheses)."""
    caption_id = f"{image}#0"
    premise = caption(scene)
    seen: dict[str, int] = {}
    out = []
    for h in hyps:
        seen[h.label] = seen.get(h.label, 0) + 1
        if split == "train":
            labels = [h.label]  # like SNLI train: one annotator
        else:
            # Like SNLI dev/test: 5 labels, the gold the clear majority (first = author's).
            n_wrong = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
            wrong = [x for x in LABELS if x != h.label]
            labels = [h.label] * (5 - n_wrong) + [
                wrong[int(rng.integers(2))] for _ in range(n_wrong)
            ]
            labels = labels[:1] + [labels[1:][int(j)] for j in rng.permutation(4)]
        out.append({
            "Flikr30kID": image,
            "sentence1": premise,
            "sentence2": " ".join(h.words),
            "gold_label": h.label,
            "pairID": f"{caption_id}r{seen[h.label]}{h.label[0]}",
            "captionID": caption_id,
            "annotator_labels": labels,
            "template": h.template,  # synthetic extra: for per-template diagnosis
        })  # fmt: skip
    return out
