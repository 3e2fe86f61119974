"""Student vision-language pre-training, as VisualBERT / LXMERT are pretrained before any
task: masked language modelling conditioned on the image, image-text matching, and
word-region grounding, over an image-caption corpus, with the region backbone trained too.

    python -m cliptd.pretrain --corpus world/corpus/student.parquet --out DIR
    python -m cliptd.pretrain --corpus C.parquet --out DIR --workers 2 --steps 2000
    python -m cliptd.pretrain --corpus C.parquet --out DIR --vocab-from PREPARED_DATASET

The CLI runs on Ray Train (data-parallel, a self-describing checkpoint every
``checkpoint_every`` steps, exact resume after a worker dies, ``--name`` resumes a killed
run) and records the run in MLflow (experiment ``cliptd-pretrain``). The embedded default
runs the same loop in-process (``pretrain_student``), beside the teacher's pre-training.

Objectives (``PretrainTask``): MLM conditioned on the image; image-text matching with hard
negatives; a 4-way choice between a true grounded statement and minimally false ones;
word-region alignment toward the objects a word refers to; region attribute classification
on the backbone's region features (BUTD-style). The statements come from the corpus's own
boxes and region captions (``grounded_statements``, ``statement_choices``).

The embedded default pre-trains on the synthetic world's *student* corpus: source domain
only, fewer scenes — narrower than the teacher's corpus, as VL-BERT's few million captions
are narrower than CLIP's 400M web pairs. Users with a real VisualBERT / LXMERT checkpoint
skip this stage (``StudentConfig.checkpoint``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from cliptd.atomic import atomic_dir
from cliptd.student import StudentConfig, VLStudent, save_student


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


PRETRAIN_FORMAT = "cliptd-pretrain-checkpoint-v1"
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
        self.attributes = nn.ModuleList(nn.Linear(hidden, n) for n in group_sizes)

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
        logs = {"mlm": F.cross_entropy(self.mlm(out.text_states).flatten(0, 1),
                                       mlm_labels.flatten(), ignore_index=-100),
                "itm": F.cross_entropy(itm_logits, batch["itm_labels"][itm_rows])}
        itm_acc = (itm_logits.argmax(-1) == batch["itm_labels"][itm_rows]).float().mean()
        loss = logs["mlm"] + logs["itm"]
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
            attr = sum(F.cross_entropy(head(feats).flatten(0, 1), labels[..., g].flatten(),
                                       ignore_index=-100)
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


@dataclass
class CorpusItem:
    image: torch.Tensor  # 3×S×S uint8
    boxes: torch.Tensor  # (1 + objects)×4 in pixels of the S×S image; row 0 = whole image
    region_captions: list[str]
    captions: list[str]
    # per region (row 0 included): the index of its word in each attribute group, or -100
    attributes: torch.Tensor  # (1 + objects) × groups


def region_attributes(caption: str, groups: tuple[tuple[str, ...], ...]) -> list[int]:
    """A region caption's label in each attribute group ("a small red square" → size,
    colour and shape indices): the region labels a detector backbone is trained on (BUTD's
    Visual Genome object and attribute classes), read here off the corpus's own captions."""
    words = caption.split()
    return [next((g.index(w) for w in words if w in g), -100) for g in groups]


def load_corpus(path: Path, size: int, groups: tuple[tuple[str, ...], ...] = ()
                ) -> list[CorpusItem]:
    table = pq.read_table(path)
    items = []
    for row in table.to_pylist():
        with Image.open(io.BytesIO(row["image_png"])) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB").resize(
                (size, size), Image.BILINEAR)).copy()).permute(2, 0, 1)
        scale = torch.tensor([size / row["width"], size / row["height"]] * 2)
        boxes = torch.tensor([[0, 0, row["width"], row["height"]]] + row["boxes"],
                             dtype=torch.float) * scale
        attrs = [[-100] * len(groups)] + [region_attributes(c, groups)
                                          for c in row["region_captions"]]
        items.append(CorpusItem(img, boxes, row["region_captions"], row["captions"],
                                torch.tensor(attrs, dtype=torch.long).view(len(attrs), -1)))
    return items


def corpus_words(path: Path) -> set[str]:
    table = pq.read_table(path, columns=["region_captions", "captions"])
    words = set()
    for col in ("region_captions", "captions"):
        for caps in table.column(col).to_pylist():
            for c in caps:
                words.update(c.split())
    return words


