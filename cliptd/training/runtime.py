"""Where a loop runs, and what every loop does the same way there.

Both loops (fine-tuning, ``cliptd.training.loop``; pre-training,
``cliptd.training.pretrain_loop``) talk to a ``Runtime``: Ray Train workers
(``RayRuntime``), a Tune trial that trains in its own process (``TuneRuntime``: the light
path of a one-worker sweep trial, ``cliptd.sweep.driver``) or this process
(``LocalRuntime``). Beside rank, device and DDP wrapping,
the runtime owns the pieces the loops share: resuming from the latest checkpoint, the
rank-0 MLflow logger, a rank-0 checkpoint written with each report, and the fault
injection the fault-tolerance tests use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from cliptd.training.checkpoint import load_checkpoint_file


class Runtime:
    rank: int
    world: int
    nodes: int
    device: torch.device

    def resume(self, fmt: str) -> dict | None:
        """The latest checkpoint's state (``fmt``-checked), or None on a fresh start."""
        with self.latest_checkpoint() as folder:
            if folder is None:
                return None
            return load_checkpoint_file(folder / "checkpoint.pt", fmt)

    def tracker(self, tracking: dict | None):
        """Rank 0's MLflow logger for ``tracking = {"uri", "run_id"}`` (None elsewhere)."""
        if self.rank != 0 or not tracking:
            return None
        from cliptd.tracking.runs import RunLogger

        return RunLogger(tracking["uri"], tracking["run_id"])

    def checkpoint_and_report(self, metrics: dict, index: int, *, state: Callable[[], dict],
                              tokenizer, unit: str = "epoch", tracker=None,
                              log: bool = True) -> None:
        """Rank 0 writes a checkpoint (``state()`` and the tokenizer), the tracker logs the
        metrics at ``index`` (unless ``log`` is False: a restart re-running a logged
        epoch), and every rank reports, so Ray Train keeps the checkpoint with them."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if self.rank == 0:
                folder = Path(tmp)
                torch.save(state(), folder / "checkpoint.pt")
                tokenizer.save_pretrained(folder / "tokenizer")
            if tracker and log:
                tracker.log_metrics(metrics, step=index)
            self.report(metrics, folder, index, unit)

    def report_again(self, metrics: dict, index: int) -> None:
        """An ended run's last result reported once more, as it was, with no new
        checkpoint (a restarted run that has nothing left to train)."""
        self.report(metrics, None, index)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision only rank 0 could make)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([int(flag)], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def cpus(self) -> float:
        """CPUs this worker holds."""
        return 1.0

    def loader_workers(self, requested: int) -> int:
        """DataLoader worker processes: ``requested``, or (-1) on a GPU one per CPU this
        worker holds beyond the one its training process uses (on CPU the training process
        needs those CPUs itself: none)."""
        if requested >= 0:
            return requested
        if self.device.type != "cuda":
            return 0
        return max(0, int(self.cpus() + 1e-9) - 1)

    def fault_point(self, fault: dict | None, step: int) -> None:
        """Fault injection for tests: a hard crash (no cleanup, no report) at step
        ``fault["exit_at_step"]``, once (the marker file records that it happened)."""
        if fault and fault.get("exit_at_step") == step and not Path(fault["marker"]).exists():
            Path(fault["marker"]).write_text(f"worker {self.rank} exited at step {step}\n")
            os._exit(1)


@contextmanager
def _checkpoint_folder(ckpt):
    """A Ray (Train or Tune) checkpoint as a local folder for the ``with`` block, or None."""
    if ckpt is None:
        yield None
    else:
        with ckpt.as_directory() as d:
            yield Path(d)


class RayRuntime(Runtime):
    """The loop's view of Ray Train: rank, device, DDP wrapping, checkpoints, reports."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # nodes the run spans (Ray Train places the same number of workers on each node)
        self.nodes = self.world // max(1, ctx.get_local_world_size())
        self.device = ray.train.torch.get_device()

    def cpus(self) -> float:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))

    def prepare_model(self, model):
        # Parts of the task module sit idle in some runs (the distillation heads under
        # `none`, a modality whose selection ratio is 0): DDP must not wait for their grads.
        return self._torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def prepare_loader(self, loader):
        return self._torch.prepare_data_loader(loader, move_to_device=False)

    def latest_checkpoint(self):
        return _checkpoint_folder(self._train.get_checkpoint())

    def report(self, metrics: dict, folder: Path | None, epoch: int, unit: str = "epoch"
               ) -> None:
        ckpt = self._train.Checkpoint.from_directory(folder) if folder else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{unit}-{epoch:03d}")

    def report_again(self, metrics: dict, index: int) -> None:
        # with the path of the checkpoint it belongs to, as a report with a checkpoint
        # reaches a Tune trial (``TuneReportCallback``): the sweep finds the student by it
        ckpt = self._train.get_checkpoint()
        self.report({**metrics, "checkpoint_path": ckpt.path} if ckpt else metrics, None, index)


class TuneRuntime(Runtime):
    """One worker inside the Tune trial itself: no Train controller, worker group or
    process group. Checkpoints are the trial's Tune checkpoints (on its storage path, what
    ``ray.tune.get_checkpoint`` hands back after a restart or a restored sweep), reports are
    ``ray.tune.report``; rank 0 of 1, on the GPU Tune gave the trial, if any."""

    def __init__(self):
        import ray.tune

        self._tune = ray.tune
        self.rank, self.world, self.nodes = 0, 1, 1
        # Tune sets CUDA_VISIBLE_DEVICES to the trial's GPU: it is device 0 here
        self.device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def prepare_model(self, model):
        # what Ray Train's prepare_model does for a world of one: no DDP, just the device
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader  # Ray Train's prepare_data_loader leaves a world of one's loader as is

    def latest_checkpoint(self):
        return _checkpoint_folder(self._tune.get_checkpoint())

    def report(self, metrics: dict, folder: Path | None, epoch: int, unit: str = "epoch"
               ) -> None:
        # Tune copies the folder to the trial's storage before report returns (and names
        # it checkpoint_<index>); the epoch travels in the metrics and in checkpoint.pt
        ckpt = self._tune.Checkpoint.from_directory(folder) if folder else None
        self._tune.report(metrics, checkpoint=ckpt)


class LocalRuntime(Runtime):
    """The same loop in this process, one worker: benchmarks and quick experiments."""

    def __init__(self, device: str = "cpu", resume_from: Path | None = None,
                 keep_dir: Path | None = None):
        self.rank, self.world, self.nodes, self.device = 0, 1, 1, torch.device(device)
        self.resume_from, self.keep_dir = resume_from, keep_dir
        self.history: list[dict] = []

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    @contextmanager
    def latest_checkpoint(self):
        yield self.resume_from

    def report(self, metrics: dict, folder: Path | None, epoch: int, unit: str = "epoch"
               ) -> None:
        self.history.append(metrics)
        if folder and self.keep_dir:
            shutil.copytree(folder, self.keep_dir / f"{unit}-{epoch:03d}", dirs_exist_ok=True)
