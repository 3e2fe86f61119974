"""The student: tokenizer, VisualBERT / LXMERT forward, grounding, export round trip and
export parity between methods (the projection heads never leave training)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from _knobs import knobs
from torch.utils.flop_counter import FlopCounterMode

from cliptd.model.config import StudentConfig
from cliptd.model.student import VLStudent, count_parameters, load_student, save_student
from cliptd.model.tokenizers import SPECIAL_TOKENS, build_word_tokenizer
from cliptd.objective.distill import DistillConfig
from cliptd.objective.task import CLIPTDTask

WORDS = ["What", "shape", "is", "the", "red", "thing", "?", "It", "a", "circle", "square",
         "because", "left", "of", "."]
TEACHER_DIM = 96


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def make_student(arch: str, tokenizer, seed: int = 0) -> VLStudent:
    torch.manual_seed(seed)
    name = {"visualbert": "visualbert-tiny", "lxmert": "lxmert-tiny"}[arch]
    return VLStudent(StudentConfig.from_name(name, vocab_size=len(tokenizer))).eval()


def make_batch(tokenizer, seed: int = 0) -> dict:
    """2 problems × 2 candidates = 4 rows; problem 1 has one region fewer (padded)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 64, 64, generator=g)
    boxes = torch.tensor([
        [[0, 0, 64, 64], [4, 4, 30, 30], [32, 8, 60, 40], [10, 36, 40, 62]],
        [[0, 0, 64, 64], [20, 20, 50, 50], [2, 30, 24, 60], [0, 0, 0, 0]],
    ], dtype=torch.float)
    region_mask = torch.tensor([[True] * 4, [True, True, True, False]])
    queries = [["what", "shape", "is", "the", "red", "thing", "?"]] * 4
    answers = [["it", "is", "a", "circle", "."], ["it", "is", "a", "square", "."],
               ["it", "is", "a", "square", "."], ["circle", "left", "of", "the", "square"]]
    enc = tokenizer(queries, answers, is_split_into_words=True, padding=True,
                    return_tensors="pt")
    L = enc["input_ids"].shape[1]
    token_regions = torch.full((4, L), -1, dtype=torch.long)
    token_regions[0, 5] = 1  # "red" → region 1
    token_regions[1, 5] = 2
    token_regions[2, 6] = 1
    token_regions[3, 9:11] = 2
    return {"images": images, "boxes": boxes, "region_mask": region_mask,
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_regions": token_regions, "image_index": torch.tensor([0, 0, 1, 1]),
            "num_candidates": 2, "labels": torch.tensor([0, 1]),
            "gold_row": torch.tensor([0, 3])}


# --------------------------------------------------------------------------------------
# Tokenizer


def test_word_tokenizer_round_trip(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len({w.lower() for w in WORDS})
    enc = tokenizer("What shape is the red thing ?")
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["[CLS]", "what", "shape", "is", "the", "red", "thing", "?", "[SEP]"]
    assert tokenizer.decode(enc["input_ids"], skip_special_tokens=True) == \
        "what shape is the red thing ?"


def test_word_tokenizer_unknown_words(tokenizer):
    ids = tokenizer("the blue zebra")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "the", "[UNK]", "[UNK]", "[SEP]"]
    assert ids[2] == ids[3] == tokenizer.unk_token_id == SPECIAL_TOKENS.index("[UNK]")


def test_word_tokenizer_pair_template(tokenizer):
    enc = tokenizer(["what", "is", "it"], ["a", "circle"], is_split_into_words=True)
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"]) == [
        "[CLS]", "what", "is", "it", "[SEP]", "a", "circle", "[SEP]"]
    assert enc.encodings[0].type_ids == [0, 0, 0, 0, 0, 1, 1, 1]
    assert enc.word_ids() == [None, 0, 1, 2, None, 0, 1, None]
    assert enc.sequence_ids() == [None, 0, 0, 0, None, 1, 1, None]


def test_word_tokenizer_padding_and_truncation():
    tok = build_word_tokenizer(["a", "b"], max_length=5)
    enc = tok(["a b a b a b", "a"], truncation=True, padding=True)
    assert [len(x) for x in enc["input_ids"]] == [5, 5]
    assert enc["input_ids"][1][-1] == tok.pad_token_id == 0
    assert enc["attention_mask"][1] == [1, 1, 1, 0, 0]


