"""What a sweep on the real datasets costs: measured per-sample work of real-size models, and
the sweep arithmetic that turns it into GPU-hours (docs/scaling.md quotes its output).

    .venv/bin/python bench/scaling.py --out bench/results/scaling.json

For each task it builds the real-size student (``student-visualbert-resnet``: VisualBERT-base,
12 layers, 768 wide, over ResNet-50 region features at 448 px) and a real-size teacher
(open_clip ``ViT-B-32`` architecture, random weights: FLOPs and time do not depend on the
values), feeds them one batch shaped like the real data (VCR: 8 text rows per question, 4
answers and 4 rationales, sharing one image; SNLI-VE and VQA: one row per instance), and
measures per instance

- FLOPs of a training step (forward + backward) and of an evaluation forward, counted by
  ``torch.utils.flop_counter.FlopCounterMode``;
- seconds on this machine's CPU (2 cores), for a training step and for the teacher;
- the teacher-cache FLOPs (every region crop and every text through CLIP, once per dataset).

Then it adds up a sweep from a tune space's budget (ASHA's expected epochs per search, the
seed re-runs, an evaluation of the eval split per epoch, the teacher cache once) and converts
FLOPs to GPU-hours at an *assumed* sustained throughput (``--gpu-tflops`` × ``--mfu``): the
FLOPs are measured, the GPU speed is an assumption, printed as such.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from cliptd.sweep.space import shipped_spaces

# Real dataset sizes (train instances, eval instances), from the datasets' papers / files.
DATASETS = {
    "vcr": {"train": 212_923, "eval": 26_534, "eval_split": "val"},
    "snli_ve": {"train": 529_527, "eval": 17_858, "eval_split": "dev"},
    "vqa": {"train": 443_757, "eval": 214_354, "eval_split": "val"},
}
# Shapes of one instance: text rows, tokens per row, regions per image (incl. the whole
# image). VCR: its own boxes (about 10 objects per image); SNLI-VE / VQA: 36 detector boxes,
# the usual bottom-up setting, given through cliptd's box files.
SHAPES = {
    "vcr": {"rows": 8, "tokens": 64, "regions": 11, "head": ("multiple_choice", 1)},
    "snli_ve": {"rows": 1, "tokens": 32, "regions": 37, "head": ("classify", 3)},
    "vqa": {"rows": 1, "tokens": 24, "regions": 37, "head": ("vqa", 3129)},
}
TEACHER_WORDS = {"vcr": 40, "snli_ve": 20, "vqa": 12}  # words per text the teacher encodes


def student_batch(task: str, n: int, image_size: int, vocab: int) -> dict:
    s = SHAPES[task]
    rows, L, R = s["rows"] * n, s["tokens"], s["regions"]
    g = torch.Generator().manual_seed(0)
    x1y1 = torch.rand(n, R, 2, generator=g) * image_size * 0.6
    wh = torch.rand(n, R, 2, generator=g) * image_size * 0.3 + 16
    boxes = torch.cat([x1y1, x1y1 + wh], -1)
    boxes[:, 0] = torch.tensor([0, 0, image_size, image_size])
    token_regions = torch.full((rows, L), -1)
    token_regions[:, 3:6] = torch.randint(0, R, (rows, 3), generator=g)
    return {"images": torch.rand(n, 3, image_size, image_size, generator=g), "boxes": boxes,
            "region_mask": torch.ones(n, R, dtype=torch.bool),
            "input_ids": torch.randint(5, vocab, (rows, L), generator=g),
            "attention_mask": torch.ones(rows, L, dtype=torch.long),
            "token_regions": token_regions,
            "image_index": torch.arange(n).repeat_interleave(s["rows"]),
            "num_candidates": 4 if task == "vcr" else 1}


def measure_student(task: str, n: int, repeats: int) -> dict:
    from cliptd.model.config import StudentConfig
    from cliptd.model.student import VLStudent

    head, outputs = SHAPES[task]["head"]
    cfg = StudentConfig.from_name("visualbert-resnet", vocab_size=30_522, task_head=head,
                                  num_outputs=outputs)
    model = VLStudent(cfg)
    batch = student_batch(task, n, cfg.image_size, cfg.vocab_size)

    def step():
        out = model(batch)
        model.scores(out, batch["num_candidates"]).float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    model.train()
    with FlopCounterMode(display=False) as fc:
        step()
    train_flops = fc.get_total_flops() / n
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(batch)
    eval_flops = fc.get_total_flops() / n
    model.train()
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    train_s = (time.perf_counter() - t) / repeats / n
    return {"params": sum(p.numel() for p in model.parameters()), "batch": n,
            "train_flops": train_flops, "eval_flops": eval_flops, "train_cpu_s": train_s}


def measure_teacher(task: str, n: int) -> dict:
    import open_clip

    from cliptd.teacher.clip import crop_regions

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval().requires_grad_(False)
    s = SHAPES[task]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 448, 448, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 448.0, 448.0]] * s["regions"])
    texts = torch.randint(1, 49_000, (s["rows"], TEACHER_WORDS[task] + 2), generator=g)
    texts = torch.nn.functional.pad(texts, (0, 77 - texts.shape[1]))

    def images():
        for _ in range(n):
            model.encode_image(crop_regions(image, boxes, 224))

    def encode():
        images()
        for _ in range(n):
            model.encode_text(texts)

    with torch.no_grad(), FlopCounterMode(display=False) as fc_image:
        images()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        encode()
    t = time.perf_counter()
    with torch.no_grad():
        encode()
    return {"params": sum(p.numel() for p in model.parameters()),
            "flops": fc.get_total_flops() / n,
            # the image tower alone: what clip_features runs in every step and at inference
            "image_flops": fc_image.get_total_flops() / n,
            "cpu_s": (time.perf_counter() - t) / n}


def jpeg_decode_ms(repeats: int = 50) -> float:
    """Decoding one photo-sized JPEG (1280×720) and resizing it to the student's 448 px, on
    one core: what data loading costs per image."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # smooth noise compresses like a photo (about 580 KiB at quality 90); white noise would not
    pixels = (np.cumsum(rng.normal(size=(720, 1280, 3)), axis=1) % 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    t = time.perf_counter()
    for _ in range(repeats):
        with Image.open(io.BytesIO(data)) as im:
            np.asarray(im.convert("RGB").resize((448, 448), Image.BILINEAR))
    return 1000 * (time.perf_counter() - t) / repeats


def asha_epochs(num_samples: int, max_t: int, grace: int, rf: int) -> float:
    """Expected trial-epochs of one ASHA search: every trial reaches the grace period, then a
    1/rf share of them climbs each rung (grace, grace·rf, ...) up to max_t."""
    rungs, r = [], grace
    while r < max_t:
        rungs.append(r)
        r *= rf
    total, survivors, reached = 0.0, float(num_samples), 0
    for rung in rungs:
        total += survivors * (rung - reached)
        reached, survivors = rung, survivors / rf
    return total + survivors * (max_t - reached)


def sweep_cost(task: str, space: dict, budget: str, student: dict, teacher: dict,
               shots: list[float]) -> dict:
    b = space["budgets"][budget]
    methods = space["methods"]
    presets = space["conditions"]["presets"]
    epochs, seeds = b["epochs"], b["seeds"]
    search_epochs = asha_epochs(b["num_samples"], epochs, b.get("grace_period", 1),
                                b.get("reduction_factor", 4))
    seed_epochs = (seeds - 1) * epochs  # the search's best trial is seed 0
    batch = space.get("fixed", {}).get("batch_size", 32)
    data = DATASETS[task]
    rows, flops = [], 0.0
    # clip_features runs the frozen CLIP image tower forward on every instance, in training
    # and evaluation alike (no backward through it); the other methods cost the student only
    per_method_train = [student["train_flops"] + (teacher["image_flops"] if m ==
                        "clip_features" else 0) for m in methods]
    per_method_eval = [student["eval_flops"] + (teacher["image_flops"] if m ==
                       "clip_features" else 0) for m in methods]
    for s in shots:
        per_epoch_train = max(s * data["train"], b.get("min_steps", 0) / epochs * batch)
        trial_epochs = (search_epochs + seed_epochs) * len(methods) * len(presets)
        per_method_epochs = (search_epochs + seed_epochs) * len(presets)
        train = per_method_epochs * per_epoch_train * sum(per_method_train)
        limit = b.get("eval_limit") or data["eval"]
        eval_ = per_method_epochs * min(limit, data["eval"]) * sum(per_method_eval)
        rows.append({"shots": s, "trial_epochs": trial_epochs, "train_flops": train,
                     "eval_flops": eval_})
        flops += train + eval_
    cache = data["train"] * teacher["flops"]
    return {"budget": budget, "methods": methods, "search_epochs_per_search": search_epochs,
            "per_shot": rows, "student_flops": flops, "teacher_cache_flops": cache}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="vcr,snli_ve,vqa")
    parser.add_argument("--batch", type=int, default=2, help="instances per measured batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget", default="full")
    parser.add_argument("--shots", default="0.05,0.25,1.0")
    parser.add_argument("--gpu-tflops", type=float, default=125.0,
                        help="ASSUMED peak dense bf16 TFLOPS of one GPU (125 is the "
                             "figure NVIDIA gives for the A10; use your GPU's)")
    parser.add_argument("--mfu", type=float, default=0.3,
                        help="ASSUMED share of peak a small-batch VL fine-tune sustains")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    shots = [float(s) for s in args.shots.split(",")]
    sustained = args.gpu_tflops * 1e12 * args.mfu
    report = {"assumed_gpu_tflops": args.gpu_tflops, "assumed_mfu": args.mfu,
              "jpeg_decode_ms": jpeg_decode_ms(), "tasks": {}}
    print(f"JPEG 1280×720 decode + resize to 448 px: {report['jpeg_decode_ms']:.1f} ms per "
          "image on one core")
    for task in args.tasks.split(","):
        student = measure_student(task, args.batch, args.repeats)
        teacher = measure_teacher(task, args.batch)
        space = yaml.safe_load(shipped_spaces()[task].read_text())
        cost = sweep_cost(task, space, args.budget, student, teacher, shots)
        gpu_h = {f"shots={r['shots']}": (r["train_flops"] + r["eval_flops"]) / sustained / 3600
                 for r in cost["per_shot"]}
        gpu_h["teacher_cache"] = cost["teacher_cache_flops"] / sustained / 3600
        report["tasks"][task] = {"student": student, "teacher": teacher, "sweep": cost,
                                 "gpu_hours": gpu_h}
        print(f"{task}: student {student['params'] / 1e6:.0f} M params, "
              f"{student['train_flops'] / 1e9:.0f} GFLOP/instance train, "
              f"{student['eval_flops'] / 1e9:.0f} eval, {student['train_cpu_s']:.2f} s/instance "
              f"train on this CPU; teacher {teacher['flops'] / 1e9:.0f} GFLOP/instance "
              f"({teacher['cpu_s']:.2f} s on CPU); sweep ({args.budget}: "
              f"{', '.join(space['methods'])}): " +
              ", ".join(f"{k} {v:.1f} GPU-h" for k, v in gpu_h.items()), flush=True)
        if not math.isfinite(student["train_flops"]):
            raise SystemExit("flop count failed")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
