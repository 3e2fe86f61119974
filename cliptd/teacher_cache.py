"""Build the teacher cache of a prepared dataset with any open_clip CLIP, once.

    python -m cliptd.teacher_cache --data /data/prepared/vcr --teacher ViT-B-32:openai
    python -m cliptd.teacher_cache --data /data/prepared/vcr \\
        --teacher ViT-S-32-alt:/weights/clip.bin --split train --out /shared/teacher_cache

``--teacher`` is ``MODEL[:PRETRAINED]``: an open_clip architecture by its registered name and
a pretrained tag whose weights are in open_clip's cache (nothing is downloaded here) or a
local weights file; ``local-dir:<folder>`` names a saved open_clip folder. The pass runs
CLIP once per problem of the split (region crops, texts, zero-shot confidences) into
resumable Parquet shards: an interrupted pass resumes where it stopped, and the cache
folder appears only when complete. Every trial of a sweep then reads it
(``python -m cliptd.tune --data ... --teacher-cache <printed folder>``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cliptd.cli.common import build_teacher_cache, die, teacher_cache_root
from cliptd.core.errors import DataError
from cliptd.core.invocation import prog
from cliptd.data.prepare import load_manifest
from cliptd.teacher.clip import TeacherSpec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog("cliptd.teacher_cache"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="a prepared dataset (python -m cliptd.data prepare)")
    parser.add_argument("--teacher", required=True, help="open_clip MODEL[:PRETRAINED]")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", type=Path, default=None,
                        help="cache root (default $CLIPTD_CACHE/teacher_cache); on a cluster, "
                             "shared storage")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there)")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.data)
        if args.split not in manifest["counts"]:
            raise ValueError(f"{args.data}: no split {args.split!r} "
                             f"(has {sorted(manifest['counts'])})")
        spec = TeacherSpec.parse(args.teacher)
        spec.check()
    except (ValueError, DataError, FileNotFoundError) as exc:
        die(str(exc))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = build_teacher_cache(spec, args.data, args.out or teacher_cache_root(None),
                                 split=args.split, device=device)
    print(f"teacher cache: {folder}")
    print(f"use it: python -m cliptd.tune --task {manifest['task']} --data {args.data} "
          f"--student <folder> --teacher-cache {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
