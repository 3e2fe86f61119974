"""The synthetic world: formats, determinism, geometry, balance, text-only chance, atomicity."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cliptd.synthetic.corpus import attribute_groups
from cliptd.synthetic.scene import (
    COLOURS,
    PAIRS,
    SHAPES,
    SIZES,
    STUDENT_UNSEEN,
    STYLES,
    Obj,
    render_object,
    render_scene,
    sample_scene,
)
from cliptd.synthetic.world import generate_world, is_complete, scene_from_record

SCALE = 0.25  # 1,000 training questions per task: enough for the balance statistics
TINY = 0.02


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(
        tmp_path_factory.mktemp("synth") / "world", seed=0, scale=SCALE, progress=False
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scenes(world: Path, task: str) -> dict[str, dict]:
    return {r["image"]: r for r in _jsonl(world / task / "scenes.jsonl")}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- manifest and reuse ------------------------------------------------------------------


def test_manifest_and_reuse(world: Path) -> None:
    m = json.loads((world / "world.json").read_text())
    assert (m["seed"], m["scale"]) == (0, SCALE)
    assert len(m["held_out_pairs"]) == 10 and all(tuple(p) in PAIRS for p in m["held_out_pairs"])
    assert m["files"]["vcr/train.jsonl"]["lines"] == 1000
    assert m["files"]["vcr/val.jsonl"]["lines"] == 500
    assert m["files"]["corpus/teacher.parquet"]["rows"] == 2500
    assert set(m["timing_s"]) >= {"vcr", "snli_ve", "vqa", "corpus", "total"}
    stamp = (world / "world.json").stat().st_mtime_ns
    assert generate_world(world, seed=0, scale=SCALE, progress=False) == world  # reused
    assert (world / "world.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        generate_world(world, seed=1, scale=SCALE, progress=False)


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = _tree(generate_world(tmp_path / "a", seed=3, scale=TINY, progress=False))
    b = _tree(generate_world(tmp_path / "b", seed=3, scale=TINY, progress=False))
    c = _tree(generate_world(tmp_path / "c", seed=4, scale=TINY, progress=False))
    assert a.keys() == b.keys()
    for name in a:
        if name == "world.json":  # timing_s is the one field allowed to differ
            ma, mb = (json.loads(t[name]) for t in (a, b))
            ma.pop("timing_s"), mb.pop("timing_s")
            assert ma == mb
        else:
            assert a[name] == b[name], name
    assert a["vcr/train.jsonl"] != c["vcr/train.jsonl"]


# --- formats -----------------------------------------------------------------------------

VCR_FIELDS = {
    "movie", "objects", "interesting_scores", "answer_likelihood", "img_fn", "metadata_fn",
    "answer_orig", "question_orig", "rationale_orig", "question", "answer_choices",
    "answer_label", "rationale_choices", "rationale_label", "img_id", "question_number",
    "annot_id",
}  # fmt: skip


def _check_tokens(tokens: list, n_objects: int) -> None:
    assert tokens and isinstance(tokens, list)
    for t in tokens:
        if not isinstance(t, str):
            assert (
                isinstance(t, list) and t and all(type(i) is int and 0 <= i < n_objects for i in t)
            )


def test_vcr_format(world: Path) -> None:
    domains = json.loads((world / "vcr/domains.json").read_text())
    for split in ("train", "val", "test"):
        recs = _jsonl(world / "vcr" / f"{split}.jsonl")
        movies = Counter(r["movie"] for r in recs)
        assert set(movies) == (
            {"synth_source"} if split == "train" else {"synth_source", "synth_target"}
        )
        for r in recs:
            missing = VCR_FIELDS - set(r)
            if split == "test":  # the real test set hides labels (and the *_orig text)
                assert missing == {
                    "answer_label",
                    "rationale_label",
                    "answer_orig",
                    "rationale_orig",
                }
            else:
                assert not missing
                assert type(r["answer_label"]) is int and 0 <= r["answer_label"] < 4
                assert type(r["rationale_label"]) is int and 0 <= r["rationale_label"] < 4
            assert r["annot_id"].startswith(f"{split}-") and r["img_id"].startswith(f"{split}-")
            assert r["img_fn"].startswith(r["movie"] + "/") and r["img_fn"].endswith(".jpg")
            assert r["metadata_fn"] == r["img_fn"][:-4] + ".json"
            assert domains[r["img_fn"]] == r["movie"].removeprefix("synth_")
            n = len(r["objects"])
            assert 2 <= n <= 5 and set(r["objects"]) <= set(SHAPES)
            assert len(r["answer_choices"]) == 4 and len(r["rationale_choices"]) == 4
            for toks in [r["question"], *r["answer_choices"], *r["rationale_choices"]]:
                _check_tokens(toks, n)
            assert isinstance(r["question_number"], int) and isinstance(
                r["interesting_scores"], list
            )
    meta = json.loads((world / "vcr/vcr1images" / recs[0]["metadata_fn"]).read_text())
    assert set(meta) == {"boxes", "segms", "names", "width", "height"}
    assert meta["names"] == recs[0]["objects"] and (meta["width"], meta["height"]) == (64, 64)
    assert all(len(b) == 5 for b in meta["boxes"]) and len(meta["segms"]) == len(meta["names"])
    assert all(isinstance(p[0][0], list) and len(p[0][0]) == 2 for p in meta["segms"])
    with Image.open(world / "vcr/vcr1images" / recs[0]["img_fn"]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))


def test_snli_ve_format(world: Path) -> None:
    fields = {
        "Flikr30kID",
        "sentence1",
        "sentence2",
        "gold_label",
        "pairID",
        "captionID",
        "annotator_labels",
    }
    domains = json.loads((world / "snli_ve/domains.json").read_text())
    boxes = json.loads((world / "snli_ve/boxes.json").read_text())
    for split in ("train", "dev", "test"):
        recs = _jsonl(world / "snli_ve" / f"snli_ve_{split}.jsonl")
        assert len({r["pairID"] for r in recs}) == len(recs)
        seen = set()
        for r in recs:
            assert fields <= set(r) and all(
                isinstance(r[k], str) for k in fields - {"annotator_labels"}
            )
            assert r["gold_label"] in ("entailment", "neutral", "contradiction")
            labels = r["annotator_labels"]
            assert len(labels) == (1 if split == "train" else 5)
            assert Counter(labels).most_common(1)[0][0] == r["gold_label"]
            assert (
                r["Flikr30kID"].endswith(".jpg")
                and (world / "snli_ve/flickr30k_images" / r["Flikr30kID"]).is_file()
            )
            assert r["captionID"].startswith(r["Flikr30kID"] + "#") and r["pairID"].startswith(
                r["captionID"]
            )
            assert r["Flikr30kID"] in boxes
            seen.add(domains[r["Flikr30kID"]])
        assert seen == ({"source"} if split == "train" else {"source", "target"})


def test_vqa_format(world: Path) -> None:
    domains = json.loads((world / "vqa/domains.json").read_text())
    boxes = json.loads((world / "vqa/boxes.json").read_text())
    for split in ("train", "val"):
        qs = json.loads((world / f"vqa/v2_OpenEnded_mscoco_{split}2014_questions.json").read_text())
        an = json.loads((world / f"vqa/v2_mscoco_{split}2014_annotations.json").read_text())
        assert {"info", "license", "data_subtype", "task_type", "data_type", "questions"} <= set(qs)
        assert (qs["data_subtype"], qs["task_type"], qs["data_type"]) == (
            f"{split}2014",
            "Open-Ended",
            "mscoco",
        )
        assert {"info", "license", "data_subtype", "annotations"} <= set(an)
        assert len(qs["questions"]) == len(an["annotations"])
        seen = set()
        for q, a in zip(qs["questions"], an["annotations"], strict=True):
            assert (
                set(q) == {"image_id", "question", "question_id"} and type(q["question_id"]) is int
            )
            assert {
                "question_id",
                "image_id",
                "question_type",
                "answer_type",
                "multiple_choice_answer",
                "answers",
            } <= set(a)
            assert a["question_id"] == q["question_id"] and a["image_id"] == q["image_id"]
            assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(
                range(1, 11)
            )
            assert all(x["answer_confidence"] in ("yes", "maybe", "no") for x in a["answers"])
            assert sum(x["answer"] == a["multiple_choice_answer"] for x in a["answers"]) >= 7
            image = f"{split}2014/COCO_{split}2014_{q['image_id']:012d}.jpg"
            assert (world / "vqa" / image).is_file() and image in boxes
            seen.add(domains[image])
        assert seen == ({"source"} if split == "train" else {"source", "target"})
        raw = {x["answer"] for a in an["annotations"] for x in a["answers"]}
        assert (
            raw & {"Red", "red.", "two", "Yes"} or split == "val"
        )  # spellings that need normalising


def test_corpora(world: Path) -> None:
    held = {tuple(p) for p in json.loads((world / "world.json").read_text())["held_out_pairs"]}
    for name, domains in (("teacher", {"source", "target"}), ("student", {"source"})):
        t = pq.read_table(world / "corpus" / f"{name}.parquet")
        assert t.schema.names == [
            "image_png",
            "width",
            "height",
            "boxes",
            "region_captions",
            "captions",
            "domain",
        ]
        assert str(t.schema.field("width").type) == "int32"
        assert str(t.schema.field("boxes").type) == "list<element: list<element: float>>"
        rows = t.slice(0, 200).to_pylist()
        assert set(t.column("domain").to_pylist()) == domains
        pairs = set()
        for r in t.select(["region_captions"]).to_pylist():
            pairs |= {(c.split()[-1], c.split()[-2]) for c in r["region_captions"]}
        assert (held <= pairs) if name == "teacher" else not (held & pairs)
        for r in rows[:20]:
            with Image.open(io.BytesIO(r["image_png"])) as im:
                assert (im.format, im.size) == ("PNG", (r["width"], r["height"]))
            assert len(r["boxes"]) == len(r["region_captions"]) and len(r["captions"]) >= 3



def test_student_corpus_never_shows_the_unseen_colours(world: Path) -> None:
    """The knowledge split of the two corpora: STUDENT_UNSEEN colours are absent from every
    object and word of the student's corpus, present in the teacher's and in the task's
    training images, and the student's label vocabulary read off its corpus lacks them."""
    unseen = set(json.loads((world / "world.json").read_text())["student_unseen_colours"])
    assert unseen == set(STUDENT_UNSEEN)

    def words(name: str) -> set[str]:
        t = pq.read_table(world / "corpus" / f"{name}.parquet",
                          columns=["region_captions", "captions"]).to_pylist()
        return {w for r in t for c in r["region_captions"] + r["captions"] for w in c.split()}

    assert not words("student") & unseen
    assert unseen <= words("teacher")
    for task in ("vcr", "snli_ve", "vqa"):
        train = [rec for rec in _scenes(world, task).values() if rec["domain"] == "source"]
        shown = {o["colour"] for rec in train for o in rec["objects"]}
        assert unseen <= shown, task
    groups = attribute_groups(world / "corpus" / "student.parquet")
    assert not set(groups[0]) & unseen and set(groups[0]) | unseen == set(COLOURS)
    assert groups[1:] == attribute_groups()[1:]

