"""The frozen CLIP teacher: any open_clip model, or the embedded tiny one pre-trained here.

The teacher only ever runs to fill the teacher cache (``cliptd.teacher_cache``) or, in the
benchmark, live beside the student; it is never part of a trained or exported student.

    python -m cliptd.teacher pretrain --corpus world/corpus/teacher.parquet --out DIR

Real teachers: ``TeacherSpec(model="ViT-B-32", pretrained="openai")`` (needs the weights in
open_clip's cache or network) or ``pretrained=/path/to/open_clip_pytorch_model.bin``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from cliptd.atomic import atomic_dir

CONFIG_DIR = Path(__file__).parent / "model_configs"
EMBEDDED_TEACHER = "cliptd-tiny"
open_clip.add_model_config(CONFIG_DIR / f"{EMBEDDED_TEACHER}.json")


@dataclass(frozen=True)
class TeacherSpec:
    """Which CLIP to distil from. ``model`` is an open_clip name or ``local-dir:<folder>``."""

    model: str = EMBEDDED_TEACHER
    pretrained: str | None = None

    def describe(self) -> str:
        return f"{self.model}:{self.pretrained or 'none'}"


def clip_mean_std(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel mean / std the model was trained with (1×3×1×1 each)."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def clip_image_size(model) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def crop_regions(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop-and-resize each box of one image (3×H×W in [0, 1]) to size×size.

    RoIAlign with aligned corners is a batched, differentiable crop + bilinear resize: the
    same pixels CLIP would see if each region were cropped and resized by PIL.
    """
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes.float()], dim=1)
    return roi_align(image[None].float(), rois, output_size=size, spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)


class Teacher:
    """A frozen open_clip model with the encoders CLIP-TD needs.

    - ``encode_regions``: normalized image embeddings of each region crop (region 0 = image);
    - ``encode_texts``: normalized pooled text embeddings;
    - ``encode_words``: per-word states (the text tower's final-layer token states projected
      into the joint space, averaged over each word's BPE tokens) plus the pooled embedding
      from the same pass, so student tokens can be aligned to teacher tokens word by word.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, spec: TeacherSpec, device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = torch.device(device)
        self.image_size = clip_image_size(model)
        self.mean, self.std = (t.to(device) for t in clip_mean_std(model))
        self.context_length = getattr(model, "context_length", 77)
        self.logit_scale = float(model.logit_scale.exp().clamp(max=100).item())
        self.embed_dim = int(self.encode_texts(["a"]).shape[-1])

    @classmethod
    def load(cls, spec: TeacherSpec, device: str = "cpu") -> Teacher:
        model = open_clip.create_model(spec.model, pretrained=spec.pretrained, device=device,
                                       weights_only=True)
        tokenizer = open_clip.get_tokenizer(spec.model)
        return cls(model, tokenizer, spec, device)

    def fingerprint(self) -> str:
        """Content hash of the weights: a changed teacher gets a new cache key."""
        # Bytes only, never a float reduction: a sum's rounding depends on torch's thread
        # count, so the same weights hashed under 1 and 2 threads would get two cache keys.
        # Up to 64k evenly strided values per tensor keep a ViT-L's hash under a second.
        h = hashlib.sha256(self.spec.describe().encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            flat = tensor.detach().reshape(-1).cpu()
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            sample = flat[:: max(1, flat.numel() // 65536)].contiguous()
            h.update(sample.view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode_regions(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        crops = crop_regions(image.to(self.device), boxes.to(self.device), self.image_size)
        return self.model.encode_image((crops - self.mean) / self.std, normalize=True)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=True)

    def _word_tokens(self, words: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """CLIP BPE ids for a word list and each word's [start, end) token span.

        CLIP's BPE splits on whitespace and punctuation first, so encoding word by word and
        concatenating gives the ids of the joined sentence, with known spans.
        """
        inner = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        sot, eot = inner.sot_token_id, inner.eot_token_id
        ids, spans = [sot], []
        for word in words:
            piece = inner.encode(word)[: max(0, self.context_length - 1 - len(ids))]
            spans.append((len(ids), len(ids) + len(piece)))
            ids.extend(piece)
        ids.append(eot)
        return ids, spans

    @torch.no_grad()
    def encode_words(self, sentences: list[list[str]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pooled embedding (N×D) and per-word states (list of W×D), all normalized."""
        model = self.model
        if not hasattr(model, "token_embedding"):  # e.g. HF text towers: no token states
            pooled = self.encode_texts([" ".join(s) for s in sentences])
            words = [self.encode_texts(s) if s else pooled.new_zeros(0, pooled.shape[1])
                     for s in sentences]
            return pooled, words
        batch = torch.zeros(len(sentences), self.context_length, dtype=torch.long)
        all_spans, eot_pos = [], []
        for i, sent in enumerate(sentences):
            ids, spans = self._word_tokens(sent)
            batch[i, : len(ids)] = torch.tensor(ids)
            all_spans.append(spans)
            eot_pos.append(len(ids) - 1)
        batch = batch.to(self.device)
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(batch).to(cast) + model.positional_embedding.to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        proj = model.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        x = F.normalize(x.float(), dim=-1)
        pooled = x[torch.arange(len(sentences)), torch.tensor(eot_pos)]
        words = []
        for i, spans in enumerate(all_spans):
            states = [x[i, a:b].mean(0) if b > a else pooled[i] for a, b in spans]
            words.append(F.normalize(torch.stack(states), dim=-1) if states
                         else x.new_zeros(0, x.shape[-1]))
        return pooled, words


