"""What the official VCR / SNLI-VE / VQA v2 files guarantee, checked on every line: a line
that breaks it is refused naming the file, the line and the field (the synthetic world
writes none of these, so only real-format files exercise them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cliptd.core.errors import DataError
from cliptd.data.prepare import prepare

FIX = Path(__file__).parents[1] / "fixtures" / "real"


def _with_line(tmp_path: Path, task: str, file: str, index: int, change) -> Path:
    src = tmp_path / task
    shutil.copytree(FIX / task, src)
    path = src / file
    lines = path.read_text().splitlines()
    rec = json.loads(lines[index])
    change(rec)
    lines[index] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    return src


def _refused(src: Path, task: str, tmp_path: Path, *parts: str) -> None:
    with pytest.raises(DataError) as err:
        prepare(task, src, tmp_path / "out", progress=False)
    for part in parts:
        assert part in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "parts"), [
    (lambda r: r["answer_choices"].pop(), ("train.jsonl:2", "answer_choices",
                                           "4 choices per question, got 3")),
    (lambda r: r["rationale_choices"].append(["Yes", "."]), ("rationale_choices", "got 5")),
    (lambda r: r["objects"].__setitem__(0, 7), ("objects[0]", "expected a class name")),
    (lambda r: r["objects"].__setitem__(2, "horse"), ("field 'objects'", "class names of")),
])
def test_vcr_line_guarantees(tmp_path, change, parts):
    _refused(_with_line(tmp_path, "vcr", "train.jsonl", 1, change), "vcr", tmp_path, *parts)


def test_vcr_annot_id_unique(tmp_path):
    first = json.loads((FIX / "vcr" / "train.jsonl").read_text().splitlines()[0])
    src = _with_line(tmp_path, "vcr", "train.jsonl", 1,
                     lambda r: r.__setitem__("annot_id", first["annot_id"]))
    _refused(src, "vcr", tmp_path, "train.jsonl:2", "annot_id", "appears twice")


def test_snli_ve_pair_id_unique(tmp_path):
    first = json.loads((FIX / "snli_ve" / "snli_ve_train.jsonl").read_text().splitlines()[0])
    src = _with_line(tmp_path, "snli_ve", "snli_ve_train.jsonl", 1,
                     lambda r: r.__setitem__("pairID", first["pairID"]))
    _refused(src, "snli_ve", tmp_path, "snli_ve_train.jsonl:2", "pairID", "appears twice")


def test_vqa_ten_answers(tmp_path):
    src = tmp_path / "vqa"
    shutil.copytree(FIX / "vqa", src)
    path = src / "v2_mscoco_train2014_annotations.json"
    doc = json.loads(path.read_text())
    doc["annotations"][1]["answers"].pop()
    path.write_text(json.dumps(doc))
    _refused(src, "vqa", tmp_path, "v2_mscoco_train2014_annotations.json", "answers",
             "10 answers per question", "got 9")
