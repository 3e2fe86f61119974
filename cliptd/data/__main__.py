"""Prepared datasets: real files -> Parquet shards, low-shot subsets, domain-shift presets.

CLI::

    python -m cliptd.data prepare --task {vcr,snli_ve,vqa} --src DIR --out DIR
                                  [--boxes FILE | --grid N] [--domains FILE] [--variant vqacp]
    python -m cliptd.data subsets --data DIR --split train --seed 0

The work is in ``cliptd.data.prepare`` (written whole or not at all) and
``cliptd.data.subsets``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cliptd.core.errors import DataError
from cliptd.core.invocation import prog
from cliptd.data.prepare import SHARD_ROWS, load_manifest, prepare
from cliptd.data.subsets import FRACTIONS, KSHOTS, subset_ids


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("cliptd.data"), description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="real files -> Parquet shards + manifest")
    pr.add_argument("--task", required=True, help="vcr, snli_ve or vqa")
    pr.add_argument("--src", required=True, type=Path)
    pr.add_argument("--out", required=True, type=Path)
    regions = pr.add_mutually_exclusive_group()
    regions.add_argument("--boxes", type=Path, help="JSON: image path -> [[x1, y1, x2, y2], ...]")
    regions.add_argument("--grid", type=int, help="N: an N x N grid of regions")
    pr.add_argument("--domains", type=Path, help="JSON: image path -> domain")
    pr.add_argument("--variant", choices=["vqacp"])
    pr.add_argument("--shard-rows", type=int, default=SHARD_ROWS)
    su = sub.add_parser("subsets", help="write the low-shot id lists of a split")
    su.add_argument("--data", required=True, type=Path)
    su.add_argument("--split", default="train")
    su.add_argument("--seed", type=int, default=0)
    su.add_argument("--fractions", type=float, nargs="*", default=list(FRACTIONS))
    su.add_argument("--kshots", type=int, nargs="*", default=list(KSHOTS))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            out = prepare(
                args.task, args.src, args.out, boxes=args.boxes, grid=args.grid,
                domains=args.domains, variant=args.variant, shard_rows=args.shard_rows,
            )  # fmt: skip
            m = load_manifest(out)
            print(f"wrote {out} (version {m['version']}): {m['counts']}")
        else:
            for f in args.fractions:
                print(f"{args.split} frac {f:g} seed {args.seed}: {len(subset_ids(args.data, args.split, fraction=f, seed=args.seed))} ids")
            for k in args.kshots:
                print(f"{args.split} k={k} seed {args.seed}: {len(subset_ids(args.data, args.split, kshot=k, seed=args.seed))} ids")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