# --------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("arch", ["visualbert", "lxmert"])
def test_forward_shapes(arch, tokenizer):
    model = make_student(arch, tokenizer)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        out = model(batch)
    N, L = batch["input_ids"].shape
    H = model.cfg.hidden_size
    assert out.text_states.shape == (N, L, H)
    assert out.region_states.shape == (N, 4, H)
    assert out.pooled.shape == (N, H)
    assert out.logits.shape == (N, 1)
    assert model.scores(out, 2).shape == (2, 2)
    assert torch.isfinite(out.text_states).all() and torch.isfinite(out.region_states).all()


@pytest.mark.parametrize("arch", ["visualbert", "lxmert"])
def test_grounding_changes_output(arch, tokenizer):
    model = make_student(arch, tokenizer)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        base = model(batch)
        again = model(batch)
        moved = dict(batch, token_regions=batch["token_regions"].clone())
        moved["token_regions"][0, 5] = 3  # "red" now refers to region 3
        changed = model(moved)
        dropped = dict(batch, token_regions=batch["token_regions"].clone())
        dropped["token_regions"][0, 5] = -1  # no region
        ungrounded = model(dropped)
    assert torch.equal(base.pooled, again.pooled)  # deterministic in eval mode
    assert not torch.allclose(base.pooled[0], changed.pooled[0], atol=1e-5)
    assert not torch.allclose(base.pooled[0], ungrounded.pooled[0], atol=1e-5)
    # rows whose grounding did not change are untouched
    assert torch.allclose(base.pooled[1:], changed.pooled[1:], atol=1e-5)


@pytest.mark.parametrize("arch", ["visualbert", "lxmert"])
def test_image_index_routes_each_row_to_its_image(arch, tokenizer):
    model = make_student(arch, tokenizer)
    batch = make_batch(tokenizer)
    other = dict(batch, images=batch["images"].clone())
    other["images"][1] = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model(batch), model(other)
    assert torch.allclose(a.pooled[:2], b.pooled[:2], atol=1e-5)  # rows of image 0
    assert not torch.allclose(a.pooled[2:], b.pooled[2:], atol=1e-5)  # rows of image 1


