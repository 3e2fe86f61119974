"""``load_checkpoint_file`` loads our checkpoints and refuses everything else, without ever
running code hidden in a pickle."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from cliptd.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint_file


def _touch(path: str) -> None:
    Path(path).write_text("payload ran\n")


class Payload:
    """Unpickling this runs ``_touch(marker)``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


class ShellPayload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _valid_state() -> dict:
    torch.manual_seed(0)
    return {"format": CHECKPOINT_FORMAT, "model": {"w": torch.randn(64, 64), "b": torch.zeros(64)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "epoch": 2, "step": 40, "config": {"task": "vcr", "lr": 1e-4},
            "metrics": {"score": 0.5}, "rng": {"torch": torch.get_rng_state()}}


def test_valid_checkpoint_loads(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = _valid_state()
    torch.save(state, path)
    loaded = load_checkpoint_file(path)
    assert loaded["format"] == CHECKPOINT_FORMAT
    assert loaded["epoch"] == 2 and loaded["config"] == state["config"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_plain_state_dict_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save(OrderedDict(w=torch.ones(3)), path)
    with pytest.raises(ValueError, match="not a cliptd checkpoint") as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("obj", [[1, 2, 3], torch.ones(2), {"format": "other-v9"},
                                 {"format": "cliptd-checkpoint-v0", "model": {}}])
def test_wrong_format_refused(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)


def test_truncated_checkpoint_refused(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(_valid_state(), full)
    data = full.read_bytes()
    assert len(data) > 10_000
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a loadable cliptd checkpoint") as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)


def test_garbage_file_refused(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"definitely not a checkpoint\n" * 10)
    with pytest.raises(ValueError) as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)


def test_missing_file_refused(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(ValueError) as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)


def test_empty_file_refused(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("payload_cls", [Payload, ShellPayload])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickled_payload_refused_and_not_run(tmp_path, payload_cls, writer):
    marker = tmp_path / "side-effect"
    state = _valid_state()
    state["extra"] = payload_cls(marker)
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(state, path)
    else:  # a legacy (non-zip) pickle stream
        with path.open("wb") as f:
            pickle.dump(state, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a loadable cliptd checkpoint") as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)
    assert not marker.exists(), "the pickled payload ran"


def test_payload_is_live_when_loaded_unsafely(tmp_path):
    """Control: the crafted file really does run code with weights_only=False, so the test
    above proves the refusal and not a dud payload."""
    marker = tmp_path / "side-effect"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "x": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "payload ran\n"