# Grounded statements: what region descriptions and referring expressions (Visual Genome,
# RefCOCO) give real VL pre-training — counts, spatial extremes, attribute bindings — made
# from the corpus's own boxes and region labels. Each word carries the region it refers to
# (0-based among the objects) or None.
COUNT_WORDS = ("none", "one", "two", "three")
DIRECTIONS = {"left": ("to", 0, 1), "right": ("to", 0, -1), "top": ("toward", 1, 1),
              "bottom": ("toward", 1, -1)}


def _extreme(boxes: torch.Tensor, direction: str, gap: float = 3.0) -> int | None:
    """The object clearly furthest in ``direction`` by centre and by edge, or None."""
    _, axis, sign = DIRECTIONS[direction]
    if len(boxes) < 2:
        return None
    centre = sign * (boxes[:, axis] + boxes[:, axis + 2]) / 2
    edge = sign * (boxes[:, axis] if sign > 0 else boxes[:, axis + 2])
    c, e = centre.argsort(), edge.argsort()
    if c[0] != e[0] or centre[c[1]] - centre[c[0]] < gap or edge[e[1]] - edge[e[0]] < gap:
        return None
    return int(c[0])


def grounded_statements(item: CorpusItem, groups, rng: np.random.Generator
                        ) -> list[tuple[list[str], list[int | None]]]:
    """True statements about one image: how many things of a colour, which object is
    furthest in a direction (its shape word grounded to it), what shape the only thing of a
    colour is. ``groups`` = (colours, shapes, sizes)."""
    colours, shapes = groups[0], groups[1]
    attrs = item.attributes[1:]
    out = []
    colour = colours[rng.integers(len(colours))]
    k = int((attrs[:, 0] == colours.index(colour)).sum())
    if k < len(COUNT_WORDS):
        verb, noun = ("is", "thing") if k == 1 else ("are", "things")
        out.append((["there", verb, COUNT_WORDS[k], colour, noun, "."], [None] * 6))
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    g = _extreme(item.boxes[1:], direction)
    if g is not None and attrs[g, 1] >= 0:
        words = ["the", shapes[attrs[g, 1]], "is", "furthest", DIRECTIONS[direction][0],
                 "the", direction, "."]
        out.append((words, [None, g, None, None, None, None, None, None]))
    counts = torch.bincount(attrs[:, 0].clamp(min=0), minlength=len(colours))
    unique = [j for j in range(len(attrs)) if attrs[j, 0] >= 0 and counts[attrs[j, 0]] == 1
              and attrs[j, 1] >= 0]
    if unique:
        j = unique[rng.integers(len(unique))]
        out.append((["the", colours[attrs[j, 0]], "thing", "is", "a", shapes[attrs[j, 1]], "."],
                    [None] * 7))
    return out