# --- geometry ----------------------------------------------------------------------------


def test_every_shape_fills_its_box_exactly() -> None:
    for domain, style in STYLES.items():
        for shape in SHAPES:
            for size, side in (("small", 12), ("large", 20)):
                o = Obj(shape, "red", size, (7, 11, 7 + side, 11 + side))
                ys, xs = np.nonzero(np.asarray(render_object(o, style)).max(-1))
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box, (
                    domain,
                    shape,
                    size,
                )


def test_boxes_match_the_drawn_objects(world: Path) -> None:
    scenes = _scenes(world, "vcr")
    for img_fn, rec in list(scenes.items())[:150]:
        scene = scene_from_record(rec)
        assert render_scene(scene).size == (64, 64)
        boxes = [o.box for o in scene.objects]
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            for bx in boxes[i + 1 :]:  # non-overlapping
                assert x2 <= bx[0] or bx[2] <= x1 or y2 <= bx[1] or bx[3] <= y1
        with Image.open(world / "vcr/vcr1images" / img_fn) as im:
            pix = np.asarray(im.convert("RGB")).astype(int)
        exact = np.asarray(render_scene(scene)).astype(int)
        assert np.abs(pix - exact).mean() < 4  # the JPEG is the rendered scene
        if rec["domain"] == "source":  # bright objects on dark: check the JPEG's pixels too
            bright = pix.max(-1) > 110
            outside = np.ones((64, 64), bool)
            for x1, y1, x2, y2 in boxes:
                outside[max(0, y1 - 1) : y2 + 1, max(0, x1 - 1) : x2 + 1] = False
                box = bright[y1:y2, x1:x2]
                assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            assert not bright[outside].any()
    # The VCR metadata boxes are the scene boxes.
    rec = _jsonl(world / "vcr/train.jsonl")[0]
    meta = json.loads((world / "vcr/vcr1images" / rec["metadata_fn"]).read_text())
    assert [b[:4] for b in meta["boxes"]] == [o["box"] for o in scenes[rec["img_fn"]]["objects"]]


