"""``bench/merge_science.py``: science runs split across files are paired by seed as one
experiment; a renamed variant is its own method; a record given twice is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("merge_science", ROOT / "bench/merge_science.py")
merge_science = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merge_science)


def _file(path: Path, runs: list[tuple[str, int, float]]) -> str:
    records = [{"condition": "shots=0.05", "method": m, "seed": s,
                "metrics": {"val/id/q_a": v, "val/id/words/unseen/q_a": v / 2, "step": 10}}
               for m, s, v in runs]
    path.write_text(json.dumps({"records": records}))
    return str(path)


def test_merged_files_pair_by_seed_and_rename(tmp_path, capsys):
    a = _file(tmp_path / "a.json", [("none", 0, 0.5), ("cliptd", 0, 0.6), ("none", 1, 0.4),
                                    ("cliptd", 1, 0.35)])
    b = _file(tmp_path / "b.json", [("cliptd", 0, 0.7), ("cliptd", 1, 0.5)])
    out, png = tmp_path / "merged.json", tmp_path / "paired.png"
    assert merge_science.main([a, f"{b}:cliptd=cliptd-fr", "--out", str(out),
                               "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    paired = {(r["metric"]): r for r in json.loads(out.read_text())["paired"]}
    row = paired["in-domain q_a"]
    assert row["cliptd"] == "+2.5 ± 10.6 (1/2)" and row["cliptd-fr"] == "+15.0 ± 7.1 (2/2)"
    assert paired["in-domain q_a [words: unseen]"]["cliptd-fr_mean"] == pytest.approx(7.5)
    assert "steps trained" in capsys.readouterr().out


def test_a_record_given_twice_is_refused(tmp_path, capsys):
    a = _file(tmp_path / "a.json", [("none", 0, 0.5)])
    assert merge_science.main([a, a]) == 2
    assert "already in an earlier file" in capsys.readouterr().err
