"""One pre-training batch: MLM masks, ITM pairs with hard negatives, statement choices, alignment targets."""

from __future__ import annotations

import numpy as np
import torch

from cliptd.objective.pretrain_task import CHOICE_KINDS, PretrainConfig
from cliptd.objective.statements import (
    COUNT_WORDS,
    _swap_attribute,
    grounded_statements,
    statement_choices,
)


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
