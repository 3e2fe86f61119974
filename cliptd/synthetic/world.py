"""Write the whole synthetic world: the three task datasets in their real formats, box and
domain files, the caption corpora and ``world.json``, atomically and deterministically.

Randomness: every (task, split, domain) stream has its own ``np.random.default_rng([seed,
task, split, domain])``, so one part of the world never shifts another's draws.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cliptd.core.atomic import clean_stale
from cliptd.core.invocation import prog
from cliptd.synthetic import corpus, snli_ve, vcr, vqa
from cliptd.synthetic.plan import pack
from cliptd.synthetic.scene import (
    BASE_PALETTE,
    COLOURS,
    DOMAINS,
    HEIGHT,
    SHAPES,
    SIDE_PX,
    SIZES,
    STUDENT_UNSEEN,
    TARGET_PALETTE,
    WIDTH,
    Obj,
    Scene,
    World,
    choose_held_out,
    encode,
    render_scene,
)

# 2: the student corpus lost the STUDENT_UNSEEN colours (task files and the teacher corpus
# are those of 1, byte for byte)
GENERATOR_VERSION = "2"
MANIFEST = "world.json"

# Sizes at scale 1.0: lines (questions / hypotheses) per split and domain, scenes per corpus.
COUNTS: dict[str, dict[str, dict[str, int]]] = {
    "vcr": {
        "train": {"source": 4000},
        "val": {"source": 1000, "target": 1000},
        "test": {"source": 200, "target": 200},
    },
    "snli_ve": {
        "train": {"source": 4000},
        "dev": {"source": 1000, "target": 1000},
        "test": {"source": 200, "target": 200},
    },
    "vqa": {"train": {"source": 4000}, "val": {"source": 1000, "target": 1000}},
}
CORPUS_COUNTS = {"teacher": 10000, "student": 5000}

DOMAIN_RULES = {
    "source": "filled shapes on a plain dark background, saturated base palette; the held-out "
    "(shape, colour) pairs never appear",
    "target": "outlined shapes (2 px stroke when small, 3 px when large) on a noisy striped "
    "background, greyer shades of the same colour names; half of all objects drawn from the "
    "held-out (shape, colour) pairs",
}
TASK_RULES = {
    "vcr": "4-way Q->A and QA->R. Types (25% each): color of a referenced object, shape of the "
    "only object of a colour, count of a colour (0-3), which object is furthest left/right/"
    "up/down (answers are object references). Distractors come from the gold's own answer "
    "set; gold positions cycle 0-3. Rationales: four statements about one object differing "
    "in one visual attribute (quadrant; size x side; the colour of an uncounted object; "
    "the colour of the extreme object). train = source; val, test = both (movie "
    "synth_source / synth_target). test has no labels.",
    "snli_ve": "entailment = the hypothesis is true of the image; contradiction = the named "
    "shape+colour object is present but its size or its left/right relation to another "
    "named object is wrong; neutral = a named shape+colour object is absent. Templates "
    "'exists' and 'relation', each label 1/3 per template. train = source; dev, test = both.",
    "vqa": "kinds (25% each): what color is the <shape> (unique shape), what shape is the "
    "<colour> object (unique colour), how many <colour> objects (0-3 uniform), is there a "
    "<colour> <shape> (yes/no 50/50). 10 answers, 0-3 noisy (spelling variants or wrong). "
    "train2014 = source; val2014 = both.",
}


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _dump(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=indent)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _save_image(path: Path, scene: Scene) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(render_scene(scene), "jpeg"))


def scene_record(image: str, scene: Scene) -> str:
    """One line of ``<task>/scenes.jsonl``: the ground truth behind an image (not part of
    the real formats; for probes and checks). ``scene_from_record`` re-renders it exactly."""
    objs = [
        {"shape": o.shape, "colour": o.colour, "size": o.size, "box": list(o.box)}
        for o in scene.objects
    ]
    return _dump(
        {"image": image, "domain": scene.domain, "bg_seed": scene.bg_seed, "objects": objs}
    )


def scene_from_record(rec: dict[str, Any]) -> Scene:
    objs = tuple(Obj(o["shape"], o["colour"], o["size"], tuple(o["box"])) for o in rec["objects"])
    return Scene(rec["domain"], objs, rec["bg_seed"])


@contextmanager
def _bar(desc: str, total: int, progress: bool) -> Iterator[tqdm]:
    with tqdm(total=total, desc=desc, unit="q", disable=not progress, leave=False) as bar:
        yield bar


# --- tasks ----------------------------------------------------------------------------


def write_vcr(out: Path, world: World, seed: int, scale: float, progress: bool) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    domains: dict[str, str] = {}
    next_image = dict.fromkeys(DOMAINS, 0)  # image numbers run on across splits
    scenes: list[str] = []
    for si, split in enumerate(vcr.SPLITS):
        lines: list[str] = []
        n_images = 0
        for di, domain in enumerate(DOMAINS):
            if domain not in COUNTS["vcr"][split]:
                continue
            n = scaled(COUNTS["vcr"][split][domain], scale)
            rng = _rng(seed, 1, si, di)
            reqs = vcr.requirements(rng, world, domain)
            with _bar(f"vcr {split} {domain}", n, progress) as bar:
                for scene, qs in pack(rng, world, domain, reqs, n, lambda r: int(r.integers(1, 4))):
                    img_fn = f"synth_{domain}/{next_image[domain]:06d}.jpg"
                    next_image[domain] += 1
                    _save_image(out / "vcr1images" / img_fn, scene)
                    meta_fn = out / "vcr1images" / (img_fn[: -len(".jpg")] + ".json")
                    _write_text(meta_fn, _dump(vcr.metadata(scene, rng)))
                    domains[img_fn] = domain
                    scenes.append(scene_record(img_fn, scene))
                    for qn, q in enumerate(qs):
                        rec = vcr.record(
                            q, scene, split, len(lines), f"{split}-{n_images}", img_fn, qn, rng
                        )
                        lines.append(vcr.dumps(rec))
                    n_images += 1
                    bar.update(len(qs))
        _write_text(out / f"{split}.jsonl", "\n".join(lines) + "\n")
        counts[f"{split}.jsonl"] = {"lines": len(lines), "images": n_images}
    _write_text(out / "domains.json", _dump(domains))
    _write_text(out / "scenes.jsonl", "\n".join(scenes) + "\n")
    return counts


def write_snli_ve(
    out: Path, world: World, seed: int, scale: float, progress: bool
) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    domains: dict[str, str] = {}
    boxes: dict[str, list[list[float]]] = {}
    scenes: list[str] = []
    next_id = 1000000000  # 10-digit ids, like Flickr's
    for si, split in enumerate(snli_ve.SPLITS):
        lines: list[str] = []
        n_images = 0
        for di, domain in enumerate(DOMAINS):
            if domain not in COUNTS["snli_ve"][split]:
                continue
            n = scaled(COUNTS["snli_ve"][split][domain], scale)
            rng = _rng(seed, 2, si, di)
            reqs = snli_ve.requirements(rng, world, domain)
            with _bar(f"snli_ve {split} {domain}", n, progress) as bar:
                for scene, hyps in pack(
                    rng, world, domain, reqs, n, lambda r: int(r.integers(2, 5))
                ):
                    image = f"{next_id}.jpg"
                    next_id += 1
                    _save_image(out / "flickr30k_images" / image, scene)
                    domains[image] = domain
                    boxes[image] = [[float(v) for v in o.box] for o in scene.objects]
                    scenes.append(scene_record(image, scene))
                    lines += [_dump(r) for r in snli_ve.records(scene, hyps, image, split, rng)]
                    n_images += 1
                    bar.update(len(hyps))
        _write_text(out / f"snli_ve_{split}.jsonl", "\n".join(lines) + "\n")
        counts[f"snli_ve_{split}.jsonl"] = {"lines": len(lines), "images": n_images}
    _write_text(out / "domains.json", _dump(domains))
    _write_text(out / "boxes.json", _dump(boxes))
    _write_text(out / "scenes.jsonl", "\n".join(scenes) + "\n")
    return counts


def write_vqa(out: Path, world: World, seed: int, scale: float, progress: bool) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    domains: dict[str, str] = {}
    boxes: dict[str, list[list[float]]] = {}
    scenes: list[str] = []
    for si, split in enumerate(("train", "val")):
        coco_split = f"{split}2014"
        questions: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        image_id = 1 + si * 500000  # distinct id ranges per split, as in COCO
        n_images = 0
        for di, domain in enumerate(DOMAINS):
            if domain not in COUNTS["vqa"][split]:
                continue
            n = scaled(COUNTS["vqa"][split][domain], scale)
            rng = _rng(seed, 3, si, di)
            reqs = vqa.requirements(rng, world, domain)
            with _bar(f"vqa {split} {domain}", n, progress) as bar:
                for scene, qs in pack(rng, world, domain, reqs, n, lambda r: int(r.integers(1, 6))):
                    image = vqa.image_path(coco_split, image_id)
                    _save_image(out / image, scene)
                    domains[image] = domain
                    boxes[image] = [[float(v) for v in o.box] for o in scene.objects]
                    scenes.append(scene_record(image, scene))
                    qe, ae = vqa.entries(scene, qs, image_id, coco_split, rng)
                    questions += qe
                    annotations += ae
                    image_id += 1
                    n_images += 1
                    bar.update(len(qs))
        q_name = f"v2_OpenEnded_mscoco_{coco_split}_questions.json"
        a_name = f"v2_mscoco_{coco_split}_annotations.json"
        _write_text(out / q_name, _dump(vqa.document(coco_split, "questions", questions)))
        _write_text(out / a_name, _dump(vqa.document(coco_split, "annotations", annotations)))
        counts[q_name] = {"questions": len(questions), "images": n_images}
        counts[a_name] = {"annotations": len(annotations)}
    _write_text(out / "domains.json", _dump(domains))
    _write_text(out / "boxes.json", _dump(boxes))
    _write_text(out / "scenes.jsonl", "\n".join(scenes) + "\n")
    return counts


def write_corpora(
    out: Path, world: World, seed: int, scale: float, progress: bool
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for ci, (name, n) in enumerate(CORPUS_COUNTS.items()):
        n = scaled(n, scale)
        with tqdm(
            total=n, desc=f"corpus {name}", unit="img", disable=not progress, leave=False
        ) as bar:
            summary[f"{name}.parquet"] = corpus.write(
                out / f"{name}.parquet",
                _rng(seed, 4, ci),
                world,
                n,
                teacher=name == "teacher",
                bar=bar,
            )
    return summary


# --- the world, atomically -------------------------------------------------------------


def _manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(root: Path, seed: int, scale: float) -> bool:
    """Whether ``root`` holds a finished world of this seed, scale and generator version."""
    m = _manifest(root)
    return (
        m is not None
        and m.get("generator_version") == GENERATOR_VERSION
        and m.get("seed") == seed
        and m.get("scale") == scale
    )


def build(out: Path, seed: int, scale: float, progress: bool) -> dict[str, Any]:
    """Write every file of the world into ``out`` (non-atomic; see ``generate_world``)."""
    t0 = time.perf_counter()
    world = World.from_held_out(choose_held_out(_rng(seed, 0)))
    timing: dict[str, float] = {}
    files: dict[str, Any] = {}
    for name, writer, sub in (
        ("vcr", write_vcr, "vcr"),
        ("snli_ve", write_snli_ve, "snli_ve"),
        ("vqa", write_vqa, "vqa"),
        ("corpus", write_corpora, "corpus"),
    ):
        t = time.perf_counter()
        for fname, c in writer(out / sub, world, seed, scale, progress).items():
            files[f"{sub}/{fname}"] = c
        timing[name] = round(time.perf_counter() - t, 3)
    timing["total"] = round(time.perf_counter() - t0, 3)
    manifest = {
        "generator": "cliptd.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "scale": scale,
        "image_size": [WIDTH, HEIGHT],
        "vocabulary": {
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "sizes": {z: SIDE_PX[z] for z in SIZES},
        },
        "palettes": {"source": BASE_PALETTE, "target": TARGET_PALETTE},
        "held_out_pairs": [list(p) for p in world.held_out],
        "student_unseen_colours": list(STUDENT_UNSEEN),
        "domain_rules": DOMAIN_RULES,
        "task_rules": TASK_RULES,
        "files": files,
        "extras": "<task>/scenes.jsonl holds each image's ground truth (shape, colour, size, "
        "box per object, background seed; scene_from_record re-renders it); not a real-format file",
        # The only field that differs between two runs of the same seed and scale.
        "timing_s": timing,
    }
    _write_text(out / MANIFEST, _dump(manifest, indent=2) + "\n")
    return manifest


def generate_world(
    root: Path | str,
    seed: int = 0,
    scale: float = 1.0,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Generate the synthetic world under ``root`` (or reuse a complete one) and return it.

    Built in ``<root>.tmp-<pid>`` and moved into place with one ``os.replace``: ``root``
    either does not exist or is complete. A ``root`` holding something else is an error
    unless ``overwrite``.
    """
    root = Path(root)
    if is_complete(root, seed, scale):
        return root
    if root.exists() and any(root.iterdir()) and not overwrite:
        m = _manifest(root)
        what = f"a world of seed={m.get('seed')} scale={m.get('scale')}" if m else "other files"
        raise FileExistsError(
            f"{root} holds {what}; pass overwrite=True (--overwrite) to replace it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = build(tmp, seed, scale, progress)
        if is_complete(root, seed, scale):
            return root  # another generator finished the same world meanwhile: keep it
        old = root.with_name(f"{root.name}.old-{os.getpid()}")
        if root.exists():
            os.replace(root, old)  # a directory cannot be renamed over a non-empty one
        try:
            os.replace(tmp, root)
        except OSError:
            if not is_complete(root, seed, scale):  # not a race lost to another generator
                if old.exists() and not root.exists():
                    os.replace(old, root)
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        t = manifest["timing_s"]
        print(
            f"synthetic world seed={seed} scale={scale} -> {root} in {t['total']:.1f} s "
            f"(vcr {t['vcr']:.1f}, snli_ve {t['snli_ve']:.1f}, vqa {t['vqa']:.1f}, corpus {t['corpus']:.1f})",
            file=sys.stderr,
        )
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("cliptd.synthetic"),
        description="Write cliptd's synthetic world (VCR, SNLI-VE, VQA v2 formats + corpora).",
    )
    p.add_argument("--out", required=True, type=Path, help="the world's folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every count")
    p.add_argument("--overwrite", action="store_true", help="replace a different world in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    root = generate_world(
        args.out, args.seed, args.scale, progress=not args.no_progress, overwrite=args.overwrite
    )
    print(root)
    return 0
