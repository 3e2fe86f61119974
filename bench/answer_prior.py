"""The answer prior per question type: what a model that never looks at the image scores by
choosing, among a VCR question's four answers, the one most often gold in training for that
question type (ties split evenly). The floor a student must be "far above".

    .venv/bin/python bench/answer_prior.py .cliptd_cache/prepared/vcr-seed0-scale1 \
        --preset synthetic --out bench/results/answer-prior.json

Training rows are those the preset trains on (``synthetic``: the source domain); the
validation split is scored in-domain (``id``, the rows the preset trains on) and shifted
(``shift``, the rows it evaluates on), as ``val/id/…`` and ``val/shift/…`` are.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa

from cliptd.data.prepare import read_split
from cliptd.data.subsets import domain_preset


def answer_key(words: list) -> str:
    return " ".join(w if isinstance(w, str) else "<ref>" for w in words)


def prior_accuracy(train_rows: list[dict], eval_rows: list[dict]) -> dict[str, float]:
    """{qtype: accuracy %} on ``eval_rows`` of choosing the candidate most often gold among
    ``train_rows`` of the same question type (rows: ``qtype``, ``candidates``, ``label``)."""
    gold = defaultdict(Counter)
    for row in train_rows:
        gold[row["qtype"]][answer_key(row["candidates"][row["label"]])] += 1
    scores = defaultdict(list)
    for row in eval_rows:
        counts = [gold[row["qtype"]][answer_key(c)] for c in row["candidates"]]
        best = [i for i, n in enumerate(counts) if n == max(counts)]
        scores[row["qtype"]].append((row["label"] in best) / len(best))
    return {q: round(100 * sum(s) / len(s), 1) for q, s in sorted(scores.items())}


def answer_prior(data: Path, preset: str) -> dict[str, dict[str, float]]:
    """{"id" | "shift": {qtype: accuracy %}} on the validation split."""
    rule = domain_preset(preset)
    columns = ["qtype", "candidates", "label"]
    train = read_split(data, "train")
    train_rows = train.filter(pa.array(rule.train_mask(train))).select(columns).to_pylist()
    val = read_split(data, "val")
    # in-domain: the rows the preset would train on; shifted: the rows it evaluates on
    return {name: prior_accuracy(train_rows, val.filter(pa.array(mask)).select(columns)
                                 .to_pylist())
            for name, mask in (("id", rule.train_mask(val)), ("shift", rule.eval_mask(val)))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a prepared VCR dataset folder")
    parser.add_argument("--preset", default="synthetic", help="domain-shift preset")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    prior = answer_prior(args.data, args.preset)
    for domain, per_type in prior.items():
        print(f"{domain}: " + ", ".join(f"{q} {v:.1f} %" for q, v in per_type.items()))
    if args.out:
        args.out.write_text(json.dumps({"data": str(args.data), "preset": args.preset,
                                        "val_accuracy_pct": prior}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
