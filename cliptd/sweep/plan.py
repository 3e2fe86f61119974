"""How many trials fit at once, and the sweep's jobs run as Ray tasks sharing those slots."""

from __future__ import annotations

from cliptd.core.errors import SweepError
from cliptd.sweep.search import run_job

_NO_CONFIG = object()  # plan_resources: read the autoscaler's config from the head


def _head_autoscaling_config(gcs_address: str) -> dict | None:
    """On the head node: the autoscaler's config of the cluster at ``gcs_address`` (the
    file its monitor process was started with, else ``~/ray_bootstrap_config.yaml``, where
    ``ray up`` puts it), or None when no autoscaler runs."""
    import os
    from pathlib import Path

    import yaml

    path = None
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in argv):
            continue
        opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if opts.get("gcs-address") == gcs_address and opts.get("autoscaling-config"):
            path = os.path.expanduser(opts["autoscaling-config"])
            break
    if path is None and Path("~/ray_bootstrap_config.yaml").expanduser().exists():
        path = str(Path("~/ray_bootstrap_config.yaml").expanduser())
    if path is None:
        return None
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def autoscaling_config() -> dict | None:
    """The running cluster's autoscaler config (node types and their ``max_workers``), read
    on its head node; None without an autoscaler (a plain ``ray start`` cluster, a local
    Ray)."""
    import ray

    if not ray.is_initialized():
        return None
    gcs = ray.get_runtime_context().gcs_address
    task = ray.remote(num_cpus=0, max_retries=0,
                      resources={"node:__internal_head__": 0.001})(_head_autoscaling_config)
    try:
        return ray.get(task.remote(gcs), timeout=60)
    except Exception:  # noqa: BLE001 - no answer: plan from what the cluster has now
        return None


def capacity(now: dict, config: dict | None) -> tuple[dict, list[tuple[dict, int]]]:
    """What the cluster can grow to: its resources now plus, for every worker node type
    the autoscaler may still launch, ``max_workers`` of them (all types together capped by
    the config's own ``max_workers``, GPU types counted first); and the node shapes it has
    or can launch, each with how many of it there can be (a Train worker must fit on one
    node). Without node types (no autoscaler) the shapes are None: only the totals count."""
    types = (config or {}).get("available_node_types") or {}
    if not types:  # no autoscaler (or node types it does not declare): what is up now
        return dict(now), None
    head = config.get("head_node_type")
    room = int(config.get("max_workers", 0) or 0)
    grown: dict[str, float] = {}
    shapes = []
    for name, t in sorted(types.items(), key=lambda kv: -float(
            (kv[1].get("resources") or {}).get("GPU", 0))):
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()
               if isinstance(v, (int, float))}
        n = 1 if name == head else min(int(t.get("max_workers", 0) or 0), room)
        if name != head:
            room -= n
        shapes.append((res, n))
        for k, v in res.items():
            grown[k] = grown.get(k, 0) + n * v
    total = {k: max(now.get(k, 0), grown.get(k, 0)) for k in set(now) | set(grown)}
    return total, shapes


