"""Answer-first question generation: each question states what its image must contain.

Balance is decided *before* the image exists: a question's answer is drawn from a balanced
cycle, then turned into a :class:`Req` (objects the image must show, attributes it must not
show). Several compatible requirements share one image, as questions share images in the
real datasets; a requirement that does not fit goes back to the queue for a later image,
so the balanced order of answers is kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cliptd.synthetic.scene import SIZES, Obj, Scene, World, place

Triple = tuple[str, str, str]  # (shape, colour, size)


@dataclass
class Req:
    """What one question (or one SNLI-VE caption's hypotheses) needs from its image.

    ``forced`` objects must be in the image. The ``excl_*`` sets say which attribute values
    only this requirement's own forced objects may have (uniqueness: "the red thing", counts);
    ``absent_*`` sets say what no object may be. ``build(scene, idx, rng)`` makes the
    question once the image is laid out (``idx``: final indices of ``forced``), or returns
    None when the layout does not support it (e.g. no clear leftmost object).
    """

    forced: list[Triple]
    build: Callable[[Scene, list[int], np.random.Generator], Any | None]
    excl_colours: frozenset[str] = frozenset()
    excl_shapes: frozenset[str] = frozenset()
    excl_pairs: frozenset[tuple[str, str]] = frozenset()
    absent_pairs: frozenset[tuple[str, str]] = frozenset()
    absent_triples: frozenset[Triple] = frozenset()
    min_objects: int = 2
    strikes: int = 0  # failed layouts so far (see ``pack``)

    def forbids(self, t: Triple) -> bool:
        """Whether an object that is *not* one of this requirement's own may look like ``t``."""
        s, c, z = t
        return (
            c in self.excl_colours
            or s in self.excl_shapes
            or (s, c) in self.excl_pairs
            or (s, c) in self.absent_pairs
            or t in self.absent_triples
        )


def compatible(chosen: Sequence[Req], new: Req, max_objects: int = 5) -> bool:
    if sum(len(r.forced) for r in chosen) + len(new.forced) > max_objects:
        return False
    if any(new.forbids(t) for r in chosen for t in r.forced):
        return False
    return not any(r.forbids(t) for r in chosen for t in new.forced)


def realise(
    rng: np.random.Generator, world: World, domain: str, reqs: Sequence[Req], max_objects: int = 5
) -> tuple[Scene | None, list[tuple[Req, Any]], list[Req]]:
    """Lay out one image for compatible ``reqs``: (scene, [(req, built question)], failed)."""
    forced = [(ri, t) for ri, r in enumerate(reqs) for t in r.forced]
    lo = max([2, len(forced)] + [r.min_objects for r in reqs])
    for _attempt in range(8):
        n = int(rng.integers(lo, max_objects + 1))
        free: list[Triple] = []
        for _ in range(60 * (n - len(forced))):
            if len(free) == n - len(forced):
                break
            s, c = world.sample_pair(rng, domain)
            t = (s, c, SIZES[rng.integers(2)])
            if not any(r.forbids(t) for r in reqs):
                free.append(t)
        if len(free) < n - len(forced):
            continue
        attrs = [t for _, t in forced] + free
        for _layout in range(12):
            boxes = place(rng, [t[2] for t in attrs])
            if boxes is None:
                continue
            # Shuffle so an object's index says nothing about its role in a question.
            perm = rng.permutation(len(attrs))
            objs = tuple(Obj(*attrs[j], boxes[j]) for j in perm)  # type: ignore[arg-type]
            where = {int(j): i for i, j in enumerate(perm)}  # old position -> new index
            scene = Scene(domain, objs, bg_seed=int(rng.integers(2**31)))
            built, failed = [], []
            k = 0
            for r in reqs:
                idx = [where[k + j] for j in range(len(r.forced))]
                k += len(r.forced)
                q = r.build(scene, idx, rng)
                (failed if q is None else built).append(r if q is None else (r, q))
            if built and (not failed or _layout >= 6):
                # Late attempts accept a partial success rather than spin; the rest retry.
                return scene, built, failed
    return None, [], list(reqs)


def pack(
    rng: np.random.Generator,
    world: World,
    domain: str,
    reqs: Iterator[Req],
    n_questions: int,
    per_image: Callable[[np.random.Generator], int],
    count: Callable[[Any], int] = lambda q: 1,
) -> Iterator[tuple[Scene, list[Any]]]:
    """Yield (scene, questions) until ``n_questions`` questions are made.

    ``count(q)`` is how many dataset lines one built item is (SNLI-VE: 3 hypotheses).
    """
    queue: deque[Req] = deque()
    made = 0
    while made < n_questions:
        m = per_image(rng)
        chosen: list[Req] = []
        skipped: list[Req] = []
        while len(chosen) < m and len(skipped) < 6:
            r = queue.popleft() if queue else next(reqs)
            (chosen if compatible(chosen, r) else skipped).append(r)
        queue.extendleft(reversed(skipped))  # keep the balanced order for the next image
        scene, built, failed = realise(rng, world, domain, chosen)
        for r in failed:
            # A requirement that keeps failing (an unlucky combination) is dropped, not
            # retried forever; it costs a tiny imbalance, never a hang.
            r.strikes += 1
            if r.strikes < 5:
                queue.appendleft(r)
        if scene is None or not built:
            continue
        out = []
        for _r, q in built:
            if made >= n_questions:
                break
            out.append(q)
            made += count(q)
        yield scene, out


def cycle(rng: np.random.Generator, values: Sequence[Any]) -> Iterator[Any]:
    """Endless shuffled blocks of ``values``: exact balance over every block."""
    while True:
        for i in rng.permutation(len(values)):
            yield values[int(i)]