def statement_choices(item: CorpusItem, groups, rng: np.random.Generator, n: int = 4
                      ) -> tuple[list[tuple[list[str], list[int | None]]], list, str] | None:
    """``n`` texts about one image, the first true, the others minimally false: the other
    counts ("there are two red things" / "there is one red thing" / ...), the same words
    pointed at other objects ("the square is furthest to the left" said of each object), the
    other shapes for a colour, or a region caption with one attribute changed. None when
    the image cannot give ``n`` distinct texts of the chosen kind. This is the contrast
    image-text matching learns from, as a choice instead of a yes/no.

    Also returns, per word of the true text, the objects it refers to (word-region
    alignment targets, never given as input): "red things" → every red object, "left" in
    "... furthest to the left" → that object, "red thing" → the only red object; and the
    kind of choice (one of ``CHOICE_KINDS``)."""
    colours, shapes, sizes = groups
    attrs = item.attributes[1:]
    kind = int(rng.integers(4))
    if kind == 0:  # count
        colour = colours[rng.integers(len(colours))]
        k = int((attrs[:, 0] == colours.index(colour)).sum())
        if k >= len(COUNT_WORDS):
            return None

        def count(j):
            verb, noun = ("is", "thing") if j == 1 else ("are", "things")
            return ["there", verb, COUNT_WORDS[j], colour, noun, "."], [None] * 6
        others = [j for j in range(len(COUNT_WORDS)) if j != k]
        members = tuple(int(j) for j in (attrs[:, 0] == colours.index(colour)).nonzero()
                        .flatten())
        refs = [None, None, None, members or None, members or None, None]
        return [count(k)] + [count(j) for j in rng.permutation(others)[: n - 1]], refs, "count"
    if kind == 1:  # which object is furthest
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        g = _extreme(item.boxes[1:], direction)
        if g is None or len(attrs) < n or (attrs[:, 1] < 0).any():
            return None

        def said_of(j):
            return (["the", shapes[attrs[j, 1]], "is", "furthest", DIRECTIONS[direction][0],
                     "the", direction, "."], [None, j, None, None, None, None, None, None])
        others = [j for j in range(len(attrs)) if j != g]
        refs = [None, None, None, (g,), None, None, (g,), None]
        return ([said_of(g)] + [said_of(int(j)) for j in rng.permutation(others)[: n - 1]],
                refs, "furthest")
    if kind == 2:  # what shape the only thing of a colour is
        counts = torch.bincount(attrs[:, 0].clamp(min=0), minlength=len(colours))
        unique = [j for j in range(len(attrs)) if attrs[j, 0] >= 0 and counts[attrs[j, 0]] == 1
                  and attrs[j, 1] >= 0]
        if not unique or len(shapes) < n:
            return None
        j = unique[rng.integers(len(unique))]
        colour, shape = colours[attrs[j, 0]], shapes[attrs[j, 1]]
        others = [s for s in shapes if s != shape]
        refs = [None, (j,), (j,), None, None, None, None]
        return [(["the", colour, "thing", "is", "a", s, "."], [None] * 7)
                for s in [shape, *rng.permutation(others)[: n - 1]]], refs, "binding"
    # a region caption against the same region with one attribute changed
    j = int(rng.integers(len(item.region_captions)))
    words = item.region_captions[j].split()
    out, tries = [words], 0
    while len(out) < n and tries < 20:
        tries += 1
        cand = _swap_attribute(words, rng, groups)
        if cand is not None and cand not in out:
            out.append(cand)
    if len(out) < n:
        return None
    return [(w, [j] * len(w)) for w in out], [None] * len(words), "caption"


def _swap_attribute(words: list[str], rng: np.random.Generator,
                    groups: tuple[tuple[str, ...], ...]) -> list[str] | None:
    """A hard negative: the same text with one attribute word (colour, shape, size, count,
    direction) replaced by another of its kind, or None when it has no such word."""
    spots = [(i, g) for i, w in enumerate(words) for g in groups if w in g]
    if not spots:
        return None
    i, group = spots[rng.integers(len(spots))]
    out = list(words)
    out[i] = rng.choice([w for w in group if w != words[i]])
    return out


def _sample_text(items, b: int, rng: np.random.Generator, cfg: PretrainConfig, groups,
                 swap_groups) -> tuple[list[str], list[int], bool]:
    """One (text, per-word region link, matched) for image ``b``: a region caption (every
    word linked to its region), a grounded statement, or an image caption, and for
    mismatched pairs a hard negative of the same kind."""
    item = items[b]
    match = bool(rng.random() >= cfg.itm_prob)
    kind = rng.random()
    statements = grounded_statements(item, groups, rng) if groups and kind < 0.7 else []
    if kind < 0.3 and item.region_captions:
        j = int(rng.integers(len(item.region_captions)))
        words = item.region_captions[j].split()
        links = [j] * len(words)
    elif statements:
        words, links = statements[rng.integers(len(statements))]
        words, links = list(words), list(links)
    else:
        words = item.captions[rng.integers(len(item.captions))].split()
        links = [None] * len(words)
    if not match:
        grounded = [i for i, r in enumerate(links) if r is not None]
        n_objects = len(item.boxes) - 1
        if grounded and len(set(links)) == 2 and n_objects > 1 and rng.random() < 0.3:
            # point the grounded words at another object: "which one" is what is wrong
            others = [r for r in range(n_objects) if r != links[grounded[0]]]
            r = others[rng.integers(len(others))]
            links = [r if x is not None else None for x in links]
        else:
            swapped = _swap_attribute(words, rng, swap_groups) if rng.random() < 0.5 \
                else None
            if swapped is not None:
                words = swapped
            else:  # the same kind of text from another image, grounded the same way
                other = items[rng.integers(len(items))]
                if any(x is not None for x in links) and other.region_captions:
                    j = int(rng.integers(len(other.region_captions)))
                    cand = other.region_captions[j].split()
                    r = links[grounded[0]]
                    links = [r] * len(cand)
                else:
                    cand = other.captions[rng.integers(len(other.captions))].split()
                    links = [None] * len(cand)
                match = cand == words  # identical text by chance is still a match
                words = cand
    # region 0 is the whole image; object j is region j + 1
    return words, [-1 if r is None else r + 1 for r in links], match