def test_held_out_pairs_only_in_target(world: Path) -> None:
    held = {tuple(p) for p in json.loads((world / "world.json").read_text())["held_out_pairs"]}
    assert Counter(s for s, _ in held) == dict.fromkeys(SHAPES, 2)
    for task in ("vcr", "snli_ve", "vqa"):
        in_domain: dict[str, Counter] = {"source": Counter(), "target": Counter()}
        for rec in _scenes(world, task).values():
            in_domain[rec["domain"]].update(
                (o["shape"], o["colour"]) in held for o in rec["objects"]
            )
        assert in_domain["source"][True] == 0, task
        assert in_domain["target"][True] > 0.3 * sum(in_domain["target"].values()), task


def test_sample_scene_api() -> None:
    rng = np.random.default_rng(0)
    for domain in ("source", "target"):
        s = sample_scene(rng, domain)
        assert 2 <= len(s.objects) <= 5 and all(
            o.size in SIZES and o.colour in COLOURS for o in s.objects
        )
        assert render_scene(s).mode == "RGB"


# --- balance and text-only chance --------------------------------------------------------


def _chi2_uniform(counts: Counter, k: int) -> float:
    n = sum(counts.values())
    return sum((counts.get(i, 0) - n / k) ** 2 / (n / k) for i in range(k))


