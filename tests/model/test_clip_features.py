"""The clip_features baseline (CLIP inside the student): its region features are the
teacher's, its CLIP tower stays frozen, its export carries the tower and loads without the
CLIP it came from, and a run trains it end to end with the task loss only."""

from __future__ import annotations

import json
import shutil

import open_clip
import pytest
import torch
from test_student import TEACHER_DIM, WORDS, make_batch, make_student

from cliptd.model.clip_regions import ClipRegionEncoder, reference_config
from cliptd.model.config import StudentConfig
from cliptd.model.student import VLStudent, load_student, save_student, with_clip_regions
from cliptd.model.tokenizers import build_word_tokenizer
from cliptd.objective.distill import DistillConfig
from cliptd.objective.task import CLIPTDTask
from cliptd.teacher.clip import CONFIG_DIR, EMBEDDED_TEACHER, Teacher, TeacherSpec


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP (random weights, seeded) as an open_clip local-dir folder, like the
    embedded teacher's."""
    torch.manual_seed(0)
    model = open_clip.create_model(EMBEDDED_TEACHER)
    folder = tmp_path_factory.mktemp("clip")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": json.loads((CONFIG_DIR / f"{EMBEDDED_TEACHER}.json").read_text()),
        "preprocess_cfg": {}}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def teacher(clip_dir):
    return Teacher.load(TeacherSpec(model=f"local-dir:{clip_dir}"))


def clip_student(tokenizer, teacher, arch="visualbert"):
    return with_clip_regions(make_student(arch, tokenizer), teacher.model, teacher.spec).eval()


def test_region_features_are_the_teachers(tokenizer, teacher):
    """The same crops, normalisation and tower as the teacher cache's region_emb."""
    model = clip_student(tokenizer, teacher)
    batch = make_batch(tokenizer)
    emb = model.regions.clip_embeddings(batch["images"], batch["boxes"])
    assert emb.shape == (2, 4, teacher.embed_dim)
    for i in range(2):
        ref = teacher.encode_regions(batch["images"][i], batch["boxes"][i])
        assert torch.allclose(emb[i], ref, atol=1e-5)
    # region 0 (the whole image) and a crop differ: the crop really is a crop
    assert not torch.allclose(emb[0, 0], emb[0, 1], atol=1e-3)


def test_swap_keeps_pretrained_transformer(tokenizer, teacher):
    source = make_student("visualbert", tokenizer)
    model = with_clip_regions(source, teacher.model, teacher.spec)
    assert isinstance(model.regions, ClipRegionEncoder)
    assert model.cfg.backbone == "clip" and model.cfg.clip["replaces"] == "tiny"
    src = source.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith(("encoder.", "head.")):
            assert torch.equal(v, src[k]), k
    assert not any(k.startswith("regions.trunk") for k in model.state_dict())
    for k, v in teacher.model.visual.state_dict().items():
        assert torch.equal(model.state_dict()[f"regions.tower.{k}"], v), k
    assert reference_config(model.cfg) == source.cfg


def test_tower_frozen_through_a_training_step(tokenizer, teacher):
    task = CLIPTDTask(clip_student(tokenizer, teacher),
                      DistillConfig(method="clip_features").resolved(), TEACHER_DIM)
    tower = task.student.regions.tower
    assert not any(p.requires_grad for p in tower.parameters())
    task.train()
    assert task.student.regions.training and not tower.training  # no dropout in CLIP
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    proj_before = task.student.regions.proj.weight.clone()
    # an optimizer over *every* parameter with weight decay: still nothing may move the tower
    opt = torch.optim.AdamW(task.parameters(), lr=1e-2, weight_decay=0.1)
    loss, logs = task(make_batch(tokenizer), progress=0.0)
    assert "loss/distill" not in logs and loss.item() == pytest.approx(logs["loss/task"])
    loss.backward()
    assert all(p.grad is None for p in tower.parameters())
    assert task.student.regions.proj.weight.grad is not None
    opt.step()
    for k, v in tower.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(task.student.regions.proj.weight, proj_before)


