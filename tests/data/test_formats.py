"""The readers of the real formats, on tiny fixtures in the exact shipped layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest

from cliptd.core.errors import DataError
from cliptd.data.formats.common import (
    ReadOptions,
    RegionSource,
    _JSONStream,
    iter_json_array,
    load_domains,
    reader,
    tokenize,
)
from cliptd.data.formats.vcr import GENDER_NEUTRAL_NAMES, question_type, render
from cliptd.data.schema import INSTANCE_SCHEMA

FIX = Path(__file__).parents[1] / "fixtures" / "real"


def rows(task: str, split: str, src: Path | None = None, **opts) -> list[dict]:
    out = list(reader(task).read(src or FIX / task, split, ReadOptions(**opts)))
    pa.Table.from_pylist(out, schema=INSTANCE_SCHEMA)  # every row fits the contract
    return out


# --- VCR --------------------------------------------------------------------------------


def test_render_names_people_by_object_index_and_joins_references():
    objects = ["person", "person", "wine glass", "person"]
    words, regions = render(["Why", "is", [0, 1, 3], "near", [2], "?"], objects, Path("f"), 1, "q")
    assert words == ["Why", "is", "Casey", ",", "Riley", "and", "Jackie", "near", "wine", "glass", "?"]
    assert regions == [-1, -1, 1, -1, 2, -1, 4, -1, 3, 3, -1]
    # Two references: plain "and"; the same object keeps its name everywhere.
    words, regions = render([[3, 0], "and", [3]], objects, Path("f"), 1, "q")
    assert words == ["Jackie", "and", "Casey", "and", "Jackie"]
    assert regions == [4, -1, 1, -1, 4]
    assert GENDER_NEUTRAL_NAMES[:3] == ("Casey", "Riley", "Jessie")


@pytest.mark.parametrize(
    ("question", "qtype"),
    [
        (["Why", "is", [0], "smiling", "?"], "explanation"),
        (["How", "come", [0], "is", "here", "?"], "explanation"),
        (["What", "is", [0], "doing", "?"], "activity"),
        (["What", "will", [0], "do", "next", "?"], "temporal"),
        (["What", "is", [0], "going", "to", "do", "?"], "temporal"),
        (["How", "does", [0], "feel", "?"], "mental"),
        (["Who", "is", [0], "?"], "role"),
        (["Where", "are", [0, 1], "?"], "scene"),
        (["What", "would", "happen", "if", [0], "fell", "?"], "hypothetical"),
        (["What", "color", "is", "the", "cube", "?"], "color"),
        (["What", "shape", "is", "it", "?"], "shape"),
        (["How", "many", "spheres", "are", "there", "?"], "count"),
        (["Which", "object", "is", "furthest", "left", "?"], "position"),
        (["Is", [0], "tall", "?"], "other"),
    ],
)
def test_question_type_rule(question, qtype):
    assert question_type(question) == qtype


def test_vcr_rows():
    train = rows("vcr", "train")
    assert [r["id"] for r in train] == ["train-0", "train-1", "train-2"]
    r = train[0]
    assert r["query"] == ["Why", "is", "Casey", "and", "Riley", "smiling", "?"]
    assert r["query_regions"] == [-1, -1, 1, -1, 2, -1, -1]
    assert r["rationales"][2][:5] == ["Casey", ",", "Riley", "and", "Jackie"]
    assert r["rationales_regions"][2][:5] == [1, -1, 2, -1, 4]
    assert (r["label"], r["rationale_label"], r["qtype"]) == (0, 2, "explanation")
    assert len(r["candidates"]) == len(r["candidates_regions"]) == 4
    # Region 0 is the whole image, then one box per object; the 0.4 px overshoot is clipped.
    assert r["boxes"][0] == [0, 0, 32, 18] and len(r["boxes"]) == 5
    assert r["boxes"][2] == [14.0, 1.0, 32.0, 17.9]
    assert r["region_names"] == ["image", "person", "person", "wine glass", "person"]
    assert (r["width"], r["height"]) == (32, 18)
    meta = json.loads(r["meta"])
    assert meta["movie"] == "lsmdc_3001_21_JUMP_STREET" and meta["question_number"] == 0
    assert {"img_id", "annot_id", "answer_likelihood"} <= meta.keys()
    assert "question" not in meta and "answer_label" not in meta


def test_vcr_test_split_has_no_labels():
    (r,) = rows("vcr", "test")
    assert (r["label"], r["rationale_label"]) == (-1, -1)
    assert r["qtype"] == "temporal"


def test_vcr_domains_and_no_box_options():
    img = "movieclips_A_Fistful_of_Dollars/O3dWMSfpmfs@12.jpg"
    (r,) = [r for r in rows("vcr", "val", domains={img: "western"}) if r["image"] == img]
    assert r["domain"] == "western"
    with pytest.raises(DataError, match="do not apply to VCR"):
        rows("vcr", "val", regions=RegionSource(grid=2))


# --- SNLI-VE ----------------------------------------------------------------------------


def test_snli_ve_rows():
    train = rows("snli_ve", "train")
    assert [r["label"] for r in train] == [0, 1, 2, 0]  # entailment, neutral, contradiction
    r = train[1]
    assert r["id"] == "2248275918.jpg#0r1n"
    assert r["image"] == "2248275918.jpg"
    assert (r["width"], r["height"]) == (20, 12)  # from the JPEG header
    assert r["query"] == ["The", "men", "are", "brothers", ",", "aren't", "they", "?"]
    assert r["query_regions"] == [-1] * 8
    assert r["boxes"] == [[0, 0, 20, 12]] and r["candidates"] == []
    meta = json.loads(r["meta"])
    assert meta["sentence1"].startswith("Two young guys")
    assert meta["captionID"] == "2248275918.jpg#0"
    assert meta["annotator_labels"][1] == "entailment"
    assert not any(k.endswith("_parse") for k in meta)
    assert [s for s in reader("snli_ve").splits(FIX / "snli_ve")] == ["train", "dev", "test"]


def test_snli_ve_box_file_grid_and_domains():
    src = FIX / "snli_ve"
    boxed = rows("snli_ve", "train", regions=RegionSource(boxes=src / "boxes.json"))
    assert boxed[0]["boxes"] == [[0, 0, 20, 12], [0, 0, 10, 6], [5.5, 2, 20, 12]]  # 20.6 clipped
    assert boxed[2]["boxes"] == [[0, 0, 24, 14]]  # not in the box file: whole image only
    gridded = rows("snli_ve", "dev", regions=RegionSource(grid=2), domains=load_domains(src / "domains.json"))
    (r,) = gridded
    assert r["boxes"] == [[0, 0, 24, 14], [0, 0, 12, 7], [12, 0, 24, 7], [0, 7, 12, 14], [12, 7, 24, 14]]
    assert r["region_names"][1:] == ["cell_0_0", "cell_0_1", "cell_1_0", "cell_1_1"]
    assert r["domain"] == "target"


# --- VQA --------------------------------------------------------------------------------


def test_vqa_rows_join_questions_and_annotations():
    train = rows("vqa", "train")
    r = train[1]
    assert r["id"] == "458752001"
    assert r["image"] == "train2014/COCO_train2014_000000458752.jpg"
    assert r["query"] == ["How", "many", "people", "are", "there", "?"]
    assert r["answers"] == ["2", "two", "2", "2", "3", "2", "2", "two", "2", "2"]
    assert r["qtype"] == "how many" and r["label"] == -1
    meta = json.loads(r["meta"])
    assert (meta["answer_type"], meta["multiple_choice_answer"]) == ("number", "2")
    # val lists annotations in another order than questions (and is pretty-printed)
    val = rows("vqa", "val")
    assert [r["id"] for r in val] == ["42001", "262148000"]
    assert val[0]["image"] == "val2014/COCO_val2014_000000000042.jpg"
    assert (val[0]["width"], val[0]["height"]) == (24, 12)


def test_vqacp_lists_and_coco_split():
    assert reader("vqa").splits(FIX / "vqa", "vqacp") == ["train", "test"]
    test = rows("vqa", "test", variant="vqacp")
    assert [r["image"] for r in test] == [
        "val2014/COCO_val2014_000000000042.jpg",
        "train2014/COCO_train2014_000000000009.jpg",
    ]
    assert json.loads(test[0]["meta"])["coco_split"] == "val2014"


# --- shared helpers ---------------------------------------------------------------------


def test_json_stream_across_tiny_chunks(monkeypatch):
    """Elements, keys and numbers cut by buffer boundaries still decode; lines are counted."""
    monkeypatch.setattr(_JSONStream, "_CHUNK", 3)
    doc = '{"info": {"a": [1, 2]},\n "questions": [\n {"question_id": 123456789},\n {"question_id": 7}\n ]}'
    s = _JSONStream(io.StringIO(doc), Path("x.json"))
    s.expect("{")
    assert s.value() == "info"
    s.expect(":")
    assert s.value() == {"a": [1, 2]}
    s.expect(",")
    assert s.value() == "questions"
    s.expect(":")
    assert list(s.array()) == [(3, {"question_id": 123456789}), (4, {"question_id": 7})]


def test_iter_json_array_key_and_errors(tmp_path):
    p = tmp_path / "q.json"
    p.write_text('{"info": {}, "questions": [{"a": 1}, {"a": 2}]}')
    assert [e for _, e in iter_json_array(p, "questions")] == [{"a": 1}, {"a": 2}]
    with pytest.raises(DataError, match="missing field"):
        list(iter_json_array(p, "annotations"))
    p.write_text('[{"a": 1},\n {"a": 2]')
    with pytest.raises(DataError, match=r"q.json:2: malformed JSON"):
        list(iter_json_array(p))


def test_tokenize():
    assert tokenize("A man's hat, isn't it?") == ["A", "man's", "hat", ",", "isn't", "it", "?"]


def test_unknown_task():
    with pytest.raises(DataError, match="unknown task 'gqa'"):
        reader("gqa")
