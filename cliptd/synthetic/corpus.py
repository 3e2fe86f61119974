"""Image-caption corpora for pre-training the teacher (broad) and the student (narrow).

- ``teacher``: like CLIP's web data: both domain styles, every shape x colour x size
  combination (the held-out pairs included, in both styles).
- ``student``: like a VL-BERT caption corpus: source domain only, held-out pairs absent,
  no object of a ``STUDENT_UNSEEN`` colour (nor its word, in any caption), half as many
  scenes.

Besides region and whole-image captions, every scene carries question-and-answer alt-text
in the exact space-tokenised style the VCR / VQA / SNLI-VE files use, so that a teacher
scoring "question + answer" strings sees familiar text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cliptd.synthetic.scene import (
    COLOURS,
    DOMAINS,
    Scene,
    World,
    encode,
    render_scene,
    sample_scene,
)
from cliptd.synthetic.text import (
    EXTREMES,
    NUMBER_WORDS,
    article,
    extreme,
    region_caption,
    scene_caption,
)

SCHEMA = pa.schema(
    [
        pa.field("image_png", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("boxes", pa.list_(pa.list_(pa.float32()))),
        pa.field("region_captions", pa.list_(pa.string())),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("domain", pa.string()),
    ]
)
COUNT_WORDS = ("There are none .", "There is one .", "There are two .", "There are three .")


def qa_texts(scene: Scene, rng: np.random.Generator,
             colours: tuple[str, ...] = COLOURS) -> list[str]:
    """True question-and-answer strings about ``scene``: one VCR-style, one VQA-style.
    ``colours``: those the corpus may name (a count of zero names a colour not shown)."""
    objs = scene.objects
    o = objs[rng.integers(len(objs))]
    colour_count = {c: sum(x.colour == c for x in objs) for c in COLOURS}
    shape_count = {s: sum(x.shape == s for x in objs) for s in {x.shape for x in objs}}
    unique_colour = [x for x in objs if colour_count[x.colour] == 1]
    unique_shape = [x for x in objs if shape_count[x.shape] == 1]
    c = colours[rng.integers(len(colours))]
    k = colour_count[c]

    vcr = [f"What color is {o.shape} ? It is {o.colour} ."]  # a reference renders as its shape
    if unique_colour:
        u = unique_colour[rng.integers(len(unique_colour))]
        vcr.append(f"What shape is the {u.colour} thing ? It is a {u.shape} .")
    if k <= 3:
        vcr.append(f"How many {c} things are there ? {COUNT_WORDS[k]}")
    direction = list(EXTREMES)[rng.integers(len(EXTREMES))]
    g = extreme(scene, direction)
    if g is not None:
        vcr.append(f"Which object is {' '.join(EXTREMES[direction][0])} ? The {objs[g].shape} .")

    vqa = [f"how many {c} objects are there ? {k}", f"is there {article(o.colour)} {o.shape} ? yes"]
    if unique_shape:
        u = unique_shape[rng.integers(len(unique_shape))]
        vqa.append(f"what color is the {u.shape} ? {u.colour}")
    if unique_colour:
        u = unique_colour[rng.integers(len(unique_colour))]
        vqa.append(f"what shape is the {u.colour} object ? {u.shape}")
    return [vcr[rng.integers(len(vcr))], vqa[rng.integers(len(vqa))]]


def captions(scene: Scene, rng: np.random.Generator,
             colours: tuple[str, ...] = COLOURS) -> list[str]:
    o = scene.objects[rng.integers(len(scene.objects))]
    return [
        scene_caption(scene, full=True),
        scene_caption(scene, full=False),
        *qa_texts(scene, rng, colours),
        f"There is a {o.size} {o.colour} {o.shape} .",  # SNLI-VE hypothesis style
        f"{NUMBER_WORDS[len(scene.objects)]} shapes on a {'dark' if scene.domain == 'source' else 'striped'} background",
    ]


def rows(
    rng: np.random.Generator, world: World | None, n: int, domains: tuple[str, ...]
) -> Iterator[dict[str, Any]]:
    colours = COLOURS if world is None else world.colours
    for _ in range(n):
        domain = domains[rng.integers(len(domains))]
        scene = sample_scene(rng, domain, world)
        yield {
            "image_png": encode(render_scene(scene), "png"),
            "width": scene.width,
            "height": scene.height,
            "boxes": [[float(v) for v in o.box] for o in scene.objects],
            "region_captions": [region_caption(o, domain) for o in scene.objects],
            "captions": captions(scene, rng, colours),
            "domain": domain,
        }


def write(
    path: Path, rng: np.random.Generator, world: World | None, n: int, teacher: bool, bar: Any
) -> dict[str, Any]:
    """Write one corpus; returns its summary for world.json (rows, attribute coverage)."""
    domains = DOMAINS if teacher else ("source",)
    seen: set[tuple[str, str, str, str]] = set()
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for row in rows(rng, None if teacher else world.for_student(), n, domains):
            for cap in row["region_captions"]:
                words = cap.split()  # "a small [outlined] red circle"
                seen.add((row["domain"], words[1], words[-2], words[-1]))
            batch.append(row)
            if len(batch) == 1000:
                writer.write_table(pa.Table.from_pylist(batch, SCHEMA))
                batch = []
            bar.update(1)
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, SCHEMA))
    per_domain = {d: sum(1 for s in seen if s[0] == d) for d in domains}
    return {"rows": n, "domains": list(domains), "shape_colour_size_combinations": per_domain}


def attribute_groups(corpus: Path | None = None) -> tuple[tuple[str, ...], ...]:
    """The region label vocabularies (colour, shape, size): the synthetic world's, or, given
    a ``corpus``, the words of them its region captions use -- a model pre-trained on it
    learns no label (and no statement names a colour) that the corpus never shows, as a
    real caption corpus's labels are its detector's object and attribute classes."""
    from cliptd.synthetic.scene import SHAPES, SIZES

    groups = (tuple(COLOURS), tuple(SHAPES), tuple(SIZES))
    if corpus is None:
        return groups
    captions = pq.read_table(corpus, columns=["region_captions"]).column("region_captions")
    used = {w for caps in captions.to_pylist() for c in caps for w in c.split()}
    return tuple(tuple(w for w in g if w in used) for g in groups)