@pytest.mark.parametrize("arch", ["visualbert", "lxmert"])
def test_export_round_trip_carries_the_tower(arch, tokenizer, clip_dir, tmp_path):
    """The export holds the CLIP tower: it loads and gives identical outputs after the CLIP
    folder it came from is gone."""
    source = tmp_path / "clip"
    shutil.copytree(clip_dir, source)
    t = Teacher.load(TeacherSpec(model=f"local-dir:{source}"))
    model = clip_student(tokenizer, t, arch)
    save_student(model, tokenizer, tmp_path / "s")
    shutil.rmtree(source)
    state = torch.load(tmp_path / "s" / "student.pt", weights_only=True)
    tower = {k for k in state if k.startswith("regions.tower.")}
    assert tower == {f"regions.tower.{k}" for k in t.model.visual.state_dict()}
    loaded, _ = load_student(tmp_path / "s")
    loaded.eval()
    assert loaded.cfg == model.cfg and loaded.cfg.clip["source"] == t.spec.describe()
    assert not any(p.requires_grad for p in loaded.regions.tower.parameters())
    batch = make_batch(tokenizer)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for name in ("text_states", "region_states", "pooled", "logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_clip_backbone_needs_its_config():
    with pytest.raises(ValueError, match="StudentConfig.clip"):
        VLStudent(StudentConfig(backbone="clip", vocab_size=30))


def test_cache_teacher_reads_old_and_new_meta(tmp_path):
    from cliptd.teacher.cache import cache_teacher

    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"teacher": "local-dir:/x/teacher-1:none"}))
    assert cache_teacher(old) == TeacherSpec(model="local-dir:/x/teacher-1")
    named = tmp_path / "named"
    named.mkdir()
    (named / "meta.json").write_text(json.dumps({"teacher": "ViT-B-32:openai"}))
    assert cache_teacher(named) == TeacherSpec("ViT-B-32", "openai")
    new = tmp_path / "new"
    new.mkdir()
    (new / "meta.json").write_text(json.dumps({
        "teacher": "ignored", "teacher_spec": {"model": "ViT-B-16", "pretrained": "/w:1.bin"}}))
    assert cache_teacher(new) == TeacherSpec("ViT-B-16", "/w:1.bin")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        cache_teacher(tmp_path / "missing")


# --------------------------------------------------------------------------------------
# A run on the tiny world: Ray Train's loop, in this process


def test_run_trains_clip_features_end_to_end(tiny_world, vcr_cache, tmp_path):
    from test_student import _FakeResult

    from cliptd.core.config import resolve_config
    from cliptd.training.checkpoint import export_best, load_checkpoint_file
    from cliptd.training.loop import train_loop
    from cliptd.training.run import build_run
    from cliptd.training.runtime import LocalRuntime

    cfg = resolve_config({"task": "vcr", "data": str(tiny_world.data["vcr"]),
                          "student": str(tiny_world.student), "teacher_cache": str(vcr_cache),
                          "preset": "synthetic", "epochs": 1, "batch_size": 8,
                          "distill": {"method": "clip_features"}})
    rt = LocalRuntime(keep_dir=tmp_path)
    train_loop(cfg, rt)
    m = rt.history[-1]
    assert "train/loss/distill" not in m and 0 <= m["val/id/q_a"] <= 1
    # the inference cost, measured side by side with the model `none` exports
    assert m["model/params_vs_none"] > 1 and m["model/forward_vs_none"] > 0
    assert m["model/forward_ms_per_instance"] > 0
    state = load_checkpoint_file(tmp_path / "epoch-001" / "checkpoint.pt")
    visual = Teacher.load(tiny_world.teacher).model.visual.state_dict()
    for k, v in visual.items():  # trained, yet the tower is the teacher's, bit for bit
        assert torch.equal(state["model"][f"student.regions.tower.{k}"], v), k
    # the optimizer holds the trainable parameters only, not the tower's
    task = build_run(cfg).task
    trainable = [p for p in task.parameters() if p.requires_grad]
    assert len(trainable) + len(list(task.student.regions.tower.parameters())) == \
        len(list(task.parameters()))
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(trainable)
    out = export_best(_FakeResult(tmp_path / "epoch-001"), tmp_path / "export")
    model, _ = load_student(out)
    assert model.cfg.backbone == "clip" and isinstance(model.regions, ClipRegionEncoder)
