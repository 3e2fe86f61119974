"""Throughput and memory of ``cliptd.data.prepare`` on a VCR-sized file, and of the reader.

    .venv/bin/python bench/data_throughput.py [--lines 100000] [--per-image 4] [--no-tracemalloc]

Generates ``--lines`` VCR-format lines (4 answers, 4 rationales, object references, about
VCR's real token lengths) with one metadata JSON and one tiny JPEG per image in a temp dir,
then times ``prepare`` (lines/s, peak RSS; optionally the Python-heap peak under
tracemalloc, in a second run since tracemalloc slows Python down) and ``iter_batches``
(rows/s as Arrow batches and as Python dicts).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

from PIL import Image

from cliptd.data.prepare import iter_batches, load_manifest, prepare

WORDS = "the a is are to of and in on at with for from his her their looking holding table door car".split()
CLASSES = ["person", "person", "person", "chair", "cup", "dog", "car", "bottle", "wine glass", "tie"]


def generate(root: Path, lines: int, per_image: int, seed: int = 0) -> None:
    """Write train.jsonl and vcr1images/ (one metadata JSON + one JPEG per image)."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (120, 60, 30)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    images = root / "vcr1images"

    def sentence(n_objects: int, length: int) -> list:
        toks: list = [rng.choice(WORDS) for _ in range(length)]
        for _ in range(rng.randint(1, 3)):
            k = rng.randint(1, min(3, n_objects))
            toks.insert(rng.randrange(len(toks)), sorted(rng.sample(range(n_objects), k)))
        return toks + ["."]

    with open(root / "train.jsonl", "w") as f:
        for i in range(lines):
            img_no = i // per_image
            movie = f"movie_{img_no // 50:04d}"
            img_fn = f"{movie}/shot_{img_no:07d}.jpg"
            n_obj = 3 + img_no % 8
            objects = [CLASSES[(img_no + j) % len(CLASSES)] for j in range(n_obj)]
            if i % per_image == 0:
                (images / movie).mkdir(parents=True, exist_ok=True)
                (images / img_fn).write_bytes(jpeg)
                boxes = []
                for _ in objects:
                    x1, y1 = rng.uniform(0, 1500), rng.uniform(0, 800)
                    boxes.append([x1, y1, x1 + rng.uniform(10, 400), y1 + rng.uniform(10, 270), rng.random()])
                meta = {"boxes": boxes, "segms": [[[[0, 0], [1, 1], [2, 0]]]] * n_obj,
                        "names": objects, "width": 1920, "height": 1080}  # fmt: skip
                (images / img_fn.replace(".jpg", ".json")).write_text(json.dumps(meta))
            rec = {
                "movie": movie, "objects": objects, "img_fn": img_fn,
                "metadata_fn": img_fn.replace(".jpg", ".json"),
                "question": ["Why", "is"] + sentence(n_obj, 6)[:-1] + ["?"],
                "answer_choices": [sentence(n_obj, 7) for _ in range(4)],
                "answer_label": rng.randrange(4),
                "rationale_choices": [sentence(n_obj, 15) for _ in range(4)],
                "rationale_label": rng.randrange(4),
                "img_id": f"train-{img_no}", "question_number": i % per_image,
                "annot_id": f"train-{i}", "answer_likelihood": "likely", "match_fold": "train-0",
            }  # fmt: skip
            f.write(json.dumps(rec) + "\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--per-image", type=int, default=4, help="questions per image (VCR: ~2.6)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--no-tracemalloc", action="store_true")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()
    figures: dict = {"lines": args.lines}

    with tempfile.TemporaryDirectory(prefix="cliptd-bench-") as tmp:
        src = Path(tmp) / "vcr"
        src.mkdir()
        t0 = time.perf_counter()
        generate(src, args.lines, args.per_image)
        size = (src / "train.jsonl").stat().st_size / 2**20
        print(f"generated {args.lines} lines ({size:.0f} MiB jsonl, {args.lines // args.per_image} images) "
              f"in {time.perf_counter() - t0:.1f} s; peak RSS so far {peak_rss_mib():.0f} MiB")  # fmt: skip

        out = Path(tmp) / "prepared"
        t0 = time.perf_counter()
        prepare("vcr", src, out, progress=False)
        dt = time.perf_counter() - t0
        print(f"prepare: {args.lines / dt:,.0f} lines/s ({dt:.1f} s); peak RSS {peak_rss_mib():.0f} MiB")
        figures.update(prepare_lines_per_s=args.lines / dt, prepare_peak_rss_mib=peak_rss_mib())

        if not args.no_tracemalloc:
            tracemalloc.start()
            prepare("vcr", src, Path(tmp) / "prepared2", progress=False)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            print(f"prepare under tracemalloc: Python-heap peak {peak / 2**20:.1f} MiB")

        n_rows = load_manifest(out)["counts"]["train"]
        t0 = time.perf_counter()
        n = sum(b.num_rows for b in iter_batches(out, "train", args.batch_size))
        dt = time.perf_counter() - t0
        assert n == n_rows
        print(f"iter_batches(batch_size={args.batch_size}): {n / dt:,.0f} rows/s as Arrow batches")
        figures["reader_arrow_rows_per_s"] = n / dt
        t0 = time.perf_counter()
        n = sum(len(b.to_pylist()) for b in iter_batches(out, "train", args.batch_size))
        dt = time.perf_counter() - t0
        print(f"iter_batches + to_pylist: {n / dt:,.0f} rows/s as Python dicts")
        figures["reader_dict_rows_per_s"] = n / dt
        shards = sorted((out / "train").glob("*.parquet"))
        print(f"output: {len(shards)} shards, {sum(p.stat().st_size for p in shards) / 2**20:.0f} MiB; "
              f"final peak RSS {peak_rss_mib():.0f} MiB")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
