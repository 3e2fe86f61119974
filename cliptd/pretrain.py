"""Student vision-language pre-training, as VisualBERT / LXMERT are pretrained before any
task: masked language modelling conditioned on the image, image-text matching, and
word-region grounding, over an image-caption corpus, with the region backbone trained too.

    python -m cliptd.pretrain --corpus world/corpus/student.parquet --out DIR

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
import time
from dataclasses import asdict, dataclass
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
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 40
    mask_prob: float = 0.25
    itm_prob: float = 0.5  # share of mismatched (image, caption) pairs
    seed: int = 0


class PretrainHeads(nn.Module):
    """MLM and ITM heads: pre-training only, never part of the fine-tuned student."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.mlm = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                 nn.Linear(hidden, vocab))
        self.itm = nn.Linear(hidden, 2)


def load_corpus(path: Path, size: int):
    table = pq.read_table(path)
    items = []
    for row in table.to_pylist():
        with Image.open(io.BytesIO(row["image_png"])) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB").resize(
                (size, size), Image.BILINEAR)).copy()).permute(2, 0, 1)
        scale = torch.tensor([size / row["width"], size / row["height"]] * 2)
        boxes = torch.tensor([[0, 0, row["width"], row["height"]]] + row["boxes"],
                             dtype=torch.float) * scale
        items.append((img, boxes, row["region_captions"], row["captions"]))
    return items


def corpus_words(path: Path) -> set[str]:
    table = pq.read_table(path, columns=["region_captions", "captions"])
    words = set()
    for col in ("region_captions", "captions"):
        for caps in table.column(col).to_pylist():
            for c in caps:
                words.update(c.split())
    return words


def _swap_attribute(words: list[str], rng: np.random.Generator,
                    groups: tuple[tuple[str, ...], ...]) -> list[str] | None:
    """A hard negative: the same caption with one attribute word (colour, shape, size)
    replaced by another of its kind, or None when the caption has no attribute word."""
    spots = [(i, g) for i, w in enumerate(words) for g in groups if w in g]
    if not spots:
        return None
    i, group = spots[rng.integers(len(spots))]
    out = list(words)
    out[i] = rng.choice([w for w in group if w != words[i]])
    return out


def make_batch(items, tokenizer, rng: np.random.Generator, cfg: PretrainConfig,
               max_length: int = 40, attribute_groups=()) -> dict:
    """Sample (image, caption) pairs for MLM + ITM.

    Region captions are grounded: their words point at a region, so the student learns
    which region a phrase describes. Negatives are grounded the same way (a caption of
    another object, or this caption with one attribute swapped, pointed at this region), so
    image-text matching has to compare content, not notice whether a link is present.
    """
    idx = rng.integers(len(items), size=cfg.batch_size)
    texts, regions, matched = [], [], []
    for i in idx:
        match = bool(rng.random() >= cfg.itm_prob)
        region_caps, captions = items[i][2], items[i][3]
        if rng.random() < 0.5 and region_caps:
            j = int(rng.integers(len(region_caps)))
            words = region_caps[j].split()
            link = j + 1
        else:
            words = captions[rng.integers(len(captions))].split()
            link = -1
        if not match:
            swapped = _swap_attribute(words, rng, attribute_groups) if rng.random() < 0.5 \
                else None
            if swapped is not None:
                words = swapped
            else:  # the same kind of text, from another image
                other = items[rng.integers(len(items))]
                pool = other[2] if link >= 0 and other[2] else other[3]
                cand = pool[rng.integers(len(pool))].split()
                match = cand == words  # identical text by chance is still a match
                words = cand
        regions.append([link] * len(words))
        texts.append(words)
        matched.append(int(match))
    enc = tokenizer(texts, is_split_into_words=True, truncation=True, max_length=max_length,
                    padding=True, return_tensors="pt")
    token_regions = torch.full_like(enc["input_ids"], -1)
    for b in range(len(texts)):
        for t, w in enumerate(enc.word_ids(b)):
            if w is not None:
                token_regions[b, t] = regions[b][w]
    input_ids = enc["input_ids"].clone()
    special = torch.tensor([[t in tokenizer.all_special_ids for t in row] for row in input_ids])
    maskable = ~special & (enc["attention_mask"] > 0)
    masked = (torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(
        int(rng.integers(2**31)))) < cfg.mask_prob) & maskable
    mlm_labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    input_ids[masked] = tokenizer.mask_token_id
    R = max(len(items[i][1]) for i in idx)
    boxes = torch.zeros(len(idx), R, 4)
    region_mask = torch.zeros(len(idx), R, dtype=torch.bool)
    for b, i in enumerate(idx):
        boxes[b, : len(items[i][1])] = items[i][1]
        region_mask[b, : len(items[i][1])] = True
    return {
        "images": torch.stack([items[i][0] for i in idx]).float() / 255, "boxes": boxes,
        "region_mask": region_mask, "input_ids": input_ids,
        "attention_mask": enc["attention_mask"], "token_regions": token_regions,
        "image_index": torch.arange(len(idx)), "mlm_labels": mlm_labels,
        "itm_labels": torch.tensor(matched),
    }


