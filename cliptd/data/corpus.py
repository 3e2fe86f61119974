"""Image-caption corpora for student pre-training (Parquet: image, boxes, region captions, captions), and the vocabularies of corpora and prepared datasets."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image


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


def dataset_words(folder: Path) -> set[str]:
    """Every word of a prepared dataset's text (queries, answers, candidates, rationales)."""
    from cliptd.data.prepare import load_manifest, read_split

    words: set[str] = set()
    manifest = load_manifest(folder)
    for split in manifest["counts"]:
        table = read_split(folder, split, columns=["query", "candidates",
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


def check_corpus(path: Path) -> None:
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
