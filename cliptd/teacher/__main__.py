"""python -m cliptd.teacher pretrain --corpus world/corpus/teacher.parquet --out DIR"""

from __future__ import annotations

import argparse
from pathlib import Path

from cliptd.core.invocation import prog
from cliptd.teacher.pretrain import TeacherPretrainConfig, pretrain_tiny_teacher


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog("cliptd.teacher"))
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pre-train the embedded tiny CLIP on a caption corpus")
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=TeacherPretrainConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = pretrain_tiny_teacher(args.corpus, args.out,
                                TeacherPretrainConfig(steps=args.steps, seed=args.seed))
    print(f"teacher written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
