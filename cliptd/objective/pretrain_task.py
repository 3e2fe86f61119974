"""The student's vision-language pre-training objectives, behind one task module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cliptd.model.student import VLStudent


@dataclass
class PretrainConfig:
    student: str = "visualbert-tiny"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 40
    mask_prob: float = 0.25
    itm_prob: float = 0.5  # share of mismatched (image, caption) pairs
    seed: int = 0
    checkpoint_every: int = 100  # steps between checkpoints (and metric reports)
    # images per batch that also get a 4-way choice: a true statement against three
    # minimally different false ones (another count, object, shape or attribute)
    choice_images: int = 32


LOSSES = ("mlm", "itm", "itm_acc", "attr", "choice", "choice_acc", "align")  # shown on the bar


# what a statement choice tests (``statement_choices``); accuracy is also reported per kind,
# since the overall figure hides which skill is still at chance
CHOICE_KINDS = ("count", "furthest", "binding", "caption")


class PretrainTask(nn.Module):
    """The student with its pre-training heads and losses: the loop calls ``task(batch)``
    and never touches model internals. The heads (MLM, ITM, region attributes) are
    pre-training only; the exported student is ``task.student``."""

    def __init__(self, student: VLStudent, vocab: int, group_sizes: tuple[int, ...]):
        super().__init__()
        hidden = student.cfg.hidden_size
        self.student = student
        self.mlm = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, vocab))
        self.itm = nn.Linear(hidden, 2)
        self.choice = nn.Linear(hidden, 1)  # scores each of a choice group's 4 texts
        # word-region alignment (UNITER's WRA, MDETR's contrastive alignment): a word's state
        # scores the regions of its image; trained toward the objects the word refers to
        self.align_text = nn.Linear(hidden, hidden)
        self.align_region = nn.Linear(hidden, hidden)
        # Region attribute classification on the backbone's region features, as BUTD's
        # detector (VisualBERT's and LXMERT's region features) is trained on Visual Genome's
        # object and attribute labels: it makes the features resolve what questions ask.
        self.attributes = nn.ModuleList(nn.Linear(student.cfg.region_dim, n)
                                        for n in group_sizes)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.student
        feats = s.region_features(batch["images"], batch["boxes"])
        out = s.encode(batch["input_ids"], batch["attention_mask"], batch["token_regions"],
                       batch["image_index"], feats, batch["region_mask"],
                       batch["boxes"] / batch["images"].shape[-1])
        # MLM only on matched pairs: predicting words of a caption of another image would
        # teach the model to ignore the image.
        mlm_labels = batch["mlm_labels"].masked_fill(batch["itm_labels"][:, None] == 0, -100)
        itm_rows = batch["itm_labels"] >= 0
        itm_logits = self.itm(out.pooled[itm_rows])
        logs = {"itm": F.cross_entropy(itm_logits, batch["itm_labels"][itm_rows])}
        mlm = _labelled_mean_ce(self.mlm(out.text_states).flatten(0, 1), mlm_labels.flatten())
        loss = mlm + logs["itm"]
        if (mlm_labels != -100).any():  # a small batch may mask nothing: nothing to report
            logs["mlm"] = mlm
        itm_acc = (itm_logits.argmax(-1) == batch["itm_labels"][itm_rows]).float().mean()
        gold = batch["choice_gold"]
        if len(gold):
            scores = self.choice(out.pooled[~itm_rows]).view(len(gold), -1)
            logs["choice"] = F.cross_entropy(scores, gold)
            hits = (scores.argmax(-1) == gold).detach()
            logs["choice_acc"] = hits.float().mean()
            for k, name in enumerate(CHOICE_KINDS):  # summed, divided at each report
                of_kind = batch["choice_kind"] == k
                logs[f"choice_hits/{name}"] = hits[of_kind].sum()
                logs[f"choice_seen/{name}"] = of_kind.sum()
            loss = loss + logs["choice"]
        align = batch["align"]
        if len(align):
            logs["align"] = self._alignment_loss(out, batch, align)
            loss = loss + logs["align"]
        if len(self.attributes):
            labels = batch["region_attributes"]
            attr = sum(_labelled_mean_ce(head(feats).flatten(0, 1), labels[..., g].flatten())
                       for g, head in enumerate(self.attributes)) / len(self.attributes)
            logs["attr"] = attr
            loss = loss + attr
        logs["itm_acc"] = itm_acc.detach()
        return loss, logs

    def _alignment_loss(self, out, batch, align: torch.Tensor) -> torch.Tensor:
        """-log of the probability mass a word puts on the objects it refers to (several
        for "red things"), over the objects of its image."""
        words = sorted({(int(b), int(t)) for b, t, _ in align})
        index = {w: i for i, w in enumerate(words)}
        rows = torch.tensor([b for b, _ in words])
        text = self.align_text(out.text_states[rows, torch.tensor([t for _, t in words])])
        regions = self.align_region(out.region_states[rows])  # W × R × H
        logits = torch.einsum("wh,wrh->wr", text, regions) / text.shape[-1] ** 0.5
        valid = batch["region_mask"][batch["image_index"][rows]].clone()
        valid[:, 0] = False  # the whole image is never the referent
        logits = logits.masked_fill(~valid, float("-inf"))
        target = torch.zeros_like(logits, dtype=torch.bool)
        for b, t, r in align.tolist():
            target[index[(b, t)], r] = True
        log_p = logits.log_softmax(-1)
        return -(log_p.masked_fill(~target, float("-inf")).logsumexp(-1)).mean()


def _labelled_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled rows (label != -100), exactly PyTorch's;
    0, with a zero gradient, when no row is labelled: PyTorch's mean over no rows is NaN,
    and one NaN loss would turn every weight into NaN at the optimizer step."""
    if (labels != -100).any():
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return logits.sum() * 0.0  # still touches the head: DDP expects every parameter used
