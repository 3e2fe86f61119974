"""Pre-training the embedded tiny CLIP teacher on the synthetic world's broad caption corpus, with open_clip's own ``ClipLoss``."""

from __future__ import annotations

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
from PIL import Image
from tqdm.auto import tqdm

from cliptd.core.atomic import atomic_dir
from cliptd.core.schedule import lr_scheduler, warmup_cosine
from cliptd.teacher.clip import (
    CONFIG_DIR,
    EMBEDDED_TEACHER,
    clip_image_size,
    clip_mean_std,
    crop_regions,
)


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
    sched = lr_scheduler(opt, warmup_cosine(cfg.warmup, cfg.steps))
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