# --------------------------------------------------------------------------------------
# Pre-training the embedded tiny teacher on the synthetic world's broad caption corpus.


@dataclass
class TeacherPretrainConfig:
    steps: int = 900
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 50
    region_fraction: float = 0.5  # share of each batch that is (region crop, region caption)
    seed: int = 0


def _load_corpus(path: Path, size: int) -> tuple[torch.Tensor, list[str], list[list[str]]]:
    """Every region crop (uint8, size×size) with its caption, and every whole image with its
    captions, decoded and resized once: the corpus is fixed, so steps only index into it."""
    table = pq.read_table(path)
    crops, crop_caps, images, image_caps = [], [], [], []
    for png, boxes, region_caps, caps in zip(
            table.column("image_png").to_pylist(), table.column("boxes").to_pylist(),
            table.column("region_captions").to_pylist(), table.column("captions").to_pylist(),
            strict=True):
        with Image.open(io.BytesIO(png)) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        img = img.float() / 255
        h, w = img.shape[1:]
        all_boxes = torch.tensor([[0, 0, w, h]] + boxes, dtype=torch.float)
        resized = crop_regions(img, all_boxes, size)
        images.append(resized[0])
        image_caps.append(caps)
        crops.extend(resized[1:])
        crop_caps.extend(region_caps)
    to_u8 = lambda xs: (torch.stack(xs).clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    return to_u8(crops), crop_caps, to_u8(images), image_caps


def pretrain_tiny_teacher(corpus: Path, out_dir: Path, cfg: TeacherPretrainConfig | None = None,
                          *, progress: bool = True) -> Path:
    """Contrastive pre-training with open_clip's own ClipLoss; writes a local-dir folder.

    Written to a temporary folder and renamed, so an interrupted run leaves nothing that a
    later run could mistake for a finished teacher.
    """
    cfg = cfg or TeacherPretrainConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = open_clip.create_model(EMBEDDED_TEACHER)
    tokenizer = open_clip.get_tokenizer(EMBEDDED_TEACHER)
    mean, std = clip_mean_std(model)
    size = clip_image_size(model)
    crops, crop_caps, images, image_caps = _load_corpus(Path(corpus), size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    loss_fn = open_clip.ClipLoss()
    n_region = int(cfg.batch_size * cfg.region_fraction)
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="pretrain teacher", disable=not progress)
    model.train()
    for step in bar:
        ri = rng.integers(len(crops), size=n_region)
        ii = rng.integers(len(images), size=cfg.batch_size - n_region)
        pixels = torch.cat([crops[ri], images[ii]]).float() / 255
        texts = [crop_caps[k] for k in ri] + [
            image_caps[k][rng.integers(len(image_caps[k]))] for k in ii]
        pixels = (pixels - mean) / std
        img, txt, scale = model(pixels, tokenizer(texts))
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model_cfg = json.loads((CONFIG_DIR / f"{EMBEDDED_TEACHER}.json").read_text())
        (tmp / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=2))
        torch.save(model.state_dict(), tmp / "open_clip_pytorch_model.bin")
        (tmp / "pretrain.json").write_text(json.dumps(
            {"config": asdict(cfg), "corpus": str(corpus),
             "seconds": round(time.time() - start, 1), "final_loss": float(loss.item())},
            indent=2))
    return out_dir


def embedded_teacher_spec(folder: Path) -> TeacherSpec:
    return TeacherSpec(model=f"local-dir:{Path(folder).resolve()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cliptd.teacher")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pre-train the embedded tiny CLIP on a caption corpus")
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=TeacherPretrainConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = pretrain_tiny_teacher(args.corpus, args.out,
                                TeacherPretrainConfig(steps=args.steps, seed=args.seed))
    print(f"teacher written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
