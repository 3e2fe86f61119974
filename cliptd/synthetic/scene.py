"""Attribute vocabularies, scene sampling and rendering of the synthetic world.

A scene is 2-5 non-overlapping objects on a 64x64 canvas. Each object has a shape, a colour,
a size and an exact box ``[x1, y1, x2, y2]`` (pixel edges, ``x2 = x1 + side``): every shape
touches all four sides of its box, so the box is the tight extent of the drawn pixels.

Two domains share the vocabulary and differ in everything a detector or CLIP would notice:

- ``source``: filled shapes, plain dark background, saturated base palette;
- ``target``: outlined shapes (2-3 px stroke), noisy striped background, greyer shades of
  the same colour names, and the held-out (shape, colour) pairs that source never shows.

Besides the domains, one split of knowledge between the two pre-training corpora: the
``STUDENT_UNSEEN`` colours appear in the task's images (both domains) and in the teacher's
broad corpus, never in the student's narrow one (``World.for_student``) -- as real VCR
frames hold concepts CLIP saw on the web and a COCO-pretrained student never did.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
SIDE_PX = {"small": 12, "large": 20}  # the box side of each size
DOMAINS = ("source", "target")
WIDTH = HEIGHT = 64

# Saturated base palette (source). Chosen far apart in RGB so colour is never ambiguous.
BASE_PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 30),
    "purple": (150, 50, 200),
    "orange": (245, 140, 20),
    "white": (240, 240, 240),
    "cyan": (30, 220, 220),
}


def _greyer(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    # Halve the saturation around the pixel's luminance, then pull 15% towards mid-grey:
    # the hue (hence the colour name) survives, the exact pixel values a source-trained
    # model memorised do not.
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    out = [0.85 * (lum + 0.5 * (c - lum)) + 0.15 * 128 for c in rgb]
    return tuple(int(round(c)) for c in out)  # type: ignore[return-value]


TARGET_PALETTE = {name: _greyer(rgb) for name, rgb in BASE_PALETTE.items()}
PAIRS = tuple((s, c) for s in SHAPES for c in COLOURS)  # all 40 (shape, colour) pairs
# Colours the student's pre-training corpus never shows (objects, captions, statements):
# each sits between two seen hues (orange: red-yellow, purple: red-blue), so a student
# that never saw it reads it as a neighbour, as a COCO student reads an unfamiliar object
# as its nearest COCO class. The task's images and the teacher's corpus show them.
STUDENT_UNSEEN = ("purple", "orange")


@dataclass(frozen=True)
class Style:
    """How a domain draws: fill or outline, palette, background kind."""

    filled: bool
    palette: dict[str, tuple[int, int, int]]
    background: str  # "plain" | "striped"


STYLES = {
    "source": Style(filled=True, palette=BASE_PALETTE, background="plain"),
    "target": Style(filled=False, palette=TARGET_PALETTE, background="striped"),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 (x2 = x1 + side, exclusive pixel edge)

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Scene:
    domain: str
    objects: tuple[Obj, ...]
    bg_seed: int  # drives background jitter/texture, so rendering is a pure function
    width: int = WIDTH
    height: int = HEIGHT


# --- held-out pairs and per-domain attribute distributions --------------------------------


def choose_held_out(rng: np.random.Generator) -> tuple[tuple[str, str], ...]:
    """10 of the 40 (shape, colour) pairs (25%) that only the target domain shows.

    Exactly 2 per shape and at most 2 per colour, so every shape keeps 6 source colours and
    every colour keeps >= 3 source shapes: each attribute alone is still learnable on source,
    only the combination is new.
    """
    while True:
        picks = [(s, str(c)) for s in SHAPES for c in rng.choice(COLOURS, 2, replace=False)]
        per_colour = [sum(c == col for _, c in picks) for col in COLOURS]
        if max(per_colour) <= 2:
            return tuple(sorted(picks, key=lambda p: (SHAPES.index(p[0]), COLOURS.index(p[1]))))


@dataclass(frozen=True)
class World:
    """The per-seed facts the generators share: held-out pairs and who may appear where."""

    held_out: tuple[tuple[str, str], ...]
    allowed: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    @classmethod
    def from_held_out(cls, held_out: tuple[tuple[str, str], ...]) -> World:
        source = tuple(p for p in PAIRS if p not in held_out)
        return cls(held_out=held_out, allowed={"source": source, "target": PAIRS})

    def for_student(self) -> World:
        """The narrow pre-training corpus's world: source pairs without the
        ``STUDENT_UNSEEN`` colours."""
        source = tuple(p for p in self.allowed["source"] if p[1] not in STUDENT_UNSEEN)
        return World(held_out=self.held_out, allowed={"source": source})

    @property
    def colours(self) -> tuple[str, ...]:
        """The colours some domain of this world shows, in vocabulary order."""
        seen = {c for pairs in self.allowed.values() for _, c in pairs}
        return tuple(c for c in COLOURS if c in seen)

    def colours_for(self, shape: str, domain: str) -> list[str]:
        return [c for s, c in self.allowed[domain] if s == shape]

    def shapes_for(self, colour: str, domain: str) -> list[str]:
        return [s for s, c in self.allowed[domain] if c == colour]

    def sample_pair(self, rng: np.random.Generator, domain: str) -> tuple[str, str]:
        # Target over-weights the held-out pairs (half of all draws) so that most target
        # scenes and questions involve a combination the source-trained model never saw.
        if domain == "target" and rng.random() < 0.5:
            return self.held_out[rng.integers(len(self.held_out))]
        pairs = self.allowed[domain]
        return pairs[rng.integers(len(pairs))]


# --- placement -------------------------------------------------------------------------

GAP_PX = 2  # free pixels between any two boxes (outlines must not touch)
MARGIN_PX = 1  # free pixels to the image edge


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (
        a[2] + GAP_PX <= b[0]
        or b[2] + GAP_PX <= a[0]
        or a[3] + GAP_PX <= b[1]
        or b[3] + GAP_PX <= a[1]
    )


def place(
    rng: np.random.Generator, sizes: list[str], tries: int = 40
) -> list[tuple[int, int, int, int]] | None:
    """Non-overlapping boxes for ``sizes`` (same order), or None if this draw jammed."""
    order = sorted(range(len(sizes)), key=lambda i: -SIDE_PX[sizes[i]])  # big ones first
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for i in order:
        side = SIDE_PX[sizes[i]]
        hi = WIDTH - side - MARGIN_PX
        for _ in range(tries):
            x, y = (int(v) for v in rng.integers(MARGIN_PX, hi + 1, size=2))
            box = (x, y, x + side, y + side)
            if not any(_overlaps(box, b) for b in boxes.values()):
                boxes[i] = box
                break
        else:
            return None
    return [boxes[i] for i in range(len(sizes))]


def sample_scene(
    rng: np.random.Generator,
    domain: str,
    world: World | None = None,
    n_objects: int | None = None,
) -> Scene:
    """A random scene of ``domain``: 2-5 objects, pairs from that domain's allowed set.

    Without ``world`` every pair may appear (the broad, CLIP-like distribution).
    """
    while True:
        n = int(rng.integers(2, 6)) if n_objects is None else n_objects
        attrs = []
        for _ in range(n):
            if world is None:
                shape, colour = PAIRS[rng.integers(len(PAIRS))]
            else:
                shape, colour = world.sample_pair(rng, domain)
            attrs.append((shape, colour, SIZES[rng.integers(2)]))
        boxes = place(rng, [a[2] for a in attrs])
        if boxes is not None:
            objs = tuple(Obj(s, c, z, b) for (s, c, z), b in zip(attrs, boxes, strict=True))
            return Scene(domain, objs, bg_seed=int(rng.integers(2**31)))


# --- rendering -------------------------------------------------------------------------


def shape_polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """The outline of ``shape`` in PIL pixel coordinates (inclusive), touching all box sides.

    Also used as the VCR ``segms`` polygon. A circle is a 16-gon.
    """
    x1, y1, x2, y2 = box
    r, b = x2 - 1, y2 - 1  # last pixel column / row inside the box
    cx, cy = (x1 + r) / 2, (y1 + b) / 2
    if shape == "square":
        return [(x1, y1), (r, y1), (r, b), (x1, b)]
    if shape == "triangle":
        return [(cx, y1), (r, b), (x1, b)]
    if shape == "diamond":
        return [(cx, y1), (r, cy), (cx, b), (x1, cy)]
    if shape == "cross":
        arm = 2 * round((x2 - x1) * 0.2)  # arm width, same parity as the side: symmetric
        a0, a1 = x1 + (x2 - x1 - arm) / 2, x1 + (x2 - x1 + arm) / 2 - 1
        b0, b1 = y1 + (y2 - y1 - arm) / 2, y1 + (y2 - y1 + arm) / 2 - 1
        return [
            (a0, y1), (a1, y1), (a1, b0), (r, b0), (r, b1), (a1, b1),
            (a1, b), (a0, b), (a0, b1), (x1, b1), (x1, b0), (a0, b0),
        ]  # fmt: skip
    if shape == "circle":
        rx, ry = (r - x1) / 2, (b - y1) / 2
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        return [(round(cx + rx * np.cos(a), 2), round(cy + ry * np.sin(a), 2)) for a in t]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, side: int, stroke: int | None) -> Image.Image:
    """A ``side``x``side`` L-mode mask of the shape; hollow with ``stroke`` px if given."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    box = (0, 0, side, side)
    if shape == "circle":
        draw.ellipse((0, 0, side - 1, side - 1), fill=255)
    else:
        draw.polygon(shape_polygon(shape, box), fill=255)
    if stroke:
        # Erode on a padded canvas so the box edge counts as outside, then keep the rim:
        # the outline then lies inside the filled footprint and the box stays exact.
        pad = Image.new("L", (side + 2, side + 2), 0)
        pad.paste(mask, (1, 1))
        inner = pad.filter(ImageFilter.MinFilter(2 * stroke + 1)).crop((1, 1, side + 1, side + 1))
        mask = Image.fromarray(
            np.where(np.asarray(inner) > 0, 0, np.asarray(mask)).astype(np.uint8)
        )
    return mask


