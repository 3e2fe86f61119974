"""Bad real inputs are refused before Ray starts: one line naming the file or field, exit 2,
nothing written — a folder that is no VisualBERT / LXMERT checkpoint, a checkpoint without
weights or tokenizer, a tokenizer too large for it, an unknown open_clip model, a weights
file of another architecture, a teacher cache built for other data or another teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _hub import bert_tokenizer, open_clip_weights, visualbert_checkpoint

from cliptd import train, tune
from cliptd.data.prepare import prepare

FIX = Path(__file__).parents[1] / "fixtures" / "real"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    data = prepare("vcr", FIX / "vcr", root / "vcr", progress=False)
    vocab = bert_tokenizer(root / "bert", ["is", "happy", "casey"])
    return {"root": root, "data": data, "tok": root / "bert",
            "visualbert": visualbert_checkpoint(root / "visualbert", vocab)}


def _refused(capsys, main, argv, cwd: Path) -> str:
    before = sorted(p.name for p in cwd.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # one line of ours (MLflow may log its store's creation), no traceback
    ours = [line for line in err.splitlines() if line.startswith("cliptd: error: ")]
    assert len(ours) == 1 and "Traceback" not in err, err
    # nothing half-written: no run folder, no sweep output (the tracking store may appear)
    assert sorted(p.name for p in cwd.iterdir() if p.name != "mlflow.db") == \
        [n for n in before if n != "mlflow.db"]
    return ours[0]


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _common(real, cwd):
    return ["--task", "vcr", "--data", str(real["data"]),
            "--tracking-uri", f"sqlite:///{cwd / 'mlflow.db'}",
            "--storage-path", str(cwd / "ray")]


@pytest.mark.parametrize("main", [train.main, tune.main], ids=["train", "tune"])
def test_not_a_checkpoint(real, cwd, capsys, main):
    bert = cwd / "bert-base"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    msg = _refused(capsys, main, [*_common(real, cwd), "--student", str(bert),
                                  "--method" if main is train.main else "--methods", "none"],
                   cwd)
    assert f"{bert}/config.json" in msg and "model_type" in msg and "'bert'" in msg


def test_missing_folder_weights_and_tokenizer(real, cwd, capsys):
    args = [*_common(real, cwd), "--method", "none", "--student"]
    msg = _refused(capsys, train.main, [*args, str(cwd / "nowhere")], cwd)
    assert "nowhere: no such student folder" in msg
    no_weights = cwd / "no-weights"
    shutil.copytree(real["visualbert"], no_weights)
    (no_weights / "pytorch_model.bin").unlink()
    assert "no weights (model.safetensors or pytorch_model.bin)" in _refused(
        capsys, train.main, [*args, str(no_weights)], cwd)
    msg = _refused(capsys, train.main, [*args, str(real["visualbert"])], cwd)
    assert "no tokenizer" in msg and "--tokenizer" in msg and "bert-base-uncased" in msg
    big = cwd / "big-tok"
    bert_tokenizer(big, [f"w{i}" for i in range(400)])
    msg = _refused(capsys, train.main, [*args, str(real["visualbert"]), "--tokenizer",
                                        str(big)], cwd)
    assert "not its tokenizer" in msg


def test_teacher_refusals(real, cwd, capsys, tmp_path_factory):
    args = [*_common(real, cwd), "--method", "cliptd", "--student", str(real["visualbert"]),
            "--tokenizer", str(real["tok"])]
    msg = _refused(capsys, train.main, [*args, "--teacher", "vit-s-32-alt"], cwd)
    assert "unknown open_clip model 'vit-s-32-alt'" in msg and "'ViT-S-32-alt'" in msg
    msg = _refused(capsys, train.main, [*args, "--teacher", f"ViT-S-32-alt:{cwd / 'x.bin'}"],
                   cwd)
    assert "x.bin: no such weights file" in msg
    weights = open_clip_weights(tmp_path_factory.mktemp("w") / "s32.bin", "ViT-S-32-alt")
    msg = _refused(capsys, train.main, [*args, "--teacher", f"ViT-S-16-alt:{weights}"], cwd)
    assert "s32.bin: not ViT-S-16-alt weights" in msg and "visual." in msg
    msg = _refused(capsys, train.main, [*args], cwd)
    assert "distillation needs a teacher" in msg


def test_cache_for_other_data_split_or_teacher(real, cwd, capsys, tiny_world):
    from cliptd.teacher.cache import ensure_cache
    from cliptd.teacher.clip import Teacher

    args = [*_common(real, cwd), "--method", "cliptd", "--student", str(real["visualbert"]),
            "--tokenizer", str(real["tok"])]
    other = ensure_cache(Teacher.load(tiny_world.teacher), tiny_world.data["vcr"],
                         real["root"] / "tc", progress=False)
    msg = _refused(capsys, train.main, [*args, "--teacher-cache", str(other)], cwd)
    assert "was built for other data" in msg
    meta = json.loads((other / "meta.json").read_text())
    copy = cwd / "cache-copy"
    shutil.copytree(other, copy)
    meta["source"] = {"data": str(real["data"]), "version": json.loads(
        (real["data"] / "manifest.json").read_text())["version"], "split": "val"}
    (copy / "meta.json").write_text(json.dumps(meta))
    msg = _refused(capsys, train.main, [*args, "--teacher-cache", str(copy)], cwd)
    assert "holds split 'val', not 'train'" in msg
    meta["source"]["split"] = "train"
    (copy / "meta.json").write_text(json.dumps(meta))
    msg = _refused(capsys, train.main, [*args, "--teacher-cache", str(copy), "--teacher",
                                        "RN50"], cwd)
    assert "was built by" in msg and "not RN50:none" in msg
