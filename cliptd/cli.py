"""What ``cliptd.train`` and ``cliptd.tune`` share on the command line: flags, Ray start-up,
the embedded default (synthetic world, teacher, student, teacher caches), clean failures."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cliptd.world import WorldConfig, default_cache_dir

# Offline by default: a pretrained='openai' request would otherwise retry for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

TASKS = ("vcr", "snli_ve", "vqa")

# The world sizes behind --budget: "small" is for first looks and tests.
WORLD_BUDGETS = {
    "default": dict(scale=1.0, teacher_steps=600, student_steps=400),
    "small": dict(scale=0.05, teacher_steps=30, student_steps=30),
}


def die(message: str, code: int = 2):
    print(f"cliptd: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="vcr", choices=TASKS)
    parser.add_argument("--cache", type=Path, default=None,
                        help="embedded world / teacher / student cache (default $CLIPTD_CACHE "
                             "or ./.cliptd_cache)")
    parser.add_argument("--storage-path", default=os.environ.get("CLIPTD_STORAGE_PATH",
                                                                 "runs"),
                        help="Ray storage (shared on clusters: s3://, gs://, NFS)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///./mlflow.db)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per run")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument("--budget", choices=sorted(WORLD_BUDGETS), default="default",
                        help="'small' = a tiny world and budget for first looks and tests")


def resolve_storage(path: str) -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://, ...) pass through unchanged."""
    return path if "://" in str(path) else str(Path(path).resolve())


def world_config(args) -> WorldConfig:
    from cliptd.teacher import TeacherPretrainConfig

    b = WORLD_BUDGETS[args.budget]
    return WorldConfig(scale=b["scale"], teacher=TeacherPretrainConfig(steps=b["teacher_steps"]),
                       student_steps=b["student_steps"])


def setup_embedded(args, tasks) -> tuple:
    """Build (or reuse) the embedded world and a teacher cache per task's train split."""
    from cliptd import data as data_mod
    from cliptd.dataset import problems_from_table
    from cliptd.teacher import Teacher
    from cliptd.teacher_cache import build_cache, cache_key
    from cliptd.train import DEFAULT_CONFIG
    from cliptd.world import ensure_world

    world = ensure_world(args.cache or default_cache_dir(), world_config(args), tasks=TASKS)
    teacher = Teacher.load(world.teacher)
    fingerprint = teacher.fingerprint()
    root = world.root / "teacher_cache"
    caches = {}
    for task in tasks:
        folder = world.data[task]
        manifest = data_mod.load_manifest(folder)
        key = cache_key(fingerprint, manifest["version"], "train", task)
        if not (root / key / "_SUCCESS").exists():
            table = data_mod.read_split(folder, "train")
            vocab = data_mod.answer_vocab(table, DEFAULT_CONFIG["vqa_vocab"]) \
                if task == "vqa" else None
            problems = problems_from_table(task, table, Path(manifest["image_root"]), vocab)
            build_cache(teacher, task, problems, root, key, vocab=vocab)
        caches[task] = root / key
    return world, caches


def init_ray(args, **kwargs) -> None:
    import ray

    if ray.is_initialized():
        return
    if args.address:
        ray.init(address=args.address, **kwargs)
    else:
        # Loopback only: nothing of the local Ray instance listens beyond this machine (Ray
        # rewrites 127.0.0.1 to the routable address, other loopback addresses it keeps). The
        # dashboard process also serves the state API that Train V2's controller polls.
        ray.init(_node_ip_address="127.0.0.2", dashboard_host="127.0.0.1", **kwargs)
