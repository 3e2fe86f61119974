"""The frozen CLIP teacher: any open_clip model, or the embedded tiny one pre-trained here.

The teacher only ever runs to fill the teacher cache (``cliptd.teacher.cache``) or, in the
benchmark, live beside the student; it is never part of a trained or exported student.

    python -m cliptd.teacher pretrain --corpus world/corpus/teacher.parquet --out DIR

Real teachers: ``TeacherSpec(model="ViT-B-32", pretrained="openai")`` (needs the weights in
open_clip's cache or network) or ``pretrained=/path/to/open_clip_pytorch_model.bin``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# Shipped inside the package (the wheel holds them too), read through importlib.resources.
CONFIG_DIR = resources.files("cliptd") / "model_configs"


EMBEDDED_TEACHER = "cliptd-tiny"


# open_clip reads a registered file at once and keeps its config when the file goes, so a
# temporary copy (a package not on a file system) registers as well as the file itself.
with resources.as_file(CONFIG_DIR / f"{EMBEDDED_TEACHER}.json") as _path:
    open_clip.add_model_config(_path)


@dataclass(frozen=True)
class TeacherSpec:
    """Which CLIP to distil from. ``model`` is an open_clip name or ``local-dir:<folder>``."""

    model: str = EMBEDDED_TEACHER
    pretrained: str | None = None

    def describe(self) -> str:
        return f"{self.model}:{self.pretrained or 'none'}"

    @classmethod
    def parse(cls, text: str) -> TeacherSpec:
        """``MODEL[:PRETRAINED]`` as the commands take it: an open_clip architecture by its
        name (``ViT-B-32``), and a pretrained tag in open_clip's cache (``openai``) or a
        local weights file; ``local-dir:<folder>`` names a saved open_clip folder."""
        if text.startswith("local-dir:"):
            return cls(model=text)
        model, _, pretrained = text.partition(":")
        return cls(model=model, pretrained=pretrained or None)

    def check(self) -> None:
        """Refuse, before anything loads, an open_clip name that does not exist, a weights
        file that is not there, or one holding another architecture's weights."""
        if self.model.startswith("local-dir:"):
            folder = Path(self.model.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").exists():
                raise ValueError(f"{folder}: not an open_clip folder (no open_clip_config.json)")
            return
        if self.model not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if m.lower() == self.model.lower()]
            raise ValueError(f"unknown open_clip model {self.model!r}"
                             + (f" (names are case-sensitive: {close[0]!r}?)" if close else
                                "; see open_clip.list_models()"))
        if not self.pretrained:
            return
        path = Path(self.pretrained)
        if self.pretrained in open_clip.list_pretrained_tags_by_model(self.model):
            return  # a tag: its weights must be in open_clip's cache (no download here)
        if not path.exists():
            tags = open_clip.list_pretrained_tags_by_model(self.model)
            raise ValueError(f"{self.pretrained}: no such weights file, and not a pretrained "
                             f"tag of {self.model} ({', '.join(tags) or 'none'})")
        check_weights(self.model, path)


def check_weights(model_name: str, path: Path) -> None:
    """The weights file holds ``model_name``'s tensors, each of the right shape (open_clip
    itself would fail on some with a bare AssertionError, or resize others silently)."""
    import copy

    from open_clip.coca_model import CoCa
    from open_clip.factory import load_state_dict
    from open_clip.model import CLIP, CustomTextCLIP

    # the architecture's tensors, built on the meta device: shapes only, no memory, no time
    cfg = copy.deepcopy(open_clip.get_model_config(model_name))
    text, vision = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    if text.get("hf_model_name"):
        text["hf_model_pretrained"] = False
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or bool(text.get("hf_model_name"))
    cls = (CoCa if "multimodal_cfg" in cfg else CustomTextCLIP) if custom else CLIP
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(**cfg).state_dict().items()}
    try:
        got = {k: tuple(v.shape) for k, v in load_state_dict(str(path)).items()}
    except Exception as exc:  # noqa: BLE001 - anything unreadable is not a weights file
        raise ValueError(f"{path}: not a readable weights file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    missing = sorted(set(expected) - set(got))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or wrong:
        detail = (f"{wrong[0]} is {got[wrong[0]]}, {model_name} needs {expected[wrong[0]]}"
                  if wrong else f"no {missing[0]}")
        raise ValueError(f"{path}: not {model_name} weights ({len(wrong)} tensor(s) of "
                         f"another shape, {len(missing)} missing; e.g. {detail})")


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


def embedded_teacher_spec(folder: Path) -> TeacherSpec:
    return TeacherSpec(model=f"local-dir:{Path(folder).resolve()}")
