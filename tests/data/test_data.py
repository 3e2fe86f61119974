"""prepare / read / subsets / presets, and one test per kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cliptd.core.errors import DataError
from cliptd.data import __main__ as data_cli
from cliptd.data.prepare import (
    answer_vocab,
    iter_batches,
    load_manifest,
    prepare,
    read_split,
    soft_targets,
)
from cliptd.data.schema import INSTANCE_SCHEMA
from cliptd.data.subsets import DOMAIN_PRESETS, FRACTIONS, subset_ids

FIX = Path(__file__).parents[1] / "fixtures" / "real"


def copy(task: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIX / task, tmp_path / f"src-{task}"))


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert leftovers(out) == []


@pytest.fixture(scope="module")
def vcr_data(tmp_path_factory) -> Path:
    return prepare("vcr", FIX / "vcr", tmp_path_factory.mktemp("p") / "vcr", progress=False)


@pytest.fixture(scope="module")
def snli_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p") / "snli"
    return prepare("snli_ve", FIX / "snli_ve", out, domains=FIX / "snli_ve" / "domains.json", progress=False)


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> Path:
    return prepare("vqa", FIX / "vqa", tmp_path_factory.mktemp("p") / "vqa", grid=2, progress=False)


# --- prepare and read -------------------------------------------------------------------


def test_manifest(vcr_data):
    m = load_manifest(vcr_data)
    assert m["task"] == "vcr" and m["schema_version"] == 1
    assert m["counts"] == {"train": 3, "val": 2, "test": 1}
    assert m["image_root"] == str((FIX / "vcr" / "vcr1images").resolve())
    assert len(m["version"]) == 16 and m["source"]["files"] == ["train.jsonl", "val.jsonl", "test.jsonl"]
    img = read_split(vcr_data, "train")["image"][0].as_py()
    assert (Path(m["image_root"]) / img).is_file()


def test_read_split_and_batches(tmp_path):
    out = prepare("snli_ve", FIX / "snli_ve", tmp_path / "d", shard_rows=3, progress=False)
    files = sorted(p.name for p in (out / "train").iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet"]  # 4 rows, at most 3 per shard
    assert [pq.read_metadata(out / "train" / f).num_rows for f in files] == [3, 1]
    table = read_split(out, "train")
    assert table.schema.equals(INSTANCE_SCHEMA) and table.num_rows == 4
    assert read_split(out, "train", columns=["id", "label"]).column_names == ["id", "label"]
    batches = list(iter_batches(out, "train", batch_size=2))
    assert [b.num_rows for b in batches] == [2, 1, 1]
    assert pa.Table.from_batches(batches)["id"].to_pylist() == table["id"].to_pylist()
    with pytest.raises(DataError, match="no split 'val'"):
        read_split(out, "val")


def test_version_is_a_content_hash(tmp_path):
    src = copy("snli_ve", tmp_path)
    a = load_manifest(prepare("snli_ve", src, tmp_path / "a", progress=False))["version"]
    b = load_manifest(prepare("snli_ve", src, tmp_path / "b", progress=False))["version"]
    assert a == b
    with open(src / "snli_ve_dev.jsonl", "a") as f:
        f.write("\n")  # any byte of an input changes the version
    c = load_manifest(prepare("snli_ve", src, tmp_path / "c", progress=False))["version"]
    g = load_manifest(prepare("snli_ve", src, tmp_path / "g", grid=3, progress=False))["version"]
    assert len({a, c, g}) == 3


def test_reprepare_replaces_and_cleans_stale_temp_dirs(tmp_path):
    out = tmp_path / "d"
    prepare("snli_ve", FIX / "snli_ve", out, progress=False)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f"d.tmp-{dead}"
    (stale / "train").mkdir(parents=True)
    prepare("snli_ve", FIX / "snli_ve", out, grid=2, progress=False)
    assert leftovers(out) == ["d"]
    assert load_manifest(out)["source"]["grid"] == 2


def test_interrupted_prepare_leaves_no_output(tmp_path, monkeypatch):
    """A crash after some shards were written removes everything."""
    real_write = pq.ParquetWriter.write_table
    calls = {"n": 0}

    def crash_on_second_write(self, table, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_write(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", crash_on_second_write)
    out = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        prepare("snli_ve", FIX / "snli_ve", out, shard_rows=1, progress=False)
    assert calls["n"] == 2
    assert_nothing_written(out)


def test_vqa_prepare(vqa_data):
    m = load_manifest(vqa_data)
    assert m["counts"] == {"train": 3, "val": 2} and m["source"]["grid"] == 2
    assert m["image_root"] == str((FIX / "vqa").resolve())
    assert all(len(b) == 5 for b in read_split(vqa_data, "val")["boxes"].to_pylist())


# --- low-shot subsets -------------------------------------------------------------------


def test_fraction_subsets_are_nested_and_stored(tmp_path):
    out = prepare("snli_ve", FIX / "snli_ve", tmp_path / "d", progress=False)
    subsets = {f: subset_ids(out, "train", fraction=f, seed=0) for f in FRACTIONS}
    assert [len(s) for s in subsets.values()] == [1, 1, 1, 1, 4]  # ceil(f * 4)
    for small, big in zip(FRACTIONS, FRACTIONS[1:], strict=False):
        assert subsets[big][: len(subsets[small])] == subsets[small]
    assert sorted(subsets[1.0]) == sorted(read_split(out, "train")["id"].to_pylist())
    stored = pq.read_table(out / "subsets" / "train-frac0.05-seed0.parquet")
    meta = stored.schema.metadata
    assert meta[b"seed"] == b"0" and b"permutation" in meta[b"rule"]
    assert meta[b"version"].decode() == load_manifest(out)["version"]
    # Stored, so not recomputed: a hand-edited file is returned as is.
    pq.write_table(stored.replace_schema_metadata(meta).slice(0, 0), out / "subsets" / "train-frac0.05-seed0.parquet")
    assert subset_ids(out, "train", fraction=0.05, seed=0) == []
    # Another seed, another order (4 rows: 24 permutations; seeds 0 and 1 differ).
    assert subset_ids(out, "train", fraction=1.0, seed=1) != subsets[1.0]


def test_kshot_subsets_are_nested_per_class(vcr_data, snli_data):
    one = subset_ids(snli_data, "train", kshot=1)
    two = subset_ids(snli_data, "train", kshot=2)
    labels = dict(zip(*read_split(snli_data, "train", ["id", "label"]).to_pydict().values(), strict=True))
    assert sorted(labels[i] for i in one) == [0, 1, 2]
    assert set(one) <= set(two) and sorted(labels[i] for i in two) == [0, 0, 1, 2]
    assert len(subset_ids(vcr_data, "train", kshot=1)) == 2  # answer_label 0 and 3


def test_empty_subset_is_an_error(vcr_data):
    with pytest.raises(DataError, match="subset test-k1-seed0 is empty"):
        subset_ids(vcr_data, "test", kshot=1)  # the test split has no labels


def test_subsets_cli(snli_data, capsys):
    assert data_cli.main(["subsets", "--data", str(snli_data), "--split", "train", "--kshots", "1"]) == 0
    assert "train k=1 seed 0: 3 ids" in capsys.readouterr().out


# --- presets and answers ----------------------------------------------------------------


def test_domain_presets(vcr_data, snli_data, vqa_data):
    vcr = read_split(vcr_data, "train")
    preset = DOMAIN_PRESETS["vcr-qtype"]
    assert "explanation" in preset.rule
    assert preset.train_mask(vcr).tolist() == [True, True, False]  # explanation, activity, scene
    assert preset.eval_mask(vcr).tolist() == [False, False, True]
    snli = read_split(snli_data, "train")
    syn = DOMAIN_PRESETS["synthetic"]
    assert syn.train_mask(snli).tolist() == [True, True, False, True]
    assert syn.eval_mask(snli).tolist() == [False, False, True, False]
    assert DOMAIN_PRESETS["none"].eval_mask(snli).all()
    with pytest.raises(DataError, match="unknown domain preset 'nope'"):
        DOMAIN_PRESETS["nope"]
    with pytest.raises(DataError, match="--variant vqacp"):
        DOMAIN_PRESETS["vqa-cp"].check(load_manifest(vqa_data))
    with pytest.raises(DataError, match="applies to vcr"):
        preset.check(load_manifest(snli_data))


def test_vqacp_preset(tmp_path):
    out = prepare("vqa", FIX / "vqa", tmp_path / "cp", variant="vqacp", progress=False)
    preset = DOMAIN_PRESETS["vqa-cp"]
    preset.check(load_manifest(out))
    assert preset.eval_split == "test" and load_manifest(out)["counts"] == {"train": 2, "test": 2}


def test_answer_vocab_and_soft_targets(vqa_data):
    table = read_split(vqa_data, "train")
    assert answer_vocab(table, 10) == ["2", "net", "yes"]
    assert answer_vocab(table, 1) == ["2"]
    index = {"2": 0, "3": 1, "net": 2}
    answers = table["answers"][1].as_py()  # 7 x "2" (+ 2 x "two" -> "2"), 1 x "3"
    assert soft_targets(answers, index) == {0: 1.0, 1: 0.3}
    assert soft_targets(["net", "net", "mesh"], index) == {2: 0.6}


# --- bad input: a clear error, nothing written -----------------------------------------


def expect_error(tmp_path, task, src, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match) as err:
        prepare(task, src, out, progress=False, **kwargs)
    assert_nothing_written(out)
    return err.value


def edit_line(path: Path, lineno: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("\n".join(lines) + "\n")


def edit_record(path: Path, lineno: int, edit) -> None:
    def apply(text: str) -> str:
        rec = json.loads(text)
        edit(rec)
        return json.dumps(rec)

    edit_line(path, lineno, apply)


def test_bad_malformed_json_line(tmp_path):
    src = copy("vcr", tmp_path)
    edit_line(src / "val.jsonl", 2, lambda s: s[:-5])
    err = expect_error(tmp_path, "vcr", src, "malformed JSON")
    assert (Path(err.file).name, err.line) == ("val.jsonl", 2)


def test_bad_missing_field(tmp_path):
    src = copy("snli_ve", tmp_path)
    edit_record(src / "snli_ve_train.jsonl", 3, lambda r: r.pop("sentence2"))
    err = expect_error(tmp_path, "snli_ve", src, r"snli_ve_train.jsonl:3: field 'sentence2': missing field")
    assert err.field == "sentence2"


def test_bad_missing_label_outside_test(tmp_path):
    src = copy("vcr", tmp_path)
    edit_record(src / "train.jsonl", 1, lambda r: r.pop("answer_label"))
    expect_error(tmp_path, "vcr", src, r"train.jsonl:1: field 'answer_label': missing field")


def test_bad_label_out_of_range(tmp_path):
    src = copy("vcr", tmp_path)
    edit_record(src / "train.jsonl", 2, lambda r: r.update(rationale_label=4))
    expect_error(tmp_path, "vcr", src, r"train.jsonl:2: field 'rationale_label': label 4 out of range")


def test_bad_snli_label(tmp_path):
    src = copy("snli_ve", tmp_path)
    edit_record(src / "snli_ve_dev.jsonl", 1, lambda r: r.update(gold_label="-"))
    expect_error(tmp_path, "snli_ve", src, r"snli_ve_dev.jsonl:1: field 'gold_label': label '-' out of range")


def test_bad_object_reference(tmp_path):
    src = copy("vcr", tmp_path)
    edit_record(src / "val.jsonl", 1, lambda r: r["answer_choices"][2].append([2]))
    expect_error(tmp_path, "vcr", src, r"val.jsonl:1: field 'answer_choices\[2\]': object reference 2 out of range")


def test_bad_missing_image(tmp_path):
    src = copy("snli_ve", tmp_path)
    (src / "flickr30k_images" / "4896371327.jpg").unlink()
    expect_error(tmp_path, "snli_ve", src, r"snli_ve_train.jsonl:3: field 'Flikr30kID': missing image")


def test_bad_missing_vqa_image(tmp_path):
    src = copy("vqa", tmp_path)
    (src / "val2014" / "COCO_val2014_000000262148.jpg").unlink()
    expect_error(tmp_path, "vqa", src, r"v2_mscoco_val2014_annotations.json:\d+: field 'image_id': missing image")


def test_bad_missing_metadata(tmp_path):
    src = copy("vcr", tmp_path)
    next((src / "vcr1images").glob("movieclips*/*.json")).unlink()
    expect_error(tmp_path, "vcr", src, r"train.jsonl:3: field 'metadata_fn': missing metadata file")


def test_bad_box_outside_image(tmp_path):
    src = copy("vcr", tmp_path)
    meta_path = next((src / "vcr1images").glob("movieclips*/*.json"))
    meta = json.loads(meta_path.read_text())
    meta["boxes"][1][2] = 25.5  # 1.5 px past the 24 px wide image: beyond the tolerance
    meta_path.write_text(json.dumps(meta))
    expect_error(tmp_path, "vcr", src, r"field 'boxes\[1\]': box .* outside its 24x16 image")


def test_bad_box_file(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"2248275918.jpg": [[0, 0, 30, 6]]}))
    expect_error(tmp_path, "snli_ve", FIX / "snli_ve", r"boxes.json: field '2248275918.jpg': box", boxes=boxes)


def test_bad_vqa_missing_question(tmp_path):
    src = copy("vqa", tmp_path)
    q = json.loads((src / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    q["questions"].pop()
    (src / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(q))
    expect_error(tmp_path, "vqa", src, "question 42001 not in v2_OpenEnded_mscoco_val2014_questions.json")


def test_bad_unknown_task(tmp_path):
    expect_error(tmp_path, "gqa", FIX / "vcr", "unknown task 'gqa'")


def test_cli_prints_one_clean_line(tmp_path):
    src = copy("vcr", tmp_path)
    edit_line(src / "train.jsonl", 1, lambda s: "{oops")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "cliptd.data", "prepare", "--task", "vcr", "--src", str(src), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("train.jsonl:1: malformed JSON: Expecting property name enclosed in double quotes (column 2)")
    assert_nothing_written(out)


def test_bad_missing_vcr_image(tmp_path):
    src = copy("vcr", tmp_path)
    next((src / "vcr1images").glob("movieclips*/*.jpg")).unlink()
    expect_error(tmp_path, "vcr", src, r"train.jsonl:3: field 'img_fn': missing image")
