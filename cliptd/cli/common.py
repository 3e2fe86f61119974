"""What the commands (``cliptd.tune``, ``cliptd.train``, ``cliptd.pretrain``, ``cliptd.bench``)
share: flags declared once, Ray start-up on loopback, the tracking server checked before any
work, the embedded default (synthetic world, teacher, student, teacher caches) set up, and
clean failures (one line, exit 2)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cliptd.core.config import TASKS

# Offline by default: a pretrained='openai' request would otherwise retry for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# A trial may wait for workers while other trials hold the slots (sweep.plan.run_jobs): wait
# instead of timing out and re-requesting them every minute (Ray's default is 60 s).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")


# The embedded world behind --budget (each also names a budget in cliptd/sweep/spaces/*.yaml):
# "default" fits the 2-core first run in 10 minutes (half-size world, shorter pre-training),
# "full" is the world the science benchmarks use, "small" is for tests.
WORLD_BUDGETS = {
    "default": dict(scale=0.5, teacher_steps=350, student_steps=200),
    "full": dict(scale=1.0, teacher_steps=600, student_steps=1000),
    "small": dict(scale=0.05, teacher_steps=30, student_steps=30),
}


def die(message: str, code: int = 2):
    print(f"cliptd: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def add_launch_args(parser: argparse.ArgumentParser, *, max_failures: int = 1,
                    cpus_per_worker: float | None = None) -> None:
    """Where a command's Ray Train runs go and what they hold: every command that launches
    one (tune, train, pretrain) takes these."""
    parser.add_argument("--storage-path", default=os.environ.get("CLIPTD_STORAGE_PATH",
                                                                 "runs"),
                        help="Ray storage (shared on clusters: s3://, gs://, NFS)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///./mlflow.db)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per run")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--cpus-per-worker", type=float, default=cpus_per_worker)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument("--max-failures", type=int, default=max_failures,
                        help="restarts per run after a worker failure (Ray Train's; Tune's "
                        "for a light sweep trial, whose worker is the trial)")


def add_world_args(parser: argparse.ArgumentParser) -> None:
    """The task, and the embedded world it runs on when no data of one's own is given."""
    parser.add_argument("--task", default="vcr", choices=TASKS)
    parser.add_argument("--cache", type=Path, default=None,
                        help="embedded world / teacher / student cache (default $CLIPTD_CACHE "
                             "or ./.cliptd_cache)")
    parser.add_argument("--budget", choices=sorted(WORLD_BUDGETS), default="default",
                        help="embedded world and sweep size: default (the 2-core first run), "
                             "full (the benchmarks' world), small (tests)")


def add_common_args(parser: argparse.ArgumentParser, *, max_failures: int = 1) -> None:
    add_world_args(parser)
    add_launch_args(parser, max_failures=max_failures)


def reachable_tracking_uri(args) -> str:
    """``--tracking-uri`` (or the default), refused with a clear error before any work
    starts when MLflow cannot be reached there."""
    from cliptd.tracking import runs as tracking

    uri = args.tracking_uri or tracking.default_tracking_uri()
    try:
        tracking.check_reachable(uri)
    except Exception as exc:  # noqa: BLE001 - report any failure to reach MLflow clearly
        die(f"MLflow tracking at {uri} is not usable: {exc}")
    return uri


def resolve_storage(path: str) -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://, ...) pass through unchanged."""
    return path if "://" in str(path) else str(Path(path).resolve())


def world_config(args):
    # imported here: the world's modules pull in torch and the models, which the processes
    # that only launch runs (trial drivers) never need
    from cliptd.embedded.world import WorldConfig
    from cliptd.teacher.pretrain import TeacherPretrainConfig

    b = WORLD_BUDGETS[args.budget]
    return WorldConfig(scale=b["scale"], teacher=TeacherPretrainConfig(steps=b["teacher_steps"]),
                       student_steps=b["student_steps"])