def make_batch(items, tokenizer, rng: np.random.Generator, cfg: PretrainConfig,
               max_length: int = 40, attribute_groups=()) -> dict:
    """Sample (image, text) pairs for MLM, ITM and region attribute classification.

    Grounded words point at their region (VL-BERT / R2C style), so the student learns which
    region a phrase describes. Negatives are grounded the same way (another object's
    caption, the same text with one attribute, count or direction swapped, or the same
    words pointed at another object), so image-text matching has to compare content, not
    notice whether a link is present.
    """
    groups = attribute_groups[:3] if len(attribute_groups) >= 3 else ()
    swap_groups = tuple(attribute_groups) + (COUNT_WORDS, ("left", "right"), ("top", "bottom"))
    idx = rng.integers(len(items), size=cfg.batch_size)
    texts, regions, matched = [], [], []
    for i in idx:
        words, links, match = _sample_text(items, int(i), rng, cfg, groups, swap_groups)
        texts.append(words)
        regions.append(links)
        matched.append(int(match))
    rows_image = list(range(len(idx)))
    referents = [[None] * len(t) for t in texts]  # per row and word: objects referred to
    choice_gold = []  # per choice group: the position of the true text among its 4 rows
    choice_kind = []  # per choice group: its index in CHOICE_KINDS
    for b in range(min(cfg.choice_images, len(idx)) if groups else 0):
        made = statement_choices(items[idx[b]], groups, rng)
        if made is None:
            continue
        choices, refs, kind = made
        order = rng.permutation(len(choices))  # where the true one sits
        for c in order:
            words, links = choices[c]
            texts.append(list(words))
            regions.append([-1 if r is None else r + 1 for r in links])
            rows_image.append(b)
            referents.append(refs if c == 0 else [None] * len(words))
        matched.extend([-100] * len(choices))  # not ITM rows
        choice_gold.append(int(np.argmax(order == 0)))
        choice_kind.append(CHOICE_KINDS.index(kind))
    enc = tokenizer(texts, is_split_into_words=True, truncation=True, max_length=max_length,
                    padding=True, return_tensors="pt")
    token_regions = torch.full_like(enc["input_ids"], -1)
    R = max(len(items[i].boxes) for i in idx)
    align = []  # (row, token, region): word-region alignment targets (region 0 = image)
    for b in range(len(texts)):
        for t, w in enumerate(enc.word_ids(b)):
            if w is not None:
                token_regions[b, t] = regions[b][w]
                for r in referents[b][w] or ():
                    align.append((b, t, r + 1))
    input_ids = enc["input_ids"].clone()
    special = torch.tensor([[t in tokenizer.all_special_ids for t in row] for row in input_ids])
    maskable = ~special & (enc["attention_mask"] > 0)
    maskable[len(idx):] = False  # choice rows are read whole
    masked = (torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(
        int(rng.integers(2**31)))) < cfg.mask_prob) & maskable
    mlm_labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    input_ids[masked] = tokenizer.mask_token_id
    G = items[0].attributes.shape[1]
    boxes = torch.zeros(len(idx), R, 4)
    region_mask = torch.zeros(len(idx), R, dtype=torch.bool)
    attributes = torch.full((len(idx), R, G), -100, dtype=torch.long)
    for b, i in enumerate(idx):
        n = len(items[i].boxes)
        boxes[b, :n] = items[i].boxes
        region_mask[b, :n] = True
        attributes[b, :n] = items[i].attributes
    return {
        "images": torch.stack([items[i].image for i in idx]).float() / 255, "boxes": boxes,
        "region_mask": region_mask, "input_ids": input_ids,
        "attention_mask": enc["attention_mask"], "token_regions": token_regions,
        "image_index": torch.tensor(rows_image), "mlm_labels": mlm_labels,
        "itm_labels": torch.tensor(matched), "region_attributes": attributes,
        "choice_gold": torch.tensor(choice_gold, dtype=torch.long),
        "choice_kind": torch.tensor(choice_kind, dtype=torch.long),
        "align": torch.tensor(align, dtype=torch.long).view(-1, 3),
    }