@pytest.mark.parametrize("arch", ["visualbert", "lxmert"])
def test_save_load_round_trip(arch, tokenizer, tmp_path):
    model = make_student(arch, tokenizer)
    save_student(model, tokenizer, tmp_path / "s", extra={"note": "x"})
    loaded, tok2 = load_student(tmp_path / "s")
    loaded.eval()
    assert loaded.cfg == model.cfg
    assert tok2.get_vocab() == tokenizer.get_vocab()
    batch = make_batch(tokenizer)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for name in ("text_states", "region_states", "pooled", "logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    meta = json.loads((tmp_path / "s" / "student_config.json").read_text())
    assert meta["note"] == "x" and meta["student"]["arch"] == arch


def test_load_student_swaps_task_head(tokenizer, tmp_path):
    model = make_student("visualbert", tokenizer)
    save_student(model, tokenizer, tmp_path / "s")
    loaded, _ = load_student(tmp_path / "s", task_head="classify", num_outputs=3)
    with torch.no_grad():
        out = loaded.eval()(make_batch(tokenizer))
    assert out.logits.shape == (4, 3)
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():  # the encoder is carried over
        if k.startswith("encoder."):
            assert torch.equal(v, ref[k]), k


def test_load_student_rejects_mismatched_weights(tokenizer, tmp_path):
    model = make_student("visualbert", tokenizer)
    save_student(model, tokenizer, tmp_path / "s")
    cfg_file = tmp_path / "s" / "student_config.json"
    meta = json.loads(cfg_file.read_text())
    meta["student"]["arch"] = "lxmert"
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises((ValueError, RuntimeError)):
        load_student(tmp_path / "s")


# --------------------------------------------------------------------------------------
# Export parity: cliptd exports exactly the model `none` exports; clip_features (CLIP inside
# the student) exports a bigger one, and its inference cost is reported beside theirs.


def _flops(model: VLStudent, batch: dict) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(batch)
    return counter.get_total_flops()


def _method_student(method: str, arch: str, tokenizer) -> VLStudent:
    student = make_student(arch, tokenizer)
    if method != "clip_features":
        return student
    import open_clip

    from cliptd.model.student import with_clip_regions
    from cliptd.teacher.clip import EMBEDDED_TEACHER, TeacherSpec

    torch.manual_seed(1)  # the embedded tiny CLIP's architecture, random weights
    clip = open_clip.create_model(EMBEDDED_TEACHER)
    return with_clip_regions(student, clip, TeacherSpec(EMBEDDED_TEACHER)).eval()


@pytest.mark.parametrize("arch", ["visualbert", "lxmert"])
def test_export_parity(arch, tokenizer, tmp_path):
    from cliptd.training.cost import compare

    exported = {}
    for method in ("none", "cliptd", "clip_features"):
        task = CLIPTDTask(_method_student(method, arch, tokenizer),
                          knobs(method=method).resolved(), teacher_dim=TEACHER_DIM)
        # the task module does carry the projection heads while training
        heads = count_parameters(task.distiller)
        assert heads == 2 * (task.student.cfg.hidden_size * TEACHER_DIM + TEACHER_DIM)
        assert count_parameters(task) == count_parameters(task.student) + heads
        save_student(task.student, tokenizer, tmp_path / method)
        state = torch.load(tmp_path / method / "student.pt", weights_only=True)
        assert not any(k.startswith(("distiller.", "proj_v", "proj_t")) or ".proj_v." in k
                       or ".proj_t." in k for k in state)
        model, _ = load_student(tmp_path / method)
        exported[method] = (model.eval(), state, count_parameters(task.student))
    (m_none, s_none, p_none), (m_td, s_td, p_td), (m_cf, s_cf, p_cf) = exported.values()
    assert list(s_none) == list(s_td)
    assert {k: v.shape for k, v in s_none.items()} == {k: v.shape for k, v in s_td.items()}
    assert count_parameters(m_none) == count_parameters(m_td) == p_none == p_td
    # clip_features: the CLIP image tower is in the exported model, and runs at inference
    assert any(k.startswith("regions.tower.") for k in s_cf)
    assert count_parameters(m_cf) == p_cf > p_none
    batch = make_batch(tokenizer)
    f_none, f_td, f_cf = (_flops(m, batch) for m in (m_none, m_td, m_cf))
    assert f_none == f_td > 0
    assert f_cf > f_none
    # inference cost measured side by side (interleaved forwards on the same batch)
    cost = compare({"none": m_none, "cliptd": m_td, "clip_features": m_cf}, batch, repeats=7)
    assert cost["none"]["params"] == cost["cliptd"]["params"] == p_none
    assert cost["clip_features"]["params_vs_ref"] > 1
    print(f"\n[{arch}] exported student, per instance ({len(batch['labels'])} instances, "
          "forwards interleaved):")
    flops = {"none": f_none, "cliptd": f_td, "clip_features": f_cf}
    for method, c in cost.items():
        assert c["forward_ms_per_instance"] > 0
        print(f"  {method:<14} params {c['params']:>9,d} ({c['params_vs_ref']:.2f}x none)  "
              f"GFLOP {flops[method] / len(batch['labels']) / 1e9:.4f} "
              f"({flops[method] / f_none:.2f}x)  forward {c['forward_ms_per_instance']:.2f} ms "
              f"({c['forward_vs_ref']:.2f}x none)")


class _FakeCheckpoint:
    def __init__(self, folder: Path):
        self.folder = folder

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.folder)


class _FakeResult:
    def __init__(self, folder: Path):
        self.checkpoint = _FakeCheckpoint(folder)

    def get_best_checkpoint(self, metric, mode):
        return self.checkpoint


def test_export_best_drops_projection_heads(tokenizer, tmp_path):
    """A training checkpoint holds the whole task module; export keeps the student alone."""
    from cliptd.training.checkpoint import CHECKPOINT_FORMAT, export_best

    task = CLIPTDTask(make_student("visualbert", tokenizer), knobs(), TEACHER_DIM)
    with torch.no_grad():
        task.distiller.proj_v.weight.fill_(0.5)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "model": task.state_dict(),
                "student_config": vars(task.student.cfg), "metrics": {"score": 0.5},
                "config": {"task": "vcr"}}, ckpt / "checkpoint.pt")
    tokenizer.save_pretrained(ckpt / "tokenizer")
    export_best(_FakeResult(ckpt), tmp_path / "out")
    state = torch.load(tmp_path / "out" / "student.pt", weights_only=True)
    # the export is a transformers folder: the encoder as config.json + model.safetensors,
    # what wraps it (region encoder, grounding, task head) in student.pt
    assert list(state) == [k for k in task.student.state_dict() if not k.startswith("encoder.")]
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, task.student.encoder.state_dict()[k]), k
    model, _ = load_student(tmp_path / "out")
    assert count_parameters(model) == count_parameters(task.student)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model.eval()(batch).logits, task.student.eval()(batch).logits)