def fits_on(resources: dict, bundle: dict) -> int:
    """How many ``bundle``s one node with ``resources`` holds."""
    return int(min((resources.get(k, 0) + 1e-9) // v for k, v in bundle.items() if v > 0))


def _shape(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {res[k]:g}" for k in ("CPU", "GPU") if k in res) + "}"


def plan_resources(args, budget, config=_NO_CONFIG) -> dict:
    """Trial slots and per-trial resources from what the cluster has *or can grow to*.

    A trial is its driver (a Tune function, tiny) plus its Ray Train workers; ``slots`` trials
    fit at once. Searches share the slots (see ``run_jobs``), so Ray's own resource
    accounting is what keeps the cluster full and never oversubscribed. On an autoscaling
    cluster (``config``: the autoscaler's, read from the head when not given) the GPU nodes
    may be at zero: the slots count what the node types can add, ``scale_for`` asks the
    autoscaler for them, and a trial no node type can hold is refused here."""
    import ray

    res = ray.cluster_resources()
    if config is _NO_CONFIG:
        config = autoscaling_config()
    cap, shapes = capacity(res, config)
    cpus, gpus = cap.get("CPU", 1), cap.get("GPU", 0)
    on_head = cap.get("cliptd_driver", 0) > 0  # keep trial drivers off GPU workers
    autoscaling = shapes is not None
    if args.gpus_per_worker > 0:
        if gpus < args.gpus_per_worker * args.workers:
            raise SweepError(f"a trial needs {args.workers} × {args.gpus_per_worker} GPUs; "
                             f"the cluster has {res.get('GPU', 0):g}"
                             + (f" and can grow to {gpus:g}" if autoscaling else
                                " and no autoscaler to add any"))
        slots = int(gpus // (args.workers * args.gpus_per_worker))
        cpus_per_worker = args.cpus_per_worker or 1
        driver_cpu = 0.5
    else:
        per_worker = args.cpus_per_worker or 1
        slots = max(1, int(cpus // (args.workers * per_worker)))
        per_trial = cpus / slots
        # a trial driver only waits on its TorchTrainer: a sliver of CPU, with room for a
        # second (waiting) driver per slot, see run_jobs
        driver_cpu = min(0.5, per_trial * 0.025)
        cpus_per_worker = args.cpus_per_worker or (per_trial - 2 * driver_cpu) / args.workers
    bundle = {"CPU": round(cpus_per_worker, 3)}
    if args.gpus_per_worker > 0:
        bundle["GPU"] = args.gpus_per_worker
    if autoscaling:  # as many Train workers as the node types hold
        fits = sum(n * fits_on(res, bundle) for res, n in shapes)
        if fits < args.workers:
            raise SweepError(
                f"a trial needs {args.workers} Train worker(s) of {bundle}; the cluster's "
                f"node types hold {fits} at most: " + ", ".join(
                    f"{n} × {_shape(res)}" for res, n in shapes))
        slots = min(slots, fits // args.workers)
    if budget.max_concurrent:
        slots = min(slots, budget.max_concurrent)
    driver = {"CPU": driver_cpu}
    task = {"num_cpus": 0}
    if on_head:
        driver["cliptd_driver"] = 0.01
        task["resources"] = {"cliptd_driver": 0.001}
    return {"concurrency": max(1, slots), "driver": driver, "task": task,
            "cpus_per_worker": round(cpus_per_worker, 3), "worker": bundle,
            "workers": args.workers, "autoscaling": autoscaling}


def scale_for(plan: dict, timeout_s: float = 1800, poll_s: float = 5, log=print) -> float:
    """On an autoscaling cluster, ask for every slot's Train workers
    (``ray.autoscaler.sdk.request_resources``) and wait, with a progress line, until one
    trial's workers fit; returns the seconds waited. Raises SweepError when they do not come
    within ``timeout_s`` (``CLIPTD_SCALE_TIMEOUT_S``)."""
    import time

    import ray

    worker, workers = plan["worker"], plan["workers"]

    def fitting() -> int:
        return sum(fits_on(n["Resources"], worker) for n in ray.nodes() if n["Alive"])

    if not plan["autoscaling"]:
        return 0.0
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[dict(worker)] * (plan["concurrency"] * workers))
    start = last = time.monotonic()
    have = fitting()
    if have >= workers:
        return 0.0
    log(f"[cliptd] asked the autoscaler for {plan['concurrency']} trial(s) × {workers} × "
        f"{worker}; waiting for one trial's {workers} worker(s) to fit (up to "
        f"{timeout_s:.0f} s)")
    while have < workers:
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise SweepError(
                f"the autoscaler did not provide one trial's resources within "
                f"{timeout_s:.0f} s: nodes for {have} of {workers} Train worker(s) of {worker} "
                "(`ray status` on the head says why: quota, capacity, failed launches)")
        if time.monotonic() - last >= 15:
            log(f"[cliptd] waiting for nodes: {have}/{workers} Train worker(s) of {worker} "
                f"fit, after {waited:.0f} s")
            last = time.monotonic()
        time.sleep(poll_s)
        have = fitting()
    waited = time.monotonic() - start
    res = ray.cluster_resources()
    log(f"[cliptd] nodes up after {waited:.0f} s: the cluster has {res.get('CPU', 0):g} "
        f"CPU(s), {res.get('GPU', 0):g} GPU(s)")
    return waited


def release_scale_request(plan: dict) -> None:
    """Withdraw ``scale_for``'s standing request, so idle nodes can be removed again."""
    if plan.get("autoscaling"):
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])


def run_jobs(jobs: list[dict], resources: dict, on_done) -> None:
    """Run the sweep's jobs as Ray tasks, as many at once as there are trial slots.

    Every running job may hold up to ``slots`` trials, as many as fit under the cap of
    ``2 × slots`` trials in flight: a trial beyond the free slots waits (a light trial holds
    nothing while it waits, a ``train`` trial only its driver's sliver of CPU, for which
    ``plan_resources`` reserves room), so the workers never oversubscribe the machine, and a
    slot that one job leaves (a search down to its last trial, a search ended) goes at once
    to another job's waiting trial. (A job given ``slots // running`` at its start kept
    that share to its end: on 2 slots, a search that outlived the others ran its trials one
    by one beside an idle slot, 255 s of a 19-minute 5 % VQA sweep.)
    ``on_done(job, result)`` may return follow-up jobs (a search's seed re-runs)."""
    from collections import deque

    import ray

    slots = resources["concurrency"]
    task = ray.remote(max_retries=0, **resources["task"])(run_job)
    queue, running = deque(jobs), {}
    while queue or running:
        parallel = min(slots, len(queue) + len(running))
        while queue and len(running) < parallel:
            job = queue.popleft()
            in_flight = sum(c for _, c in running.values())
            concurrency = max(1, min(slots, 2 * slots - in_flight))
            running[task.remote(job, concurrency)] = (job, concurrency)
        done, _ = ray.wait(list(running), num_returns=1)
        job, _ = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
            for ref in running:
                ray.cancel(ref, force=True)
            raise SweepError(f"{job['kind']} {job['condition']}/{job['method']}: "
                             f"{type(cause).__name__}: {cause}") from None
        queue.extend(on_done(job, result) or [])