def attribute_groups() -> tuple[tuple[str, ...], ...]:
    """The region label vocabularies (colour, shape, size): the synthetic world's; a real
    caption corpus would use its detector's object and attribute classes."""
    from cliptd.synthetic import COLOURS, SHAPES, SIZES

    return (tuple(COLOURS), tuple(SHAPES), tuple(SIZES))


def pretrain_loop(config: dict, rt) -> PretrainTask | None:
    """The pre-training loop on one worker (``rt``: ``cliptd.train.RayRuntime`` or
    ``LocalRuntime``). ``config``: the ``PretrainConfig`` fields plus ``corpus``, ``words``
    (the closed vocabulary), and optionally ``threads``, ``tracking``, ``progress``, ``fault``.
    Returns the task module on rank 0 (the caller exports ``task.student``)."""
    from cliptd.student import build_word_tokenizer
    from cliptd.train import load_checkpoint_file, peak_rss_mb

    cfg = PretrainConfig(**{f.name: config[f.name] for f in fields(PretrainConfig)
                            if f.name in config})
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    tokenizer = build_word_tokenizer(config["words"])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    groups = attribute_groups()
    scfg = StudentConfig.from_name(cfg.student, vocab_size=len(tokenizer))
    task = PretrainTask(VLStudent(scfg), len(tokenizer), tuple(len(g) for g in groups))
    items = load_corpus(Path(config["corpus"]), scfg.image_size, groups)
    model = rt.prepare_model(task)
    module: PretrainTask = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5
                                              * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    # each rank samples its own batches; global batch = batch_size
    per_worker = max(1, cfg.batch_size // rt.world)
    rng = np.random.default_rng([cfg.seed, rt.rank])
    torch.manual_seed(cfg.seed * 1000 + rt.rank)  # dropout differs per rank, like the data
    step, history = 0, []
    with rt.latest_checkpoint() as folder:
        if folder is not None:  # exact resume: weights, optimizer, schedule, sampling RNGs
            state = load_checkpoint_file(folder / "checkpoint.pt", PRETRAIN_FORMAT)
            module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            rng.bit_generator.state = state["rng"][rt.rank]["numpy"]
            torch.set_rng_state(state["rng"][rt.rank]["torch"])
            step, history = state["step"], state["history"]
    tracker = None
    if rt.rank == 0 and config.get("tracking"):
        from cliptd.tracking import RunLogger

        tracker = RunLogger(config["tracking"]["uri"], config["tracking"]["run_id"])
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain student",
               disable=not config.get("progress") or rt.rank != 0,
               position=config.get("bar_position", 0))
    fault = config.get("fault") or {}
    sums: dict[str, float] = {}
    n, t0 = 0, time.time()
    model.train()
    while step < cfg.steps:
        batch = make_batch(items, tokenizer, rng, replace(cfg, batch_size=per_worker),
                           attribute_groups=groups)
        loss, logs = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        n += 1
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        bar.update(1)
        if fault.get("exit_at_step") == step and not Path(fault["marker"]).exists():
            Path(fault["marker"]).write_text(f"worker {rt.rank} exited at step {step}\n")
            os._exit(1)  # a hard crash: no cleanup, no report
        if step % cfg.checkpoint_every and step < cfg.steps:
            continue
        # averages over the steps since the last report (this rank's batches)
        # (the per-kind choice sums, "choice_hits/<kind>", are divided by their own count)
        metrics = {"step": step, **{f"pretrain/{k}": v / n for k, v in sums.items()
                                    if "/" not in k},
                   **_choice_accuracy_by_kind(sums),
                   "pretrain/lr": sched.get_last_lr()[0],
                   "pretrain/samples_per_s": n * per_worker * rt.world / (time.time() - t0),
                   "pretrain/workers": rt.world, "sys/peak_rss_mb": peak_rss_mb()}
        history.append({k: round(v, 5) for k, v in metrics.items()})
        bar.set_postfix({k.split("/")[1]: f"{v:.2f}" for k, v in metrics.items()
                         if k.count("/") == 1 and k.startswith("pretrain/")
                         and k.split("/")[1] in LOSSES})
        rngs = _gather_rng(rng)  # every rank's sampling state, for an exact resume
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if rt.rank == 0:
                folder = Path(tmp)
                torch.save({"format": PRETRAIN_FORMAT, "model": module.state_dict(),
                            "student_config": asdict(scfg), "config": asdict(cfg),
                            "corpus": str(config["corpus"]), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "rng": rngs, "step": step,
                            "history": history}, folder / "checkpoint.pt")
                tokenizer.save_pretrained(folder / "tokenizer")
            if tracker:
                tracker.log_metrics(metrics, step=step)
            rt.report(metrics, folder, step, unit="step")
        sums, n, t0 = {}, 0, time.time()
    bar.close()
    if tracker:
        tracker.close()
    return module if rt.rank == 0 else None