def attribute_groups() -> tuple[tuple[str, ...], ...]:
    """Words whose swap makes a hard negative: the synthetic world's attribute vocabularies
    (a real caption corpus would use its own, e.g. colour and object words)."""
    from cliptd.synthetic import COLOURS, SHAPES, SIZES

    return (tuple(COLOURS), tuple(SHAPES), tuple(SIZES))


def pretrain_student(corpus: Path, out_dir: Path, tokenizer, cfg: PretrainConfig | None = None,
                     *, progress: bool = True, log=None, bar_position: int = 0) -> Path:
    """Pre-train and export a student folder (config, weights, tokenizer), atomically."""
    cfg = cfg or PretrainConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    scfg = StudentConfig.from_name(cfg.student, vocab_size=len(tokenizer))
    model = VLStudent(scfg)
    heads = PretrainHeads(scfg.hidden_size, len(tokenizer))
    items = load_corpus(Path(corpus), scfg.image_size)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5
                                              * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="pretrain student", disable=not progress,
               position=bar_position)
    history = []
    model.train()
    groups = attribute_groups()
    for step in bar:
        batch = make_batch(items, tokenizer, rng, cfg, attribute_groups=groups)
        out = model(batch)
        # MLM only on matched pairs: predicting words of a caption of another image would
        # teach the model to ignore the image.
        mlm_labels = batch["mlm_labels"].masked_fill(batch["itm_labels"][:, None] == 0, -100)
        mlm = F.cross_entropy(heads.mlm(out.text_states).flatten(0, 1), mlm_labels.flatten(),
                              ignore_index=-100)
        itm = F.cross_entropy(heads.itm(out.pooled), batch["itm_labels"])
        loss = mlm + itm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "mlm": mlm.item(), "itm": itm.item()}
            history.append(rec)
            bar.set_postfix(mlm=f"{rec['mlm']:.2f}", itm=f"{rec['itm']:.2f}")
            if log:
                log(rec)
    model.eval()
    with atomic_dir(Path(out_dir)) as tmp:
        save_student(model, tokenizer, tmp, extra={"pretrain": asdict(cfg),
                                                   "corpus": str(corpus)})
        (tmp / "pretrain.json").write_text(json.dumps(
            {"config": asdict(cfg), "seconds": round(time.time() - start, 1),
             "history": history}, indent=2))
    return Path(out_dir)


def main(argv=None) -> int:
    from cliptd.student import build_word_tokenizer

    parser = argparse.ArgumentParser(prog="python -m cliptd.pretrain")
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--student", default=PretrainConfig.student)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = build_word_tokenizer(corpus_words(args.corpus))
    out = pretrain_student(args.corpus, args.out, tokenizer,
                           PretrainConfig(student=args.student, steps=args.steps, seed=args.seed))
    print(f"student written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