_MASKS: dict[tuple[str, int, int | None], Image.Image] = {}


def shape_mask(shape: str, size: str, filled: bool) -> Image.Image:
    """Cached per (shape, size, fill): every object of a kind is pixel-identical."""
    side = SIDE_PX[size]
    stroke = None if filled else (2 if size == "small" else 3)
    key = (shape, side, stroke)
    if key not in _MASKS:
        _MASKS[key] = _shape_mask(shape, side, stroke)
    return _MASKS[key]


def render_background(
    style: Style, bg_seed: int, width: int = WIDTH, height: int = HEIGHT
) -> np.ndarray:
    """HxWx3 uint8 background; a pure function of (style, seed)."""
    rng = np.random.default_rng(bg_seed)
    if style.background == "plain":
        # A dark, slightly blue-grey tone with a small per-scene jitter.
        tone = np.array([22, 22, 30]) + rng.integers(-6, 7, size=3)
        return np.broadcast_to(tone.astype(np.uint8), (height, width, 3)).copy()
    # Striped: a mid-grey sinusoid at a random angle/period plus per-pixel noise. Its values
    # (roughly 40-150) overlap the darker target colours, so the object's outline, not a
    # brightness threshold, has to carry the shape.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(5, 11)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
    base = rng.uniform(70, 100) + 22 * np.sign(np.sin(phase))
    tint = rng.uniform(-8, 8, size=3)
    img = base[..., None] + tint + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(scene: Scene, style: Style | None = None) -> Image.Image:
    """The RGB image of ``scene``, drawn in ``style`` (default: the scene's domain style)."""
    style = style or STYLES[scene.domain]
    img = Image.fromarray(render_background(style, scene.bg_seed, scene.width, scene.height))
    for o in scene.objects:
        img.paste(style.palette[o.colour], o.box[:2], shape_mask(o.shape, o.size, style.filled))
    return img


def render_object(obj: Obj, style: Style, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """One object on black (for checks: its non-black pixels span exactly ``obj.box``)."""
    img = Image.new("RGB", (width, height), (0, 0, 0))
    img.paste(style.palette[obj.colour], obj.box[:2], shape_mask(obj.shape, obj.size, style.filled))
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    """Deterministic JPEG (quality 95, like the real datasets) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        # 4:4:4 chroma: at 64 px, 4:2:0 subsampling would smear a 2 px outline's colour
        # into the background and make colour questions about outlines unanswerable.
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=1)  # fast; PNG is lossless anyway
    else:
        raise ValueError(fmt)
    return buf.getvalue()