def setup_embedded(args, tasks) -> tuple:
    """Build (or reuse) the embedded world and a teacher cache per task's train split."""
    from cliptd.embedded.world import default_cache_dir, ensure_world

    world = ensure_world(args.cache or default_cache_dir(), world_config(args), tasks=TASKS,
                         caches_for=tuple(tasks))
    built = {k: v for k, v in world.timings.items() if v >= 1}
    if built:
        print("[cliptd] embedded default built in the cache "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in built.items())})")
    return world, world.teacher_caches


LOCAL_RAY_HOST = "127.0.0.2"
# What a command's environment decides for the processes it starts on a cluster. Host
# paths (CLIPTD_TRACKING_BUFFER, CLIPTD_CACHE) stay each node's own.
CLUSTER_ENV = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
               "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MLFLOW_DISABLE_TELEMETRY",
               "TOKENIZERS_PARALLELISM", "CLIPTD_TRACKING_PATIENCE_S")


def cluster_address(args) -> str | None:
    """The Ray cluster a command joins: ``--address``, else ``$RAY_ADDRESS`` (which ``ray job
    submit`` sets), unless that names the local instance a cliptd command started for itself
    (its child processes inherit it: not a cluster); None: no cluster."""
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and address == os.environ.get("CLIPTD_LOCAL_RAY"):
        return None
    return address or None


def init_ray(args, **kwargs) -> None:
    """Join the cluster at ``cluster_address(args)``, else start a local Ray instance on
    loopback."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(args)
    if address:
        # The settings this process relies on reach the cluster's processes too (trial
        # drivers, Train controllers, workers start from their node's raylet, not from
        # here): merged into the job's runtime env (``ray job submit`` keeps its own).
        env = {k: os.environ[k] for k in CLUSTER_ENV if k in os.environ}
        # Ray's own helpers there (Train V2's placement-group cleaner) look for "their"
        # cluster through RAY_ADDRESS, else by scanning their machine's processes, which
        # fails where another Ray instance runs beside the node
        gcs = _gcs_address(address)
        if gcs:
            env["RAY_ADDRESS"] = gcs
        if env and "runtime_env" not in kwargs:
            kwargs["runtime_env"] = {"env_vars": env}
        ray.init(address=address, **kwargs)
        return
    # One local node cannot be preempted, so Ray Train's per-run preemption watcher (an
    # extra process per trial, ~3 s of a core to start) only slows every trial; on a
    # cluster (--address) it stays on, for spot nodes.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray's own helpers (Train V2's placement-group cleaner, the state API clients) find
    # "their" cluster through $RAY_ADDRESS, else by scanning the machine's processes, and
    # fail when another Ray instance runs beside this one (a second cliptd command, a test
    # cluster): so the GCS port is chosen here, and every Ray process started for this
    # instance inherits the address. address="local" starts a new instance whatever
    # $RAY_ADDRESS says.
    port = _free_port(LOCAL_RAY_HOST)
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = os.environ["CLIPTD_LOCAL_RAY"] = f"{LOCAL_RAY_HOST}:{port}"
    # Loopback only: nothing of the local Ray instance listens beyond this machine (Ray
    # rewrites 127.0.0.1 to the routable address, other loopback addresses it keeps). The
    # dashboard process also serves the state API that Train V2's controller polls.
    ray.init(address="local", _node_ip_address=LOCAL_RAY_HOST, dashboard_host="127.0.0.1",
             **kwargs)


def _gcs_address(address: str) -> str | None:
    """The GCS address ``ray.init(address)`` will join (``auto`` and ``host:port``
    resolved as Ray resolves them), None for a Ray Client address or when unresolvable."""
    if address.startswith(("ray://", "http://", "https://")):
        return None
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return canonicalize_bootstrap_address_or_die(address)
    except Exception:  # noqa: BLE001 - ray.init then reports what is wrong with it
        return None


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into a usage message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """A researcher's own data, student and teacher (instead of the embedded world)."""
    g = parser.add_argument_group("your own data, student and teacher")
    g.add_argument("--data", type=Path, help="a prepared dataset (python -m cliptd.data "
                   "prepare); default: the embedded synthetic world")
    g.add_argument("--student", help="a downloaded VisualBERT / LXMERT folder (config.json + "
                   "model.safetensors or pytorch_model.bin), a cliptd student export, or a "
                   "shipped student config name")
    g.add_argument("--tokenizer", type=Path, help="the tokenizer folder of a checkpoint that "
                   "ships none (uclanlp's VisualBERT: bert-base-uncased's)")
    g.add_argument("--student-config", help="region backbone and image size for a downloaded "
                   "checkpoint: a shipped name (visualbert-resnet) or a JSON file")
    g.add_argument("--teacher", help="open_clip MODEL[:PRETRAINED] (ViT-B-32:openai, "
                   "ViT-S-32-alt:/path/weights.bin): its cache is built or reused")
    g.add_argument("--teacher-cache", type=Path, help="a teacher cache folder "
                   "(python -m cliptd.teacher_cache)")


