"""Student pre-training: its objectives' data (grounded statements, hard negatives), the
loop (deterministic, exactly resumable), the export fine-tuning loads, and the CLI's
refusals (the CLI on Ray Train with its MLflow record: tests/e2e/test_pretrain_cli.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from cliptd.data.corpus import load_corpus
from cliptd.embedded.world import world_words
from cliptd.model.student import load_student
from cliptd.objective.pretrain_batch import make_batch
from cliptd.objective.pretrain_task import CHOICE_KINDS, PretrainConfig
from cliptd.objective.statements import grounded_statements, statement_choices
from cliptd.synthetic.corpus import attribute_groups
from cliptd.training.checkpoint import export_pretrained
from cliptd.training.pretrain_loop import _choice_accuracy_by_kind, pretrain_loop
from cliptd.training.runtime import LocalRuntime


@pytest.fixture(scope="module")
def corpus(tiny_world):
    return tiny_world.synthetic / "corpus" / "student.parquet"


@pytest.fixture(scope="module")
def words(tiny_world):
    return sorted(world_words(tiny_world.synthetic, tiny_world.data))


@pytest.fixture(scope="module")
def items(corpus):
    return load_corpus(corpus, 64, attribute_groups())


def _cfg(corpus, words, **kw) -> dict:
    base = {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "warmup": 2}
    return {**{**PretrainConfig().__dict__, **base, **kw}, "corpus": str(corpus),
            "words": words, "attribute_groups": [list(g) for g in attribute_groups()]}


def test_region_attributes_read_off_captions(items):
    colours, shapes, sizes = attribute_groups()
    item = items[0]
    assert (item.attributes[0] == -100).all()  # the whole image has no label
    for caption, attrs in zip(item.region_captions, item.attributes[1:], strict=True):
        words = caption.split()
        assert colours[attrs[0]] in words and shapes[attrs[1]] in words
        assert sizes[attrs[2]] in words


def test_grounded_statements_are_true(items):
    """Counts, extremes and attribute bindings agree with the scene's boxes and labels."""
    colours, shapes, _ = attribute_groups()
    rng = np.random.default_rng(0)
    seen = set()
    for item in items[:200]:
        attrs, boxes = item.attributes[1:], item.boxes[1:]
        for words, links in grounded_statements(item, attribute_groups(), rng):
            if words[0] == "there":
                seen.add("count")
                k = ("none", "one", "two", "three").index(words[2])
                assert int((attrs[:, 0] == colours.index(words[3])).sum()) == k
            elif words[3] == "furthest":
                seen.add("position")
                g = links[1]
                axis = 0 if words[6] in ("left", "right") else 1
                centre = (boxes[:, axis] + boxes[:, axis + 2]) / 2
                best = centre.argmin() if words[6] in ("left", "top") else centre.argmax()
                assert g == int(best) and shapes[attrs[g, 1]] == words[1]
            else:
                seen.add("binding")
                same = (attrs[:, 0] == colours.index(words[1])).nonzero().flatten()
                assert len(same) == 1 and shapes[attrs[same[0], 1]] == words[5]
    assert seen == {"count", "position", "binding"}


def test_statement_choices_one_true_three_false(items):
    """The first text of a choice is true and the others are distinct; its alignment
    targets name the objects the text is about."""
    colours, shapes, _ = attribute_groups()
    rng = np.random.default_rng(1)
    kinds = set()
    for item in items[:150]:
        made = statement_choices(item, attribute_groups(), rng)
        if made is None:
            continue
        choices, refs, kind = made
        texts = [tuple(w) + tuple(links) for w, links in choices]
        assert len(choices) == 4 and len(set(texts)) == 4
        words, links = choices[0]
        assert len(refs) == len(words)
        attrs = item.attributes[1:]
        if words[0] == "there":  # the referents of "red things" are the red objects
            assert kind == "count"
            kinds.add("count")
            red = {int(j) for j in (attrs[:, 0] == colours.index(words[3])).nonzero()}
            assert set(refs[3] or ()) == red
            assert ("none", "one", "two", "three").index(words[2]) == len(red)
        elif "furthest" in words:
            assert kind == "furthest"
            kinds.add("position")
            assert refs[6] == (links[1],) and shapes[attrs[links[1], 1]] == words[1]
        elif words[2] == "thing":
            assert kind == "binding"
            kinds.add("binding")
            (j,) = refs[1]
            assert colours[attrs[j, 0]] == words[1] and shapes[attrs[j, 1]] == words[5]
        else:
            assert kind == "caption"
            kinds.add("caption")
            assert " ".join(words) in item.region_captions
    assert kinds == {"count", "position", "binding", "caption"}


def test_hard_negatives_are_mismatched(items, words):
    """Every negative differs from a true text of its image in its words or its grounding,
    and about half of the pairs are negatives."""
    from cliptd.model.tokenizers import build_word_tokenizer

    tok = build_word_tokenizer(words)
    cfg = PretrainConfig(batch_size=256)
    batch = make_batch(items, tok, np.random.default_rng(0), cfg,
                       attribute_groups=attribute_groups())
    itm = batch["itm_labels"][batch["itm_labels"] >= 0]
    assert len(itm) == 256
    share = itm.float().mean().item()
    assert 0.35 < share < 0.65
    assert batch["region_attributes"].shape[:2] == batch["boxes"].shape[:2]
    groups = len(batch["choice_gold"])
    assert groups > 0 and len(batch["input_ids"]) == 256 + 4 * groups
    assert ((batch["choice_gold"] >= 0) & (batch["choice_gold"] < 4)).all()
    # alignment targets are real objects (never the whole image) of the row's own image
    b, _, r = batch["align"].T
    assert (r > 0).all() and batch["region_mask"][batch["image_index"][b], r].all()
    # grounded tokens point at real regions of their own image
    regions = batch["token_regions"]
    for b in range(len(regions)):
        linked = regions[b][regions[b] >= 0]
        assert (batch["region_mask"][batch["image_index"][b], linked]).all()


