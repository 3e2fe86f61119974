"""Is the GPU fed? The training loader's throughput with 0, 1 and N DataLoader workers,
beside what one training step consumes at the modelled GPU speed of docs/scaling.md.

    .venv/bin/python bench/loader.py [--images 192] [--workers 0,1,2] [--out loader.json]

Writes ``--images`` photo-sized JPEGs (1280×720, noisy gradients: ~0.5 MB each, like the
580 KiB photo of docs/scaling.md) and reads them through exactly what the fine-tuning loop
runs: ``torch.utils.data.DataLoader`` over SNLI-VE-shaped problems (one 32-word hypothesis,
37 regions: the image-heaviest task) with ``cliptd.data.problems.Collator`` (JPEG decode,
resize to the real student's 448 px, tokenizing, boxes), the image cache off so every image
is decoded, as on a dataset far larger than the cache. Images/s are timed from the first
batch to the last (worker start-up excluded) and the best of ``--repeats`` passes kept.

The consumption side is modelled as docs/scaling.md models it: a training instance costs
the student's measured step FLOPs (VCR 406, SNLI-VE 171, VQA 167 GFLOP), a GPU sustains
its dense bf16 peak × MFU 0.3; one image per instance (VCR's Q→A and QA→R share theirs).
The cores one GPU needs are its images/s over the one-worker images/s; the cluster files
give each GPU the CPUs of its node type.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from cliptd.data.problems import Collator, ImageStore, Problem
from cliptd.model.tokenizers import build_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
STEP_GFLOP = {"vcr": 406, "snli_ve": 171, "vqa": 167}  # docs/scaling.md, measured
# dense bf16 peaks (NVIDIA): A10G as docs/scaling.md assumes it (the A10's 125), H100 SXM
GPUS = {"A10G": 125.0, "H100": 989.0}
MFU = 0.3
WORDS = ("a man woman dog cat is are sitting standing next to the table car red blue "
         "holding looking at near with two three people outside inside").split()


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:720, 0:1280]
    paths = []
    for i in range(n):
        base = np.stack([(xx * (1 + i % 5) / 1280 * 255), (yy / 720 * 255),
                         ((xx + yy) % 256)], -1)
        img = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(img).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def make_problems(paths: list[str], seed: int = 0) -> list[Problem]:
    rng = np.random.default_rng(seed)
    out = []
    for i, path in enumerate(paths):
        boxes = np.concatenate([[[0, 0, 1280, 720]], np.sort(
            rng.uniform(0, 700, (36, 4)), axis=1)]).astype(np.float32)
        words = list(rng.choice(WORDS, 32))
        out.append(Problem(key=f"{i}:main", id=str(i), head="main", image=path, width=1280,
                           height=720, boxes=boxes, query=words, query_regions=[-1] * 32,
                           candidates=[], label=int(rng.integers(3))))
    return out


def throughput(problems, collate, workers: int, batch: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        loader = DataLoader(problems, batch_size=batch, shuffle=False, collate_fn=collate,
                            num_workers=workers)
        it = iter(loader)
        first = next(it)  # worker start-up and the first batch: not timed
        start, n = time.perf_counter(), 0
        for b in it:
            n += len(b["keys"])
        best = max(best, n / (time.perf_counter() - start))
        del first
    return best


def cluster_cpus_per_gpu() -> dict[str, float]:
    out = {}
    for name in ("gpu.yaml", "local.yaml"):
        cfg = yaml.safe_load((REPO / "clusters" / name).read_text())
        for t, spec in (cfg.get("available_node_types") or {}).items():
            res = spec.get("resources") or {}
            if res.get("GPU"):
                out[f"{name}:{t} ({spec['node_config'].get('InstanceType', '')})"] = \
                    res["CPU"] / res["GPU"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--workers", default=f"0,1,{os.cpu_count()}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=448, help="the student's image size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images)
        mb = np.mean([os.path.getsize(x) for x in paths]) / 2**20
        problems = make_problems(paths)
        collate = Collator(build_word_tokenizer(WORDS), ImageStore(args.size, capacity=0),
                           max_length=64, uint8_images=True)  # as the loop's loader
        rates = {int(w): throughput(problems, collate, int(w), args.batch, args.repeats)
                 for w in args.workers.split(",")}
    per_core = rates.get(1) or rates[min(rates)]
    print(f"loader: {args.images} JPEGs 1280×720 ({mb:.2f} MiB each) → {args.size} px, "
          f"SNLI-VE-shaped batches of {args.batch}, {os.cpu_count()} CPU cores here")
    for w, r in rates.items():
        print(f"  {w} loader worker(s){' (in the training process)' if w == 0 else ''}: "
              f"{r:7.1f} images/s")
    need = {}
    print(f"one GPU consumes (dense bf16 peak × MFU {MFU}, one image per instance):")
    for gpu, peak in GPUS.items():
        for task, gflop in STEP_GFLOP.items():
            ips = peak * MFU * 1e3 / gflop
            need[f"{gpu}/{task}"] = {"images_per_s": round(ips, 1),
                                     "cores": round(ips / per_core, 2)}
            print(f"  {gpu:5s} {task:8s}: {ips:7.1f} images/s = {ips / per_core:5.2f} cores "
                  f"of loader workers at {per_core:.1f} images/s per worker")
    cpus = cluster_cpus_per_gpu()
    for node, c in cpus.items():
        print(f"  the cluster files give {c:g} CPUs per GPU: {node}")
    if args.out:
        args.out.write_text(json.dumps({"images": args.images, "mib_per_image": mb,
                                        "size": args.size, "images_per_s": rates,
                                        "per_worker_images_per_s": per_core,
                                        "gpu_needs": need, "cluster_cpus_per_gpu": cpus},
                                       indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
