"""The embedded default synthetic world of cliptd.

A small, fully controlled stand-in for VCR, SNLI-VE and VQA v2, written in their *real*
file formats (so the real readers load it unchanged), with two visual domains (``source``
for training, ``target`` for domain shift), box and domain files, and caption corpora for
pre-training a CLIP-like teacher and a VL-BERT-like student.

``generate_world(root, seed, scale)`` / ``python -m cliptd.synthetic --out DIR`` write it;
the renderer and vocabularies are public for reuse (probes, zero-shot checks).
"""

from cliptd.synthetic.scene import (
    COLOURS,
    DOMAINS,
    HEIGHT,
    PAIRS,
    SHAPES,
    SIDE_PX,
    SIZES,
    STYLES,
    WIDTH,
    Obj,
    Scene,
    Style,
    World,
    choose_held_out,
    encode,
    render_object,
    render_scene,
    sample_scene,
    shape_polygon,
)
from cliptd.synthetic.text import describe, region_caption
from cliptd.synthetic.world import (
    GENERATOR_VERSION,
    MANIFEST,
    generate_world,
    is_complete,
    main,
    scene_from_record,
)

__all__ = [
    "COLOURS",
    "DOMAINS",
    "GENERATOR_VERSION",
    "HEIGHT",
    "MANIFEST",
    "PAIRS",
    "SHAPES",
    "SIDE_PX",
    "SIZES",
    "STYLES",
    "WIDTH",
    "Obj",
    "Scene",
    "Style",
    "World",
    "choose_held_out",
    "describe",
    "encode",
    "generate_world",
    "is_complete",
    "main",
    "region_caption",
    "render_object",
    "render_scene",
    "sample_scene",
    "scene_from_record",
    "shape_polygon",
]