def test_vcr_answers_balanced(world: Path) -> None:
    recs = _jsonl(world / "vcr/train.jsonl")
    # Gold positions cycle in blocks of 4: (near-)exact uniformity.
    for key in ("answer_label", "rationale_label"):
        counts = Counter(r[key] for r in recs)
        assert max(counts.values()) - min(counts.values()) <= 8, (key, counts)
    types = Counter(r["question_type"] for r in recs)
    assert max(types.values()) - min(types.values()) <= 4, types
    gold: dict[str, Counter] = {t: Counter() for t in types}
    for r in recs:
        gold[r["question_type"]][" ".join(map(str, r["answer_choices"][r["answer_label"]]))] += 1
    assert (
        len(gold["count"]) == 4
        and _chi2_uniform(Counter(dict(enumerate(gold["count"].values()))), 4) < 8
    )
    assert len(gold["shape"]) == 5 and min(gold["shape"].values()) > 0.5 * 250 / 5
    assert len(gold["color"]) == 8 and min(gold["color"].values()) > 0.5 * 250 / 8


def test_snli_ve_and_vqa_balanced(world: Path) -> None:
    recs = _jsonl(world / "snli_ve/snli_ve_train.jsonl")
    by_template = Counter((r["template"], r["gold_label"]) for r in recs)
    assert len(by_template) == 6 and max(by_template.values()) - min(by_template.values()) <= 6
    an = json.loads((world / "vqa/v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    by_type: dict[str, Counter] = {}
    for a in an:
        by_type.setdefault(a["question_type"], Counter())[a["multiple_choice_answer"]] += 1
    assert set(by_type["how many"]) == {"0", "1", "2", "3"} and set(by_type["is there a"]) == {
        "yes",
        "no",
    }
    for t in ("how many", "is there a"):
        assert max(by_type[t].values()) - min(by_type[t].values()) <= 4, by_type[t]


def _words(tokens: list, objects: list[str]) -> list[str]:
    return [
        w for t in tokens for w in ([t.lower()] if isinstance(t, str) else [objects[i] for i in t])
    ]


def _fit_predict(
    train: list[list[list[str]]], ytrain: np.ndarray, test: list[list[list[str]]]
) -> np.ndarray:
    """Multinomial logistic regression over sparse features; one row per candidate.

    ``train[n][k]`` are the feature strings of candidate k of instance n; the score of a
    candidate is the sum of its feature weights, softmax over the candidates (full-batch Adam).
    """
    vocab: dict[str, int] = {}

    def index(data: list[list[list[str]]], grow: bool) -> tuple[np.ndarray, np.ndarray, int]:
        fid, rid, r = [], [], 0
        for inst in data:
            for feats in inst:
                for f in feats:
                    if f not in vocab and grow:
                        vocab[f] = len(vocab)
                    if f in vocab:
                        fid.append(vocab[f])
                        rid.append(r)
                r += 1
        return np.array(fid), np.array(rid), r

    k = len(train[0])
    fid, rid, rows = index(train, True)
    n = rows // k
    w, m, v = (np.zeros(len(vocab)) for _ in range(3))
    y = np.eye(k)[ytrain]
    for t in range(1, 301):
        s = np.bincount(rid, weights=w[fid], minlength=rows).reshape(n, k)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = np.bincount(fid, weights=((p - y) / n).reshape(-1)[rid], minlength=len(w)) + 1e-3 * w
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        w -= 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    fid, rid, rows = index(test, False)
    return np.bincount(rid, weights=w[fid], minlength=rows).reshape(rows // k, k).argmax(1)


def _vcr_text_only(world: Path, rationale: bool) -> float:
    def data(split: str) -> tuple[list, np.ndarray]:
        xs, ys = [], []
        for r in _jsonl(world / "vcr" / f"{split}.jsonl"):
            if r["movie"] != "synth_source":
                continue
            q = _words(r["question"], r["objects"])
            cands, label = r["answer_choices"], r["answer_label"]
            if rationale:  # QA->R: the query is the question plus the gold answer
                q += _words(cands[label], r["objects"])
                cands, label = r["rationale_choices"], r["rationale_label"]
            inst = []
            for c in cands:
                cw = _words(c, r["objects"])
                # Bag of words of the candidate plus (question word, candidate word) pairs, so
                # the model can also exploit question-answer co-occurrence, not just priors.
                inst.append(
                    [f"c:{w}" for w in cw] + [f"x:{a}|{b}" for a in set(q) for b in set(cw)]
                )
            xs.append(inst)
            ys.append(label)
        return xs, np.array(ys)

    xtr, ytr = data("train")
    xva, yva = data("val")
    return float((_fit_predict(xtr, ytr, xva) == yva).mean())


@pytest.mark.parametrize("rationale", [False, True], ids=["Q->A", "QA->R"])
def test_vcr_text_only_is_near_chance(world: Path, rationale: bool) -> None:
    acc = _vcr_text_only(world, rationale)
    print(f"text-only VCR {'QA->R' if rationale else 'Q->A'} val-source accuracy {acc:.3f}")
    assert acc < 0.35


def test_snli_ve_hypothesis_only_is_near_chance(world: Path) -> None:
    labels = ("entailment", "neutral", "contradiction")

    def data(split: str) -> tuple[list, np.ndarray]:
        domains = json.loads((world / "snli_ve/domains.json").read_text())
        xs, ys = [], []
        for r in _jsonl(world / "snli_ve" / f"snli_ve_{split}.jsonl"):
            if domains[r["Flikr30kID"]] == "source":
                ws = r["sentence2"].lower().split()
                xs.append([[f"{lab}:{w}" for w in ws] for lab in labels])
                ys.append(labels.index(r["gold_label"]))
        return xs, np.array(ys)

    xtr, ytr = data("train")
    xva, yva = data("dev")
    acc = float((_fit_predict(xtr, ytr, xva) == yva).mean())
    print(f"hypothesis-only SNLI-VE dev-source accuracy {acc:.3f}")
    assert acc < 0.45  # chance 1/3; 250 dev items give a std of 3 points


def test_domain_shift_is_measurable(world: Path) -> None:
    """A colour classifier on box crops, fitted on source, drops on target."""

    def crops(task: str, domain: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for rec in _scenes(world, task).values():
            if rec["domain"] != domain:
                continue
            img = np.asarray(render_scene(scene_from_record(rec))).astype(float)
            for o in rec["objects"]:
                x1, y1, x2, y2 = o["box"]
                xs.append(img[y1:y2, x1:x2].reshape(-1, 3).mean(0))
                ys.append(COLOURS.index(o["colour"]))
        return np.array(xs), np.array(ys)

    xs, ys = crops("vcr", "source")
    centroids = np.stack([xs[ys == c].mean(0) for c in range(len(COLOURS))])

    def acc(x: np.ndarray, y: np.ndarray) -> float:
        return float((np.linalg.norm(x[:, None] - centroids[None], axis=-1).argmin(1) == y).mean())

    src, tgt = acc(*crops("vqa", "source")), acc(*crops("vqa", "target"))
    print(f"nearest-centroid colour on box crops: source {src:.3f}, target {tgt:.3f}")
    assert src > 0.9 and tgt < src - 0.2


# --- atomic writes -------------------------------------------------------------------------


def test_killed_generation_leaves_no_world(tmp_path: Path) -> None:
    out = tmp_path / "world"
    # Kill the generator with SIGKILL halfway (after VCR and SNLI-VE, inside VQA): no
    # cleanup code can run, exactly like an OOM kill or a pulled plug.
    script = (
        "import os, signal, sys\n"
        "import cliptd.synthetic.world as w\n"
        "w.write_vqa = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"w.generate_world({str(out)!r}, seed=0, scale={TINY}, progress=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ}, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not out.exists()
    leftovers = list(tmp_path.glob("world.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "vcr/train.jsonl").is_file()
    assert not is_complete(leftovers[0], 0, TINY)  # a half world is never taken for a whole one
    generate_world(out, seed=0, scale=TINY, progress=False)
    assert is_complete(out, 0, TINY) and not list(tmp_path.glob("world.tmp-*"))


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "cliptd.synthetic",
        "--out",
        str(out),
        "--scale",
        str(TINY),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and is_complete(out, 0, TINY)