def test_a_batch_with_nothing_masked_stays_finite(items, words):
    """A small batch can mask no word (or only words of mismatched pairs, which MLM skips):
    its loss and gradients stay finite, and it reports no MLM loss instead of NaN (which
    MLflow drops and the optimizer would spread into every weight)."""
    from cliptd.model.config import StudentConfig
    from cliptd.model.student import VLStudent
    from cliptd.model.tokenizers import build_word_tokenizer
    from cliptd.objective.pretrain_task import PretrainTask

    tok = build_word_tokenizer(words)
    groups = attribute_groups()
    batch = make_batch(items, tok, np.random.default_rng(0), PretrainConfig(batch_size=8),
                       attribute_groups=groups)
    torch.manual_seed(0)
    task = PretrainTask(VLStudent(StudentConfig.from_name("visualbert-tiny",
                                                          vocab_size=len(tok))),
                        len(tok), tuple(len(g) for g in groups))
    _, logs = task(batch)
    assert "mlm" in logs and torch.isfinite(logs["mlm"])
    batch["mlm_labels"][:] = -100
    batch["region_attributes"][:] = -100  # nor any region label
    loss, logs = task(batch)
    assert torch.isfinite(loss) and "mlm" not in logs and logs["attr"] == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def _losses(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.split("/")[-1] in ("mlm", "itm", "attr", "choice", "align")
            or k == "step"}  # not timings


def test_choice_accuracy_is_split_by_kind():
    """Hits over groups seen per kind; a kind that did not occur is left out, not 0."""
    sums = {"choice_hits/count": 3.0, "choice_seen/count": 4.0, "choice_hits/binding": 0.0,
            "choice_seen/binding": 0.0, "choice_hits/furthest": 0.0, "choice_seen/furthest": 2.0}
    assert _choice_accuracy_by_kind(sums) == {"pretrain/choice_acc/count": 0.75,
                                              "pretrain/choice_acc/furthest": 0.0}


def test_loop_is_deterministic_and_resumes_exactly(corpus, words, tmp_path):
    """Same seed, same losses; a run resumed from its step-2 checkpoint ends with the
    uninterrupted run's weights and metrics."""
    runs = []
    for keep in (tmp_path / "a", None):
        rt = LocalRuntime(keep_dir=keep)
        task = pretrain_loop(_cfg(corpus, words), rt)
        runs.append(([_losses(h) for h in rt.history], task.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][0][-1]["step"] == 4 and "pretrain/attr" in runs[0][0][-1]
    assert all("pretrain/choice_acc" in h for h in rt.history)  # the overall one stays
    by_kind = {k for h in rt.history for k in h if k.startswith("pretrain/choice_acc/")}
    assert by_kind and by_kind <= {f"pretrain/choice_acc/{k}" for k in CHOICE_KINDS}
    assert all(0 <= h[k] <= 1 for h in rt.history for k in by_kind if k in h)
    rt = LocalRuntime(resume_from=tmp_path / "a" / "step-002")
    resumed = pretrain_loop(_cfg(corpus, words), rt)
    assert [h["step"] for h in rt.history] == [4]
    for k in ("pretrain/mlm", "pretrain/itm", "pretrain/attr", "pretrain/choice",
              "pretrain/align"):
        assert rt.history[-1][k] == runs[0][0][-1][k], k
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, runs[0][1][k]), k
    other = LocalRuntime()
    pretrain_loop(_cfg(corpus, words, seed=1), other)
    assert other.history[0]["pretrain/mlm"] != runs[0][0][0]["pretrain/mlm"]


def test_export_is_a_student_fine_tuning_loads(corpus, words, tmp_path):
    rt = LocalRuntime(keep_dir=tmp_path / "ckpt")
    task = pretrain_loop(_cfg(corpus, words), rt)
    out = export_pretrained(tmp_path / "ckpt" / "step-004", tmp_path / "student")
    student, tokenizer = load_student(out, task_head="classify", num_outputs=3)
    assert len(tokenizer) == task.student.cfg.vocab_size
    for k, v in task.student.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, student.state_dict()[k]), k
    assert not any(k.startswith(("mlm", "itm", "attributes", "choice", "align"))
                   for k in student.state_dict())


def test_cli_refuses_bad_corpus(tmp_path):
    import subprocess

    bad = tmp_path / "bad.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_png": [b""], "captions": [["a"]]}), bad)
    for corpus, message in ((tmp_path / "missing.parquet", "no such corpus file"),
                            (bad, "lacks the column(s) ['boxes', 'height', 'region_captions'")):
        proc = subprocess.run([sys.executable, "-m", "cliptd.pretrain", "--corpus", str(corpus),
                               "--out", str(tmp_path / "out")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()
