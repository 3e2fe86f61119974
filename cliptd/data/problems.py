"""From prepared Parquet rows to training problems and batches.

A *problem* is one scored decision: VCR rows give two (``qa``: question → 4 answers;
``qar``: question + gold answer → 4 rationales), SNLI-VE and VQA rows one (``main``).
``collate`` turns problems into the tensors ``VLStudent`` and ``Distiller`` consume.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from cliptd.data.metrics import vqa_normalize
from cliptd.data.prepare import soft_targets

HEADS = {"vcr": ("qa", "qar"), "snli_ve": ("main",), "vqa": ("main",)}


EVAL_SPLIT = {"vcr": "val", "snli_ve": "dev", "vqa": "val"}  # test labels are hidden


@dataclass
class Problem:
    key: str  # "<instance id>:<head>"
    id: str
    head: str
    image: str  # absolute path
    width: int
    height: int
    boxes: np.ndarray  # R×4, region 0 = whole image
    query: list[str]
    query_regions: list[int]
    candidates: list[tuple[list[str], list[int]]]  # [] for single-sequence tasks
    label: int  # gold candidate / class; -1 unknown
    qtype: str = ""
    domain: str = ""
    answers: list[str] = field(default_factory=list)  # VQA annotator answers
    soft: dict[int, float] = field(default_factory=dict)  # VQA: vocab index → soft score

    @property
    def num_candidates(self) -> int:
        return max(1, len(self.candidates))

    def teacher_words(self, candidate: int | None = None) -> list[str]:
        """Words of query + candidate (gold by default): what the teacher reads."""
        c = self.label if candidate is None else candidate
        if self.candidates and c >= 0:
            return self.query + self.candidates[c][0]
        return list(self.query)


def problems_from_table(task: str, table: pa.Table, image_root: Path,
                        answer_vocab: list[str] | None = None) -> list[Problem]:
    vocab_index = {a: i for i, a in enumerate(answer_vocab or [])}
    out = []
    for row in table.to_pylist():
        common = dict(id=row["id"], image=str(Path(image_root) / row["image"]),
                      width=row["width"], height=row["height"],
                      boxes=np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
                      qtype=row["qtype"], domain=row["domain"])
        if task == "vcr":
            answers = list(zip(row["candidates"], row["candidates_regions"], strict=True))
            out.append(Problem(key=f"{row['id']}:qa", head="qa", query=row["query"],
                               query_regions=row["query_regions"], candidates=answers,
                               label=row["label"], **common))
            if row["label"] >= 0:  # QA→R needs the gold answer in the query
                gold_words, gold_regions = answers[row["label"]]
                out.append(Problem(
                    key=f"{row['id']}:qar", head="qar", query=row["query"] + gold_words,
                    query_regions=row["query_regions"] + gold_regions,
                    candidates=list(zip(row["rationales"], row["rationales_regions"],
                                        strict=True)),
                    label=row["rationale_label"], **common))
        elif task == "snli_ve":
            out.append(Problem(key=f"{row['id']}:main", head="main", query=row["query"],
                               query_regions=row["query_regions"], candidates=[],
                               label=row["label"], **common))
        elif task == "vqa":
            soft = soft_targets(row["answers"], vocab_index)
            gold = json.loads(row["meta"]).get("multiple_choice_answer", "")
            out.append(Problem(key=f"{row['id']}:main", head="main", query=row["query"],
                               query_regions=row["query_regions"], candidates=[],
                               label=vocab_index.get(vqa_normalize(gold), -1),
                               answers=row["answers"], soft=soft, **common))
        else:
            raise ValueError(f"unknown task {task!r}; known: {sorted(HEADS)}")
    return out


class ImageStore:
    """Decoded, resized images kept in memory (bounded LRU): every epoch re-reads them."""

    _shared: dict[int, ImageStore] = {}

    def __init__(self, size: int, capacity: int = 50_000):
        self.size, self.capacity = size, capacity
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def shared(cls, size: int) -> ImageStore:
        """This process's store for ``size``: a sweep's next trial in the same (reused) Tune
        actor finds the images it shares with the last one already decoded. An image is
        keyed by its path; a file rewritten in place under the same path is not noticed."""
        if size not in cls._shared:
            cls._shared[size] = cls(size)
        return cls._shared[size]

    def get(self, path: str) -> torch.Tensor:
        img = self._cache.get(path)
        if img is None:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                img = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # uint8
            self._cache[path] = img
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(path)
        return img


def _token_alignment(enc, i: int, first_len: int, regions_a, regions_b):
    """Per token: its region (or -1) and its word index in query + candidate (or -1)."""
    regions, words = [], []
    for seq, w in zip(enc.sequence_ids(i), enc.word_ids(i), strict=True):
        if w is None or seq is None:
            regions.append(-1)
            words.append(-1)
        elif seq == 0:
            regions.append(regions_a[w])
            words.append(w)
        else:
            regions.append(regions_b[w])
            words.append(first_len + w)
    return regions, words


class Collator:
    """problems → batch dict. ``teacher`` maps problem key → cached targets (optional)."""

    def __init__(self, tokenizer, images: ImageStore, *, max_length: int = 64,
                 num_outputs: int = 0, teacher: dict | None = None,
                 uint8_images: bool = False):
        self.tokenizer, self.images, self.max_length = tokenizer, images, max_length
        self.num_outputs, self.teacher = num_outputs, teacher
        # images as decoded (uint8): a quarter of the bytes from a loader worker to the
        # training process and on to the GPU; ``cliptd.training.run.to_device`` scales them
        self.uint8_images = uint8_images

    def __call__(self, problems: list[Problem]) -> dict:
        size = self.images.size
        R = max(len(p.boxes) for p in problems)
        # One visual entry per distinct (image, boxes): VCR's Q→A and QA→R problems of a
        # question share theirs, so the region backbone runs once for both.
        index: dict[tuple, int] = {}
        visual: list[Problem] = []  # the first problem of each distinct (image, boxes)
        owner = []  # problem → its visual entry
        for p in problems:
            key = (p.image, p.boxes.tobytes())
            if key not in index:
                index[key] = len(visual)
                visual.append(p)
            owner.append(index[key])
        boxes = torch.zeros(len(visual), R, 4)
        region_mask = torch.zeros(len(visual), R, dtype=torch.bool)
        for v, p in enumerate(visual):
            boxes[v, : len(p.boxes)] = resize_boxes(torch.from_numpy(p.boxes), p.width,
                                                    p.height, size)
            region_mask[v, : len(p.boxes)] = True
        images = torch.stack([self.images.get(p.image) for p in visual])
        if not self.uint8_images:
            images = images.float() / 255
        firsts, seconds, meta = [], [], []
        for b, p in enumerate(problems):
            for c, (words, regs) in enumerate(p.candidates or [([], [])]):
                firsts.append(p.query)
                seconds.append(words)
                meta.append((owner[b], c, p.query_regions, regs, len(p.query)))
        pair = any(seconds)
        enc = self.tokenizer(firsts, seconds if pair else None, is_split_into_words=True,
                             truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        token_regions, token_words = [], []
        for i, (_, _, ra, rb, n) in enumerate(meta):
            r, w = _token_alignment(enc, i, n, ra, rb)
            token_regions.append(r)
            token_words.append(w)
        C = problems[0].num_candidates
        if any(p.num_candidates != C for p in problems):
            raise ValueError("a batch mixes problems with different candidate counts")
        labels = torch.tensor([p.label for p in problems])
        batch = {
            "images": images, "boxes": boxes, "region_mask": region_mask,
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_regions": torch.tensor(token_regions),
            "image_index": torch.tensor([m[0] for m in meta]),
            "num_candidates": C, "labels": labels,
            # the row of the gold candidate (multiple choice), else each problem's only row
            "gold_row": torch.arange(len(problems)) * C + (labels.clamp(min=0) if
                                                           problems[0].candidates else 0),
            "keys": [p.key for p in problems],
        }
        if "token_type_ids" in enc:  # BERT segments: query A, candidate B
            batch["token_type_ids"] = enc["token_type_ids"]
        if self.num_outputs:
            soft = torch.zeros(len(problems), self.num_outputs)
            for b, p in enumerate(problems):
                for k, v in p.soft.items():
                    soft[b, k] = v
            batch["soft_targets"] = soft
        if self.teacher is not None:
            gold_words = torch.tensor(token_words)[batch["gold_row"]]
            batch["teacher"] = self._teacher_targets(problems, R, gold_words)
        return batch

    def _teacher_targets(self, problems, R, gold_words) -> dict:
        rows = [self.teacher[p.key] for p in problems]
        D = rows[0]["pooled"].shape[-1]
        N, L = gold_words.shape
        region_emb = torch.zeros(N, R, D)
        rel_v = torch.zeros(N, R)
        region_conf = torch.zeros(N, R)
        token_words = torch.zeros(N, L, D)
        rel_t = torch.zeros(N, L)
        for b, row in enumerate(rows):
            r = len(row["region_emb"])
            region_emb[b, :r] = torch.from_numpy(row["region_emb"])
            rel_v[b, :r] = torch.from_numpy(row["rel_v"])
            region_conf[b, :r] = torch.from_numpy(row["region_conf"])
            w = gold_words[b]
            ok = (w >= 0) & (w < len(row["words"]))
            token_words[b, ok] = torch.from_numpy(row["words"])[w[ok]]
            rel_t[b, ok] = torch.from_numpy(row["rel_w"])[w[ok]]
        valid_regions = torch.zeros(N, R, dtype=torch.bool)
        for b, p in enumerate(problems):
            valid_regions[b, : min(len(p.boxes), len(rows[b]["region_emb"]))] = True
        return {
            "region_emb": region_emb, "region_mask": valid_regions, "rel_v": rel_v,
            "region_conf": region_conf, "token_words": token_words, "token_mask": (gold_words >= 0)
            & (gold_words < torch.tensor([len(r["words"]) for r in rows])[:, None]),
            "rel_t": rel_t,
            "pooled": torch.from_numpy(np.stack([r["pooled"] for r in rows])),
            "gold_prob": torch.tensor([r["gold_prob"] for r in rows], dtype=torch.float),
            "correct": torch.tensor([r["correct"] for r in rows], dtype=torch.bool),
        }


def resize_boxes(boxes: torch.Tensor, width: int, height: int, size: int) -> torch.Tensor:
    scale = boxes.new_tensor([size / width, size / height, size / width, size / height])
    return boxes * scale