def _choice_accuracy_by_kind(sums: dict[str, float]) -> dict[str, float]:
    """``pretrain/choice_acc/<kind>`` from the summed hits and groups of each kind since the
    last report (a kind that did not occur is left out, not reported as 0)."""
    return {f"pretrain/choice_acc/{name}": sums[f"choice_hits/{name}"] / seen
            for name in CHOICE_KINDS if (seen := sums.get(f"choice_seen/{name}", 0))}


def _gather_rng(rng: np.random.Generator) -> list[dict]:
    """Every rank's RNG states (numpy sampler, torch), indexed by rank."""
    mine = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, mine)
        return out
    return [mine]


def export_pretrained(checkpoint: Path, out_dir: Path) -> Path:
    """The pretrained student alone (config, weights, tokenizer; no pre-training heads) from
    a pre-training checkpoint folder, written atomically."""
    from transformers import PreTrainedTokenizerFast

    from cliptd.train import load_checkpoint_file

    state = load_checkpoint_file(Path(checkpoint) / "checkpoint.pt", PRETRAIN_FORMAT)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(checkpoint) / "tokenizer")
    student = VLStudent(StudentConfig(**state["student_config"]))
    student.load_state_dict({k.removeprefix("student."): v for k, v in state["model"].items()
                             if k.startswith("student.")})
    with atomic_dir(Path(out_dir)) as tmp:
        save_student(student, tokenizer, tmp, extra={"pretrain": state["config"],
                                                     "corpus": state["corpus"]})
        (tmp / "pretrain.json").write_text(json.dumps(
            {"config": state["config"], "steps": state["step"], "history": state["history"]},
            indent=2))
    return Path(out_dir)


def pretrain_student(corpus: Path, out_dir: Path, words, cfg: PretrainConfig | None = None,
                     *, progress: bool = True, log=None, bar_position: int = 0) -> Path:
    """Pre-train in this process (the embedded default's path: same loop, one worker) and
    export the student folder atomically."""
    from cliptd.train import LocalRuntime

    cfg = cfg or PretrainConfig()
    start = time.time()
    rt = LocalRuntime()
    if log:
        keep = rt.report
        rt.report = lambda metrics, folder, step, unit: (keep(metrics, folder, step, unit),
                                                        log(metrics))
    task = pretrain_loop({**asdict(cfg), "corpus": str(corpus), "words": sorted(words),
                          "progress": progress, "bar_position": bar_position}, rt)
    history = [{k: round(v, 5) for k, v in r.items()} for r in rt.history]
    with atomic_dir(Path(out_dir)) as tmp:
        save_student(task.student.eval(), build_tokenizer(words), tmp,
                     extra={"pretrain": asdict(cfg), "corpus": str(corpus)})
        (tmp / "pretrain.json").write_text(json.dumps(
            {"config": asdict(cfg), "seconds": round(time.time() - start, 1),
             "history": history}, indent=2))
    return Path(out_dir)


def build_tokenizer(words):
    from cliptd.student import build_word_tokenizer

    return build_word_tokenizer(sorted(words))


def dataset_words(folder: Path) -> set[str]:
    """Every word of a prepared dataset's text (queries, answers, candidates, rationales)."""
    from cliptd import data as data_mod

    words: set[str] = set()
    manifest = data_mod.load_manifest(folder)
    for split in manifest["counts"]:
        table = data_mod.read_split(folder, split, columns=["query", "candidates",
                                                            "rationales", "answers"])
        for col in ("query", "answers"):
            for toks in table.column(col).to_pylist():
                for t in toks:
                    words.update(t.split())
        for col in ("candidates", "rationales"):
            for lists in table.column(col).to_pylist():
                for toks in lists:
                    words.update(toks)
    return words


