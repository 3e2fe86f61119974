"""Grounded statements for pre-training, made from a corpus image's own boxes and region labels."""

from __future__ import annotations

import numpy as np
import torch

from cliptd.data.corpus import CorpusItem

# Grounded statements: what region descriptions and referring expressions (Visual Genome,
# RefCOCO) give real VL pre-training — counts, spatial extremes, attribute bindings — made
# from the corpus's own boxes and region labels. Each word carries the region it refers to
# (0-based among the objects) or None.
COUNT_WORDS = ("none", "one", "two", "three")


DIRECTIONS = {"left": ("to", 0, 1), "right": ("to", 0, -1), "top": ("toward", 1, 1),
              "bottom": ("toward", 1, -1)}


def _extreme(boxes: torch.Tensor, direction: str, gap: float = 3.0) -> int | None:
    """The object clearly furthest in ``direction`` by centre and by edge, or None."""
    _, axis, sign = DIRECTIONS[direction]
    if len(boxes) < 2:
        return None
    centre = sign * (boxes[:, axis] + boxes[:, axis + 2]) / 2
    edge = sign * (boxes[:, axis] if sign > 0 else boxes[:, axis + 2])
    c, e = centre.argsort(), edge.argsort()
    if c[0] != e[0] or centre[c[1]] - centre[c[0]] < gap or edge[e[1]] - edge[e[0]] < gap:
        return None
    return int(c[0])


def grounded_statements(item: CorpusItem, groups, rng: np.random.Generator
                        ) -> list[tuple[list[str], list[int | None]]]:
    """True statements about one image: how many things of a colour, which object is
    furthest in a direction (its shape word grounded to it), what shape the only thing of a
    colour is. ``groups`` = (colours, shapes, sizes)."""
    colours, shapes = groups[0], groups[1]
    attrs = item.attributes[1:]
    out = []
    colour = colours[rng.integers(len(colours))]
    k = int((attrs[:, 0] == colours.index(colour)).sum())
    if k < len(COUNT_WORDS):
        verb, noun = ("is", "thing") if k == 1 else ("are", "things")
        out.append((["there", verb, COUNT_WORDS[k], colour, noun, "."], [None] * 6))
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    g = _extreme(item.boxes[1:], direction)
    if g is not None and attrs[g, 1] >= 0:
        words = ["the", shapes[attrs[g, 1]], "is", "furthest", DIRECTIONS[direction][0],
                 "the", direction, "."]
        out.append((words, [None, g, None, None, None, None, None, None]))
    counts = torch.bincount(attrs[:, 0].clamp(min=0), minlength=len(colours))
    unique = [j for j in range(len(attrs)) if attrs[j, 0] >= 0 and counts[attrs[j, 0]] == 1
              and attrs[j, 1] >= 0]
    if unique:
        j = unique[rng.integers(len(unique))]
        out.append((["the", colours[attrs[j, 0]], "thing", "is", "a", shapes[attrs[j, 1]], "."],
                    [None] * 7))
    return out


def statement_choices(item: CorpusItem, groups, rng: np.random.Generator, n: int = 4
                      ) -> tuple[list[tuple[list[str], list[int | None]]], list, str] | None:
    """``n`` texts about one image, the first true, the others minimally false: the other
    counts ("there are two red things" / "there is one red thing" / ...), the same words
    pointed at other objects ("the square is furthest to the left" said of each object), the
    other shapes for a colour, or a region caption with one attribute changed. None when
    the image cannot give ``n`` distinct texts of the chosen kind. This is the contrast
    image-text matching learns from, as a choice instead of a yes/no.

    Also returns, per word of the true text, the objects it refers to (word-region
    alignment targets, never given as input): "red things" → every red object, "left" in
    "... furthest to the left" → that object, "red thing" → the only red object; and the
    kind of choice (one of ``CHOICE_KINDS``)."""
    colours, shapes, sizes = groups
    attrs = item.attributes[1:]
    kind = int(rng.integers(4))
    if kind == 0:  # count
        colour = colours[rng.integers(len(colours))]
        k = int((attrs[:, 0] == colours.index(colour)).sum())
        if k >= len(COUNT_WORDS):
            return None

        def count(j):
            verb, noun = ("is", "thing") if j == 1 else ("are", "things")
            return ["there", verb, COUNT_WORDS[j], colour, noun, "."], [None] * 6
        others = [j for j in range(len(COUNT_WORDS)) if j != k]
        members = tuple(int(j) for j in (attrs[:, 0] == colours.index(colour)).nonzero()
                        .flatten())
        refs = [None, None, None, members or None, members or None, None]
        return [count(k)] + [count(j) for j in rng.permutation(others)[: n - 1]], refs, "count"
    if kind == 1:  # which object is furthest
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        g = _extreme(item.boxes[1:], direction)
        if g is None or len(attrs) < n or (attrs[:, 1] < 0).any():
            return None

        def said_of(j):
            return (["the", shapes[attrs[j, 1]], "is", "furthest", DIRECTIONS[direction][0],
                     "the", direction, "."], [None, j, None, None, None, None, None, None])
        others = [j for j in range(len(attrs)) if j != g]
        refs = [None, None, None, (g,), None, None, (g,), None]
        return ([said_of(g)] + [said_of(int(j)) for j in rng.permutation(others)[: n - 1]],
                refs, "furthest")
    if kind == 2:  # what shape the only thing of a colour is
        counts = torch.bincount(attrs[:, 0].clamp(min=0), minlength=len(colours))
        unique = [j for j in range(len(attrs)) if attrs[j, 0] >= 0 and counts[attrs[j, 0]] == 1
                  and attrs[j, 1] >= 0]
        if not unique or len(shapes) < n:
            return None
        j = unique[rng.integers(len(unique))]
        colour, shape = colours[attrs[j, 0]], shapes[attrs[j, 1]]
        others = [s for s in shapes if s != shape]
        refs = [None, (j,), (j,), None, None, None, None]
        return [(["the", colour, "thing", "is", "a", s, "."], [None] * 7)
                for s in [shape, *rng.permutation(others)[: n - 1]]], refs, "binding"
    # a region caption against the same region with one attribute changed
    j = int(rng.integers(len(item.region_captions)))
    words = item.region_captions[j].split()
    out, tries = [words], 0
    while len(out) < n and tries < 20:
        tries += 1
        cand = _swap_attribute(words, rng, groups)
        if cand is not None and cand not in out:
            out.append(cand)
    if len(out) < n:
        return None
    return [(w, [j] * len(w)) for w in out], [None] * len(words), "caption"


def _swap_attribute(words: list[str], rng: np.random.Generator,
                    groups: tuple[tuple[str, ...], ...]) -> list[str] | None:
    """A hard negative: the same text with one attribute word (colour, shape, size, count,
    direction) replaced by another of its kind, or None when it has no such word."""
    spots = [(i, g) for i, w in enumerate(words) for g in groups if w in g]
    if not spots:
        return None
    i, group = spots[rng.integers(len(spots))]
    out = list(words)
    out[i] = rng.choice([w for w in group if w != words[i]])
    return out
