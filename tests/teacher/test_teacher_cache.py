"""The teacher cache on the tiny synthetic world: contents, resumable building, keys, and
the collated batch the Distiller reads from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cliptd.data.prepare import load_manifest, read_split
from cliptd.data.problems import HEADS, problems_from_table
from cliptd.teacher import cache as teacher_cache
from cliptd.teacher.cache import build_cache, cache_key, load_cache
from cliptd.teacher.clip import Teacher


@pytest.fixture(scope="module")
def vcr(tiny_world):
    folder = tiny_world.data["vcr"]
    manifest = load_manifest(folder)
    table = read_split(folder, "train")
    problems = problems_from_table("vcr", table, Path(manifest["image_root"]))
    return {"folder": folder, "manifest": manifest, "table": table, "problems": problems}


@pytest.fixture(scope="module")
def teacher(tiny_world):
    return Teacher.load(tiny_world.teacher)


@pytest.fixture(scope="module")
def built(tiny_world, vcr, teacher, tmp_path_factory):
    """The VCR train cache, built as ``cliptd.teacher.cache.ensure_cache`` builds it for the embedded world."""
    key = cache_key(teacher.fingerprint(), vcr["manifest"]["version"], "train", "vcr")
    root = tmp_path_factory.mktemp("teacher_cache")
    folder = build_cache(teacher, "vcr", vcr["problems"], root, key, progress=False)
    return folder, key


def test_cache_rows_and_shapes(built, vcr, teacher):
    folder, key = built
    assert folder.name == key and (folder / "_SUCCESS").exists()
    assert not (folder.parent / f"{key}.partial").exists()
    labels = vcr["table"].column("label").to_pylist()
    labelled_instances = sum(1 for x in labels if x >= 0)
    assert labelled_instances > 0
    cache = load_cache(folder)
    assert len(cache) == labelled_instances * len(HEADS["vcr"])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dim"] == teacher.embed_dim == 96 and meta["problems"] == len(cache)
    by_key = {p.key: p for p in vcr["problems"]}
    D = teacher.embed_dim
    for k, row in cache.items():
        p = by_key[k]
        R = len(p.boxes)
        assert row["region_emb"].shape == (R, D)
        assert row["rel_v"].shape == (R,)
        assert row["pooled"].shape == (D,)
        words = p.teacher_words()
        assert row["words"].shape == (len(words), D)
        assert row["rel_w"].shape == (len(words),)
        assert np.allclose(np.linalg.norm(row["region_emb"], axis=1), 1, atol=2e-3)
        assert np.allclose(np.linalg.norm(row["pooled"]), 1, atol=2e-3)
        assert 0.0 <= row["gold_prob"] <= 1.0
        assert isinstance(row["correct"], bool)
        if row["correct"]:  # argmax over 4 candidates
            assert row["gold_prob"] >= 0.25 - 1e-6
        # relevance scores are the cosine similarities the docstring promises
        assert np.allclose(row["rel_v"], row["region_emb"] @ row["pooled"], atol=5e-3)
        assert np.allclose(row["rel_w"], row["words"] @ row["region_emb"][0], atol=5e-3)


def test_cache_values_match_the_teacher(built, vcr, teacher):
    folder, _ = built
    cache = load_cache(folder)
    for p in vcr["problems"][:6]:
        row = cache[p.key]
        image = teacher_cache._load_image(p.image)
        regions = teacher.encode_regions(image, torch.from_numpy(p.boxes))
        assert np.allclose(row["region_emb"], regions.numpy(), atol=2e-3)
        pooled = teacher.encode_texts([" ".join(p.teacher_words())])[0]
        assert np.allclose(row["pooled"], pooled.numpy(), atol=2e-3)
        texts = [" ".join(p.query + words) for words, _ in p.candidates]
        probs = ((teacher.encode_texts(texts) @ regions[0]) * teacher.logit_scale).softmax(-1)
        assert row["gold_prob"] == pytest.approx(float(probs[p.label]), abs=1e-5)
        assert row["correct"] == (int(probs.argmax()) == p.label)
        # each region's own zero-shot confidence in the gold answer; region 0's is gold_prob
        per_region = ((regions @ teacher.encode_texts(texts).T) * teacher.logit_scale
                      ).softmax(-1)[:, p.label]
        assert np.allclose(row["region_conf"], per_region.numpy(), atol=1e-4)
        assert row["region_conf"][0] == pytest.approx(row["gold_prob"], abs=1e-5)


def test_load_cache_subset_and_incomplete(built, tmp_path):
    folder, _ = built
    keys = sorted(load_cache(folder))[:3]
    assert sorted(load_cache(folder, set(keys))) == keys
    with pytest.raises(FileNotFoundError, match="incomplete or missing"):
        load_cache(tmp_path / "nothing-here")


def test_rebuild_is_a_no_op_when_complete(built, vcr, teacher, monkeypatch):
    folder, key = built
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def boom(*a, **k):
        raise AssertionError("compute_targets called for a finished cache")

    monkeypatch.setattr(teacher_cache, "compute_targets", boom)
    assert build_cache(teacher, "vcr", vcr["problems"], folder.parent, key,
                       progress=False) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_encode_words_pooled_equals_encode_texts(vcr, teacher):
    sentences = [p.teacher_words() for p in vcr["problems"][:24]]
    sentences.append(("the small red circle is left of the big blue square and " * 4).split())
    sentences.append(["Hello,", "world!!", "it's", "x"])
    pooled, words = teacher.encode_words(sentences)
    expected = teacher.encode_texts([" ".join(s) for s in sentences])
    assert pooled.shape == expected.shape == (len(sentences), teacher.embed_dim)
    assert torch.allclose(pooled, expected, atol=1e-5)
    for s, w in zip(sentences, words, strict=True):
        assert w.shape == (len(s), teacher.embed_dim)
        assert torch.allclose(w.norm(dim=-1), torch.ones(len(s)), atol=1e-5)


def test_interrupted_build_resumes(vcr, teacher, tmp_path, monkeypatch):
    problems = vcr["problems"]
    labelled = [p for p in problems if p.label >= 0]
    assert len(labelled) > 100, "the tiny world needs more than two 50-problem shards"
    n_shards = -(-len(labelled) // 50)
    monkeypatch.setattr(teacher_cache, "SHARD", 50)
    real = teacher_cache.compute_targets
    calls = []

    def failing(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    key = "vcr-train-test"
    root = tmp_path / "resumed"
    monkeypatch.setattr(teacher_cache, "compute_targets", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_cache(teacher, "vcr", problems, root, key, progress=False)
    partial = root / f"{key}.partial"
    assert not (root / key).exists()
    assert partial.is_dir()
    assert sorted(p.name for p in partial.iterdir()) == ["part-00000.parquet",
                                                         "part-00001.parquet"]

    calls.clear()

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "compute_targets", counting)
    folder = build_cache(teacher, "vcr", problems, root, key, progress=False)
    assert folder == root / key and (folder / "_SUCCESS").exists()
    assert not partial.exists()
    assert len(calls) == n_shards - 2  # the two finished shards were not recomputed
    assert sum(calls) == len(labelled) - 100

    clean = build_cache(teacher, "vcr", problems, tmp_path / "clean", key, progress=False)
    shards = sorted(p.name for p in folder.glob("part-*.parquet"))
    assert shards == sorted(p.name for p in clean.glob("part-*.parquet"))
    assert len(shards) == n_shards
    assert not list(folder.glob("*.tmp"))
    for name in shards:
        a, b = pq.read_table(folder / name), pq.read_table(clean / name)
        assert a.num_rows == b.num_rows > 0
        assert a.equals(b), name
    assert json.loads((folder / "meta.json").read_text()) == json.loads(
        (clean / "meta.json").read_text())


def test_cache_key_changes_with_every_input():
    base = cache_key("fp", "v1", "train", "vcr")
    assert base == cache_key("fp", "v1", "train", "vcr")  # stable
    assert base.startswith("vcr-train-")
    others = {cache_key("fp", "v2", "train", "vcr"), cache_key("fp2", "v1", "train", "vcr"),
              cache_key("fp", "v1", "val", "vcr"), cache_key("fp", "v1", "train", "vqa")}
    assert base not in others and len(others) == 4


def test_dataset_version_reaches_the_key(vcr, teacher):
    fp = teacher.fingerprint()
    assert fp == teacher.fingerprint()
    version = vcr["manifest"]["version"]
    assert version
    assert cache_key(fp, version, "train", "vcr") != cache_key(fp, version + "-changed",
                                                               "train", "vcr")


# --------------------------------------------------------------------------------------
# The batch the Distiller reads


@pytest.fixture(scope="module")
def parts(tiny_world, built):
    from cliptd.core.config import resolve_config
    from cliptd.training.run import build_run

    folder, _ = built
    cfg = resolve_config({"task": "vcr", "data": str(tiny_world.data["vcr"]),
                          "student": str(tiny_world.student), "teacher_cache": str(folder),
                          "preset": "synthetic", "distill": {"method": "cliptd"}})
    torch.manual_seed(0)
    return build_run(cfg)


def test_collate(parts):
    problems = parts.train[:3]
    C = problems[0].num_candidates
    assert C == 4
    batch = parts.collate_train(problems)
    B, N = len(problems), len(problems) * C
    R = max(len(p.boxes) for p in problems)
    L = batch["input_ids"].shape[1]
    # one visual entry per distinct (image, boxes), in order of first use
    owners: dict = {}
    owner = [owners.setdefault((p.image, p.boxes.tobytes()), len(owners)) for p in problems]
    V = len(owners)
    assert batch["images"].shape == (V, 3, 64, 64)
    assert batch["images"].dtype == torch.float32
    assert 0 <= batch["images"].min() and batch["images"].max() <= 1
    assert batch["boxes"].shape == (V, R, 4)
    first = {o: problems[owner.index(o)] for o in range(V)}
    assert batch["region_mask"].sum(1).tolist() == [len(first[o].boxes) for o in range(V)]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == \
        batch["token_regions"].shape == (N, L)
    assert batch["image_index"].tolist() == [owner[b] for b in range(B) for _ in range(C)]
    labels = [p.label for p in problems]
    assert batch["labels"].tolist() == labels
    assert batch["gold_row"].tolist() == [b * C + labels[b] for b in range(B)]
    assert batch["num_candidates"] == C and batch["keys"] == [p.key for p in problems]

    t = batch["teacher"]
    D = 96
    assert t["region_emb"].shape == (B, R, D)
    assert t["region_mask"].sum(1).tolist() == [len(p.boxes) for p in problems]
    assert t["rel_v"].shape == (B, R)
    assert t["token_words"].shape == (B, L, D) and t["token_mask"].shape == (B, L)
    assert t["rel_t"].shape == (B, L)
    assert t["pooled"].shape == (B, D)
    assert t["gold_prob"].shape == t["correct"].shape == (B,)

    tok = parts.tokenizer
    special = set(tok.all_special_ids)
    cache = parts.collate_train.teacher
    for b, p in enumerate(problems):
        row = int(batch["gold_row"][b])
        ids = batch["input_ids"][row]
        mask = t["token_mask"][b]
        # exactly the word tokens of the gold (query, candidate) sequence
        expected_mask = batch["attention_mask"][row].bool() & torch.tensor(
            [i not in special for i in ids.tolist()])
        assert torch.equal(mask, expected_mask), b
        words = p.teacher_words()
        assert tok.convert_ids_to_tokens(ids[mask].tolist()) == [w.lower() for w in words]
        gold_regions = p.query_regions + p.candidates[p.label][1]
        assert batch["token_regions"][row][mask].tolist() == gold_regions
        assert not batch["token_regions"][row][~mask].ne(-1).any()
        # targets sit on the right tokens, zero elsewhere
        cached = cache[p.key]
        assert torch.allclose(t["token_words"][b][mask], torch.from_numpy(cached["words"]))
        assert torch.allclose(t["rel_t"][b][mask], torch.from_numpy(cached["rel_w"]))
        assert t["token_words"][b][~mask].abs().sum() == 0
        assert torch.allclose(t["region_emb"][b, : len(p.boxes)],
                              torch.from_numpy(cached["region_emb"]))
        assert t["region_emb"][b, len(p.boxes):].abs().sum() == 0
        assert torch.allclose(t["region_conf"][b, : len(p.boxes)],
                              torch.from_numpy(cached["region_conf"]))
        assert t["gold_prob"][b].item() == pytest.approx(cached["gold_prob"])


def test_region_confidence_needs_a_format_2_cache(tiny_world, built, tmp_path):
    """A cache written before region_conf (format 1) is refused, naming it, by a run that
    weighs regions by confidence; other runs still read it (its regions weigh the same)."""
    from cliptd.core.config import resolve_config
    from cliptd.core.errors import DataError
    from cliptd.training.run import build_run

    folder, _ = built
    old = tmp_path / "format1"
    shutil.copytree(folder, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    for shard in old.glob("part-*.parquet"):
        pq.write_table(pq.read_table(shard).drop_columns(["region_conf"]), shard)

    def cfg(**knobs):
        return resolve_config({"task": "vcr", "data": str(tiny_world.data["vcr"]),
                               "student": str(tiny_world.student), "teacher_cache": str(old),
                               "preset": "synthetic", "distill": {"method": "cliptd", **knobs}})
    with pytest.raises(DataError, match="format1.*cache format 1.*region_weighting"):
        build_run(cfg(region_weighting="confidence"))
    parts = build_run(cfg())
    batch = parts.collate_train(parts.train[:2])
    assert torch.equal(batch["teacher"]["region_conf"], batch["teacher"]["region_mask"].float())


def test_collated_batch_trains(parts):
    batch = parts.collate_train(parts.train[:4])
    task = parts.task
    task.train()
    loss, logs = task(batch, progress=0.0)
    assert torch.isfinite(loss)
    assert logs["loss/distill"] > 0 and 0 < logs["distill/frac_regions"] <= 1
    loss.backward()
    # the heads of the layers the (default) knobs distil into all learn
    heads = {"final": ["proj_v"], "features": ["proj_f"], "both": ["proj_v", "proj_f"]}[
        task.distiller.cfg.visual_layer] + ["proj_t"]
    for head in heads:
        assert getattr(task.distiller, head).weight.grad.abs().sum() > 0, head
    task.zero_grad(set_to_none=True)


def test_shared_images_are_encoded_once_with_the_same_scores(parts):
    """VCR's Q→A and QA→R problems of a question share one image entry in a batch; the
    scores are those of each problem collated alone."""
    problems = parts.eval[:8]
    batch = parts.collate_eval(problems)
    assert batch["images"].shape[0] < len(problems)  # both heads of a question share it
    task = parts.task.eval()
    together = task.predict(batch)
    alone = torch.cat([task.predict(parts.collate_eval([p])) for p in problems])
    assert torch.allclose(together, alone, atol=1e-5)


def test_teacher_fingerprint_ignores_threads_and_sees_weights(teacher):
    """The cache key must not depend on torch's thread count (a float sum's rounding does)
    and must change when the weights do, in any dtype."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = teacher.fingerprint()
        torch.set_num_threads(2)
        assert teacher.fingerprint() == one
    finally:
        torch.set_num_threads(threads)
    weight = next(p for p in teacher.model.parameters() if p.numel() > 1000)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(0.5)
        assert teacher.fingerprint() != one
        with torch.no_grad():
            weight.copy_(saved.to(torch.bfloat16).float())  # bf16-rounded values
        assert teacher.fingerprint() != one
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert teacher.fingerprint() == one