# --------------------------------------------------------------------------------------
# Task module with the method presets


def _teacher_batch(tokenizer) -> dict:
    batch = make_batch(tokenizer)
    g = torch.Generator().manual_seed(5)
    L = batch["input_ids"].shape[1]
    gold_ids = batch["input_ids"][batch["gold_row"]]
    batch["teacher"] = {
        "region_emb": torch.randn(2, 4, TEACHER_DIM, generator=g),
        "region_mask": batch["region_mask"].clone(), "rel_v": torch.randn(2, 4, generator=g),
        "token_words": torch.randn(2, L, TEACHER_DIM, generator=g),
        "token_mask": gold_ids > len(SPECIAL_TOKENS) - 1,
        "rel_t": torch.randn(2, L, generator=g),
        "pooled": torch.randn(2, TEACHER_DIM, generator=g),
        "gold_prob": torch.tensor([0.3, 0.8]), "correct": torch.tensor([False, True]),
    }
    return batch


def test_task_forward_adds_distillation_for_cliptd(tokenizer):
    task = CLIPTDTask(make_student("visualbert", tokenizer), knobs(), TEACHER_DIM).eval()
    batch = _teacher_batch(tokenizer)
    loss, logs = task(batch, progress=0.0)
    assert logs["loss/distill"] > 0
    assert loss.item() == pytest.approx(logs["loss/task"] + logs["loss/distill"], rel=1e-5)
    loss.backward()
    assert task.distiller.proj_v.weight.grad is not None
    assert task.distiller.proj_t.weight.grad is not None


def test_task_forward_none_resolved_is_task_loss_only(tokenizer):
    task = CLIPTDTask(make_student("visualbert", tokenizer),
                      DistillConfig(method="none").resolved(), TEACHER_DIM).eval()
    loss, logs = task(_teacher_batch(tokenizer), progress=0.0)
    assert "loss/distill" not in logs
    assert loss.item() == pytest.approx(logs["loss/task"])


def test_task_forward_none_unresolved_has_no_teacher_term(tokenizer):
    task = CLIPTDTask(make_student("visualbert", tokenizer), DistillConfig(method="none"),
                      TEACHER_DIM).eval()
    loss, logs = task(_teacher_batch(tokenizer), progress=0.0)
    assert "loss/distill" not in logs
    assert loss.item() == pytest.approx(logs["loss/task"])


# --------------------------------------------------------------------------------------
# StudentConfig


def test_student_config_from_name():
    cfg = StudentConfig.from_name("lxmert-tiny", vocab_size=50)
    assert (cfg.arch, cfg.num_hidden_layers, cfg.vocab_size) == ("lxmert", 2, 50)
    assert StudentConfig.from_name("visualbert-tiny").arch == "visualbert"


def test_student_config_unknown_name():
    with pytest.raises(ValueError, match="unknown student config 'nope'.*visualbert-tiny"):
        StudentConfig.from_name("nope")
    with pytest.raises(ValueError, match="unknown student config"):
        StudentConfig.from_name("/does/not/exist.json")


def test_student_config_unknown_key(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"arch": "visualbert", "hidden_sise": 64}))
    with pytest.raises(ValueError, match=r"mine\.json.*hidden_sise"):
        StudentConfig.from_name(str(path))


def test_student_config_json_path_loads(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"arch": "visualbert", "hidden_size": 64,
                                "num_attention_heads": 2, "num_hidden_layers": 1}))
    cfg = StudentConfig.from_name(str(path), vocab_size=30)
    model = VLStudent(cfg).eval()
    tok = build_word_tokenizer(WORDS)
    with torch.no_grad():
        assert model(make_batch(tok)).pooled.shape == (4, 64)


def test_unknown_arch_and_head_rejected():
    with pytest.raises(ValueError, match="arch"):
        VLStudent(StudentConfig(arch="vilbert", vocab_size=30))
    with pytest.raises(ValueError, match="task head"):
        VLStudent(StudentConfig(task_head="ranking", vocab_size=30))
