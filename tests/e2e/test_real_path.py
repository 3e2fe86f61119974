"""The real path, through the commands alone, on artifacts in the exact layouts users have:
dataset files as VCR / SNLI-VE / VQA v2 ship them (tests/fixtures/real), a VisualBERT folder
as ``uclanlp/visualbert-vcr`` is downloaded (visual size ≠ hidden size, no tokenizer: a
bert-base-uncased-style one beside it), an LXMERT folder as ``unc-nlp/lxmert-base-uncased``
(with its WordPiece tokenizer), and an open_clip teacher by its real architecture name
(``ViT-S-32-alt``) with a local weights file.

    data prepare (3 tasks) → teacher_cache → tune (VCR, VisualBERT) → report;
    train (SNLI-VE, LXMERT, --teacher building its cache; VQA, VisualBERT)

Every trial and run ends FINISHED in MLflow with its metrics, its dataset input and the
source commit; a train run's exported student is its logged model and loads with
transformers alone."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from _cli import run_cli
from _hub import bert_tokenizer, lxmert_checkpoint, open_clip_weights, visualbert_checkpoint

pytestmark = pytest.mark.slow
FIX = Path(__file__).parents[1] / "fixtures" / "real"
TEACHER = "ViT-S-32-alt"


def _run(tmp: Path, name: str, *args: str, timeout: float = 600):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PYTHONUNBUFFERED": "1",
           "CLIPTD_CACHE": str(tmp / "cache"), "CLIPTD_TRACKING_BUFFER": str(tmp / "buffer")}
    proc = run_cli([sys.executable, "-m", *args], env, tmp, timeout, tmp / f"{name}.log")
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-4000:]}"
    return proc.stdout


def test_real_layouts_through_the_commands(tmp_path):
    start = time.time()
    from mlflow.tracking import MlflowClient

    from cliptd.data.corpus import dataset_words

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = {}
    for task, extra in (("vcr", []), ("snli_ve", ["--boxes", str(FIX / "snli_ve" / "boxes.json")]),
                        ("vqa", ["--grid", "2"])):
        data[task] = tmp_path / "prepared" / task
        _run(tmp_path, f"prepare-{task}", "cliptd.data", "prepare", "--task", task, "--src",
             str(FIX / task), "--out", str(data[task]), *extra)
    words = set().union(*(dataset_words(d) for d in data.values()))
    hub = tmp_path / "hub"
    vocab = bert_tokenizer(hub / "bert-base-uncased", words)
    visualbert = visualbert_checkpoint(hub / "visualbert-vcr", vocab)
    lxmert = lxmert_checkpoint(hub / "lxmert-base-uncased", words)
    weights = open_clip_weights(hub / f"{TEACHER}.bin", TEACHER)
    assert json.loads((visualbert / "config.json").read_text())["visual_embedding_dim"] != 64
    assert not (visualbert / "vocab.txt").exists() and (visualbert / "pytorch_model.bin").exists()

    out = _run(tmp_path, "teacher-cache-vcr", "cliptd.teacher_cache", "--data",
               str(data["vcr"]), "--teacher", f"{TEACHER}:{weights}", "--out",
               str(tmp_path / "teacher_cache"))
    vcr_cache = Path(re.search(r"^teacher cache: (\S+)$", out, re.M).group(1))
    assert (vcr_cache / "_SUCCESS").exists()
    assert re.search(r"problems/s", out)

    out = _run(tmp_path, "tune-vcr", "cliptd.tune", "--task", "vcr", "--budget", "small",
               "--data", str(data["vcr"]), "--student", str(visualbert), "--tokenizer",
               str(hub / "bert-base-uncased"), "--teacher-cache", str(vcr_cache),
               "--shots", "1.0", "--presets", "none", "--methods", "none,cliptd",
               "--num-samples", "1", "--name", "real", "--out", str(tmp_path / "out"),
               "--storage-path", str(tmp_path / "ray"), "--tracking-uri", uri, timeout=900)
    assert "== Comparison" in out
    for task, student, extra in (
            ("snli_ve", lxmert, ["--teacher", f"{TEACHER}:{weights}", "--method", "cliptd"]),
            ("vqa", visualbert, ["--tokenizer", str(hub / "bert-base-uncased"),
                                 "--method", "none"])):
        _run(tmp_path, f"train-{task}", "cliptd.train", "--task", task, "--data",
             str(data[task]), "--student", str(student), *extra, "--epochs", "1",
             "--name", f"real-{task}", "--storage-path", str(tmp_path / "ray"),
             "--tracking-uri", uri, "--export", str(tmp_path / f"student-{task}"))
    _run(tmp_path, "report", "cliptd.report", "--task", "vcr", "--tracking-uri", uri,
         "--out", str(tmp_path / "report"))
    assert (tmp_path / "report" / "comparison.md").exists()

    from transformers import AutoModel, AutoTokenizer

    c = MlflowClient(uri)
    trials = c.search_runs([c.get_experiment_by_name("cliptd-vcr").experiment_id],
                           filter_string="tags.`cliptd.kind` = 'trial'")
    assert len(trials) >= 3
    for run in trials:
        assert run.info.status == "FINISHED", run.data.tags
        assert "val/id/q_a" in run.data.metrics and run.data.tags["mlflow.source.git.commit"]
        (ds,) = run.inputs.dataset_inputs
        assert ds.dataset.digest and "vcr" in ds.dataset.name
    # the sweep's best VisualBERT student per method: logged from its best trial's run
    models = c.search_logged_models([trials[0].info.experiment_id])
    assert sorted(m.name for m in models) == ["real-none-shots1_0-cliptd-student",
                                              "real-none-shots1_0-none-student"], models
    assert {m.source_run_id for m in models} <= {r.info.run_id for r in trials}
    assert AutoModel.from_pretrained(tmp_path / "out" / "best" / "none-shots1.0-cliptd-student"
                                     ).config.model_type == "visual_bert"
    for task in ("snli_ve", "vqa"):
        exp = c.get_experiment_by_name(f"cliptd-{task}")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        (run,) = c.search_runs([exp.experiment_id], filter_string="tags.`cliptd.kind` = 'train'")
        assert run.info.status == "FINISHED"
        assert any(k.startswith("val/id/") for k in run.data.metrics)
        assert run.inputs.dataset_inputs and run.outputs.model_outputs
        (model,) = c.search_logged_models(experiment_ids=[exp.experiment_id])
        assert str(model.status).endswith("READY") and model.source_run_id == run.info.run_id
    # the exported students load with transformers alone: a transformers folder
    for task, kind in (("snli_ve", "lxmert"), ("vqa", "visual_bert")):
        folder = tmp_path / f"student-{task}"
        assert AutoModel.from_pretrained(folder).config.model_type == kind
        assert len(AutoTokenizer.from_pretrained(folder)) == vocab
    print(f"real path: {time.time() - start:.0f} s")
