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

On a Ray cluster (``--address`` or ``$RAY_ADDRESS``, e.g. under ``ray job submit``) the
shards are computed by one teacher actor per GPU and written by this process to ``--out``,
which should be the cluster's shared storage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cliptd.cli.common import (
    build_teacher_cache,
    cluster_address,
    die,
    init_ray,
    teacher_cache_root,
)
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
    parser.add_argument("--address", default=None, help="a Ray cluster (default $RAY_ADDRESS; "
                        "none: this process computes every shard)")
    parser.add_argument("--actors", type=int, default=None, help="teacher copies computing "
                        "shards on the cluster (default: one per GPU it has)")
    parser.add_argument("--gpus-per-actor", type=float, default=1)
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
    pool = None
    if cluster_address(args) or args.actors:
        import ray

        from cliptd.teacher.cache import ray_pool

        init_ray(args)
        gpus = ray.cluster_resources().get("GPU", 0)
        actors = args.actors or int(gpus // max(args.gpus_per_actor, 1e-9))
        per_actor = args.gpus_per_actor if gpus else 0
        if actors < 1:
            die(f"the cluster has {gpus:g} GPUs: pass --actors N (--gpus-per-actor 0 for CPU "
                "actors)")
        print(f"[cliptd] teacher pass on {actors} Ray actor(s), {per_actor:g} GPU each")
        pool = lambda task: ray_pool(spec, task, actors, gpus_per_actor=per_actor)  # noqa: E731
        # this process only fingerprints the weights and writes the shards
        device = "cpu"
    folder = build_teacher_cache(spec, args.data, args.out or teacher_cache_root(None),
                                 split=args.split, device=device, pool=pool)
    print(f"teacher cache: {folder}")
    print(f"use it: python -m cliptd.tune --task {manifest['task']} --data {args.data} "
          f"--student <folder> --teacher-cache {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
