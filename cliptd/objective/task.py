"""The task module: student + (cached) teacher targets + objective, behind one ``forward``.

The training loop only calls ``task(batch, progress)`` and ``task.predict(batch)``; it never
touches model internals, so students, tasks and objectives vary without touching the loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cliptd.model.student import VLStudent
from cliptd.objective.distill import DistillConfig, Distiller


def task_loss(head: str, scores: torch.Tensor, batch: dict) -> torch.Tensor:
    if head == "vqa":
        # Soft-score BCE over the answer vocabulary, scaled by its size as in the VQA
        # literature (Anderson et al.), so the loss magnitude does not depend on |V|.
        return F.binary_cross_entropy_with_logits(scores, batch["soft_targets"]) * \
            scores.shape[1]
    return F.cross_entropy(scores, batch["labels"])


class CLIPTDTask(nn.Module):
    def __init__(self, student: VLStudent, distill: DistillConfig, teacher_dim: int):
        super().__init__()
        distill = distill.resolved()  # method presets (none: λ=0; naive: all, uniform)
        self.student = student
        self.distill_cfg = distill
        self.distiller = Distiller(student.cfg.hidden_size, teacher_dim, distill,
                                   region_dim=student.cfg.region_dim)
        self.generator = torch.Generator().manual_seed(0)  # for select_by=random

    def forward(self, batch: dict, progress: float) -> tuple[torch.Tensor, dict]:
        out = self.student(batch)
        scores = self.student.scores(out, batch["num_candidates"])
        loss = task_loss(self.student.cfg.task_head, scores, batch)
        logs = {"loss/task": float(loss.detach())}
        if self.distill_cfg.lam > 0 and "teacher" in batch:
            gold = batch["gold_row"]
            t = dict(batch["teacher"])
            t["token_target"] = t["token_words"] if self.distill_cfg.text_target == "tokens" \
                else t["pooled"][:, None, :].expand_as(t["token_words"])
            d_loss, d_logs = self.distiller(
                out.region_states[gold], out.text_states[gold], t, progress, self.generator,
                region_features=out.region_features[batch["image_index"][gold]])
            loss = loss + d_loss
            logs.update(d_logs)
            logs["loss/distill"] = float(d_loss.detach())
        logs["loss/total"] = float(loss.detach())
        return loss, logs

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        out = self.student(batch)
        return self.student.scores(out, batch["num_candidates"])
