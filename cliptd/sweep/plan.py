"""How many trials fit at once, and the sweep's jobs run as Ray tasks sharing those slots."""

from __future__ import annotations

from cliptd.core.errors import SweepError
from cliptd.sweep.search import run_job


def plan_resources(args, budget) -> dict:
    """Trial slots and per-trial resources from what the cluster actually has.

    A trial is its driver (a Tune function, tiny) plus its Ray Train workers; ``slots`` trials
    fit at once. Searches share the slots (see ``run_jobs``), so Ray's own resource
    accounting is what keeps the cluster full and never oversubscribed."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
    on_head = res.get("cliptd_driver", 0) > 0  # keep trial drivers off GPU workers
    if args.gpus_per_worker > 0:
        if gpus < args.gpus_per_worker * args.workers:
            raise SweepError(f"a trial needs {args.workers} × {args.gpus_per_worker} GPUs; "
                             f"the cluster has {gpus:g}")
        slots = int(gpus // (args.workers * args.gpus_per_worker))
        cpus_per_worker = args.cpus_per_worker or 1
        driver_cpu = 0.5
    else:
        slots = max(1, int(cpus // args.workers))
        per_trial = cpus / slots
        # a trial driver only waits on its TorchTrainer: a sliver of CPU, with room for a
        # second (waiting) driver per slot, see run_jobs
        driver_cpu = min(0.5, per_trial * 0.025)
        cpus_per_worker = args.cpus_per_worker or (per_trial - 2 * driver_cpu) / args.workers
    if budget.max_concurrent:
        slots = min(slots, budget.max_concurrent)
    driver = {"CPU": driver_cpu}
    task = {"num_cpus": 0}
    if on_head:
        driver["cliptd_driver"] = 0.01
        task["resources"] = {"cliptd_driver": 0.001}
    return {"concurrency": max(1, slots), "driver": driver, "task": task,
            "cpus_per_worker": round(cpus_per_worker, 3)}


def run_jobs(jobs: list[dict], resources: dict, on_done) -> None:
    """Run the sweep's jobs as Ray tasks, as many at once as there are trial slots.

    Each running job gets ``slots // running`` concurrent trials, and the last job in the
    queue gets up to ``slots``: when the others end it can use their slots at once instead
    of leaving them idle while its own trials run one by one. A trial beyond the free slots
    waits for its workers, holding only its driver's sliver of CPU (``plan_resources``
    reserves room for up to ``2 × slots`` drivers, the cap on trials in flight here), so
    the workers never oversubscribe the machine and no trial can block another's workers.
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
            wanted = slots if not queue else slots // parallel
            concurrency = max(1, min(wanted, 2 * slots - in_flight))
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