def _check_corpus(path: Path) -> None:
    """Refuse a corpus that is missing or lacks the columns pre-training reads, by name."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus file")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a Parquet corpus"
        raise ValueError(f"{path}: not a Parquet file ({exc})") from None
    missing = {"image_png", "width", "height", "boxes", "region_captions",
               "captions"} - set(schema.names)
    if missing:
        raise ValueError(f"{path}: corpus lacks the column(s) {sorted(missing)} (schema: "
                         "cliptd.synthetic.corpus.SCHEMA)")


def main(argv=None) -> int:
    from cliptd.cli import die, init_ray, reachable_tracking_uri, resolve_storage

    parser = argparse.ArgumentParser(prog="python -m cliptd.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True,
                        help="image-caption corpus (Parquet, cliptd.synthetic.corpus.SCHEMA)")
    parser.add_argument("--out", type=Path, required=True, help="exported student folder")
    parser.add_argument("--vocab-from", type=Path, action="append", default=[],
                        help="prepared dataset(s) whose words join the vocabulary (the tasks "
                             "the student will be fine-tuned on)")
    for f in fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                            default=f.default)
    parser.add_argument("--name", help="Ray Train run name; the same name resumes")
    parser.add_argument("--storage-path", default=os.environ.get("CLIPTD_STORAGE_PATH", "runs"))
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///./mlflow.db)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument("--max-failures", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    try:
        StudentConfig.from_name(cfg.student)
        if cfg.steps < 1 or cfg.batch_size < args.workers or cfg.checkpoint_every < 1:
            raise ValueError("--steps and --checkpoint-every must be >= 1 and --batch-size "
                             ">= --workers")
        _check_corpus(args.corpus)
        words = corpus_words(args.corpus)
        for folder in args.vocab_from:
            words |= dataset_words(folder)
    except (ValueError, FileNotFoundError) as exc:
        die(str(exc))
    from cliptd import tracking

    uri = reachable_tracking_uri(args)
    name = args.name or f"pretrain-{cfg.student}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = tracking.get_experiment(uri, "cliptd-pretrain")
    # found again by name on a resumed run, like a sweep's parent run
    run_id = tracking.find_or_create_parent(uri, experiment, name, name, {
        "cliptd.kind": "pretrain", "corpus": str(args.corpus.resolve())})
    c = tracking.client(uri)
    resolved = {**asdict(cfg), "corpus": str(args.corpus.resolve()), "words": sorted(words),
                "tracking": {"uri": uri, "run_id": run_id}, "threads": max(
                    1, int(args.cpus_per_worker)), "progress": True}
    c.log_dict(run_id, {"config": asdict(cfg), "corpus": resolved["corpus"],
                        "vocabulary": len(words), "workers": args.workers,
                        "versions": _versions()}, "pretrain.json")
    if not c.get_run(run_id).data.params:
        for k, v in {**asdict(cfg), "workers": args.workers}.items():
            c.log_param(run_id, k, v)
    init_ray(args)
    from ray.train import TrainingFailedError

    from cliptd.launch import make_trainer, pretrain_fn_per_worker

    storage = resolve_storage(args.storage_path)
    trainer = make_trainer(resolved, name=name, storage_path=storage, workers=args.workers,
                           gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                           train_fn=pretrain_fn_per_worker, keep_checkpoints=1,
                           score_attribute=None)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        c.set_terminated(run_id, status="FAILED")
        die(f"pre-training failed after {args.max_failures} restart(s): "
            f"{str(exc).splitlines()[0]} (checkpoints: {storage}/{name}; rerun with --name "
            f"{name} to resume)", code=1)
    with result.checkpoint.as_directory() as d:
        out = export_pretrained(Path(d), args.out)
    c.log_artifact(run_id, str(out / "pretrain.json"))
    c.set_terminated(run_id, status="FINISHED")
    last = result.metrics
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()
                      if k.startswith(("pretrain/", "step"))}, indent=2))
    print(f"student written to {out}; fine-tune it with "
          f"python -m cliptd.train --config <yaml with student: {out}>")
    print(f"MLflow: {tracking.ui_command(uri)}   (experiment cliptd-pretrain, run {run_id})")
    return 0


def _versions() -> dict:
    from cliptd.tune import package_versions

    return package_versions()


if __name__ == "__main__":
    sys.exit(main())
