"""A sweep's best student: exported from its best trial's checkpoint as a transformers folder,
logged once as an MLflow model of that trial's run and listed among the parent run's outputs."""

from __future__ import annotations

import torch

from cliptd.core.config import resolve_config
from cliptd.model.student import load_student
from cliptd.tracking import runs as tracking
from cliptd.training.loop import train_loop
from cliptd.training.runtime import LocalRuntime
from cliptd.tune import log_best_student


def test_best_student_is_exported_and_logged_once(tiny_world, vcr_cache, tmp_path):
    from ray.tune import Checkpoint

    cfg = resolve_config({"task": "vcr", "data": str(tiny_world.data["vcr"]),
                          "student": str(tiny_world.student), "teacher_cache": str(vcr_cache),
                          "preset": "synthetic", "epochs": 1, "batch_size": 8,
                          "distill": {"method": "cliptd"}})
    rt = LocalRuntime(keep_dir=tmp_path / "trial")
    train_loop(cfg, rt)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.get_experiment(uri, "cliptd-vcr")
    c = tracking.client(uri)
    parent = c.create_run(exp, tags={"cliptd.sweep_id": "s"}).info.run_id
    trial = c.create_run(exp, tags={"cliptd.trial_id": "s/t1",
                                    "mlflow.parentRunId": parent}).info.run_id
    result = {"checkpoint": Checkpoint.from_directory(str(tmp_path / "trial" / "epoch-001")),
              "best_trial": "s/t1", "best_epoch": 1}

    folder, model_id = log_best_student(tmp_path / "out", "s", "synthetic-shots0.05", "cliptd",
                                        result, uri, exp, parent)
    assert folder == tmp_path / "out" / "best" / "synthetic-shots0.05-cliptd-student"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    student, _ = load_student(folder)  # the exported student is the trained one
    trained = {k.removeprefix("student."): v for k, v in torch.load(
        tmp_path / "trial" / "epoch-001" / "checkpoint.pt", weights_only=True)["model"].items()
        if k.startswith("student.")}
    for key, value in student.state_dict().items():
        assert torch.equal(value, trained[key]), key

    model = c.get_logged_model(model_id)
    assert model.source_run_id == trial and "READY" in str(model.status)
    assert model.name == "s-synthetic-shots0_05-cliptd-student"  # '.' is not allowed
    assert c.get_run(parent).data.tags["cliptd.best_model.synthetic-shots0.05.cliptd"] == model_id
    assert [o.model_id for o in c.get_run(parent).outputs.model_outputs] == [model_id]
    assert [o.model_id for o in c.get_run(trial).outputs.model_outputs] == [model_id]

    # a resumed sweep finds it: no second export or model
    again = log_best_student(tmp_path / "out", "s", "synthetic-shots0.05", "cliptd", result,
                             uri, exp, parent)
    assert again == (folder, model_id)
    assert len(c.search_logged_models([exp])) == 1
    # a trial that kept no checkpoint: nothing to log
    assert log_best_student(tmp_path / "out", "s", "x", "none", {"checkpoint": None}, uri, exp,
                            parent) == (None, None)