def user_run_config(args, needs_teacher: bool) -> dict:
    """The base run config of ``--data``: every input checked before Ray starts (the
    dataset's manifest and task, the student folder and its tokenizer, the teacher and its
    cache), the teacher cache built when ``--teacher`` names one that has none yet.
    Raises ValueError / DataError / FileNotFoundError naming the file or field."""
    from cliptd.data.prepare import load_manifest
    from cliptd.model.student import check_student
    from cliptd.teacher.cache import check_cache
    from cliptd.teacher.clip import TeacherSpec

    manifest = load_manifest(args.data)
    if manifest["task"] != args.task:
        raise ValueError(f"{args.data} holds {manifest['task']} data, not --task {args.task}")
    if not args.student:
        raise ValueError("--data needs --student (a downloaded VisualBERT / LXMERT folder, "
                         "a cliptd export, or a student config name)")
    check_student(args.student, args.tokenizer, args.student_config)
    spec = TeacherSpec.parse(args.teacher) if args.teacher else None
    if spec:
        spec.check()
    cache = args.teacher_cache
    if cache is None and spec is not None:
        cache = build_teacher_cache(spec, args.data, teacher_cache_root(args.cache))
    if cache is not None:
        check_cache(cache, task=args.task, version=manifest["version"], teacher=spec)
    elif needs_teacher:
        raise ValueError("distillation needs a teacher: --teacher MODEL[:PRETRAINED] or "
                         "--teacher-cache DIR (or --methods none)")
    return {"task": args.task, "data": str(args.data), "student": str(args.student),
            "tokenizer": str(args.tokenizer) if args.tokenizer else None,
            "student_config": args.student_config,
            "teacher_cache": str(cache) if cache else None}


def teacher_cache_root(cache: Path | None) -> Path:
    """Where teacher caches live by default: ``<--cache or $CLIPTD_CACHE>/teacher_cache``."""
    from cliptd.embedded.world import default_cache_dir

    return Path(cache or default_cache_dir()) / "teacher_cache"


def build_teacher_cache(spec, data: Path, root: Path, split: str = "train",
                        device: str = "cpu", log=print, pool=None) -> Path:
    """Build (or reuse) ``spec``'s cache of a prepared dataset's split under ``root``, and
    say what it cost."""
    import time

    from cliptd.teacher.cache import ensure_cache
    from cliptd.teacher.clip import Teacher

    start = time.time()
    teacher = Teacher.load(spec, device=device)
    loaded = time.time()
    folder = ensure_cache(teacher, data, root, split=split, pool=pool)
    meta = json.loads((folder / "meta.json").read_text())
    seconds = time.time() - loaded
    if (folder / "_SUCCESS").stat().st_mtime < loaded:
        log(f"[cliptd] teacher cache of {spec.describe()} on {data} ({split}): reused {folder}")
    else:
        log(f"[cliptd] teacher cache of {spec.describe()} on {data} ({split}): "
            f"{meta['problems']} problems in {seconds:.1f} s "
            f"({meta['problems'] / max(seconds, 1e-9):.2f} problems/s; teacher loaded in "
            f"{loaded - start:.1f} s) → {folder}")
    return folder
