"""Sentence pieces shared by the task generators and the caption corpora.

All synthetic text is space-tokenised ("It is red ."), so what the teacher's caption corpus
shows is exactly what the VCR/VQA readers render from the task files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cliptd.synthetic.scene import WIDTH, Obj, Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
BACKGROUND_WORDS = {"source": "dark background", "target": "striped background"}

Token = str | list[int]


def render(tokens: Sequence[Token], names: Sequence[str]) -> str:
    """VCR-style rendering: a reference becomes its object's class name ("and"-joined)."""
    return " ".join(t if isinstance(t, str) else " and ".join(names[i] for i in t) for t in tokens)


def render_orig(tokens: Sequence[Token]) -> str:
    """The ``*_orig`` strings of real VCR: references as 1-based numbers, plain punctuation."""
    words = [t if isinstance(t, str) else " and ".join(str(i + 1) for i in t) for t in tokens]
    text = " ".join(words)
    for p in (" ?", " .", " ,"):
        text = text.replace(p, p[1:])
    return text


def describe(o: Obj, domain: str, size: bool = True) -> str:
    """ "small red circle" / "large outlined blue square" (no article)."""
    words = [o.size] if size else []
    if domain == "target":
        words.append("outlined")
    return " ".join([*words, o.colour, o.shape])


def article(phrase: str) -> str:
    """ "a red circle" / "an orange circle" / "an outlined ..."."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def region_caption(o: Obj, domain: str) -> str:
    return article(describe(o, domain))


def quadrant(o: Obj) -> tuple[str, str]:
    cx, cy = o.centre
    return ("top" if cy < WIDTH / 2 else "bottom", "left" if cx < WIDTH / 2 else "right")


def clear_of_midline(o: Obj, axis: int, margin: float = 2.0) -> bool:
    """Whether the centre is at least ``margin`` px from the image midline on ``axis``."""
    return abs(o.centre[axis] - WIDTH / 2) >= margin


# "Which object is ...": the direction, the phrase, and how to score "more so". Every
# phrase says "furthest": cliptd.data.formats.vcr files questions with it under "position".
EXTREMES: dict[str, tuple[list[str], int, int]] = {
    # direction: (phrase words, axis, sign: +1 = smallest coordinate wins)
    "left": (["furthest", "to", "the", "left"], 0, 1),
    "right": (["furthest", "to", "the", "right"], 0, -1),
    "top": (["furthest", "toward", "the", "top"], 1, 1),
    "bottom": (["furthest", "toward", "the", "bottom"], 1, -1),
}


def extreme(scene: Scene, direction: str, gap: float = 3.0) -> int | None:
    """Index of the object clearly furthest in ``direction`` (by centre *and* by edge).

    Both measures must agree with a ``gap`` px lead, so no reasonable reading of
    "furthest to the left" gives a different answer.
    """
    _, axis, sign = EXTREMES[direction]
    objs = scene.objects
    edge_of = (lambda o: o.box[axis]) if sign > 0 else (lambda o: o.box[axis + 2])
    by_centre = sorted(range(len(objs)), key=lambda i: sign * objs[i].centre[axis])
    by_edge = sorted(range(len(objs)), key=lambda i: sign * edge_of(objs[i]))
    if by_centre[0] != by_edge[0] or len(objs) < 2:
        return None
    c0, c1 = (sign * objs[i].centre[axis] for i in by_centre[:2])
    e0, e1 = (sign * edge_of(objs[i]) for i in by_edge[:2])
    return by_centre[0] if (c1 - c0 >= gap and e1 - e0 >= gap) else None


def scene_caption(scene: Scene, full: bool) -> str:
    """Whole-image caption: every object left to right (``full``) or a two-object relation."""
    objs = sorted(scene.objects, key=lambda o: o.centre[0])
    bg = BACKGROUND_WORDS[scene.domain]
    if full or len(objs) < 2 or objs[-1].centre[0] - objs[0].centre[0] < 4:
        parts = [article(describe(o, scene.domain)) for o in objs]
        listed = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
        return f"{listed} on a {bg}"
    a, b = objs[0], objs[-1]  # leftmost and rightmost: the relation is always true
    left, right = article(describe(a, scene.domain, size=False)), article(describe(b, scene.domain))
    return f"{left} left of {right} on a {bg}"


def as_json_tokens(tokens: Sequence[Any]) -> list[Any]:
    """Plain lists (numpy ints would not serialise)."""
    return [t if isinstance(t, str) else [int(i) for i in t] for t in tokens]
