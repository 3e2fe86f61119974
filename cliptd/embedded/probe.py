"""What the embedded world's teacher and student know before any fine-tuning.

``python -m cliptd.bench probe`` (issue: a world where CLIP knows what the student does
not). Two measurements, per domain:

- **linear probes** on frozen features: the teacher's region-crop embeddings (what the
  teacher cache holds) and the pre-trained student's region features (its region encoder's
  output, what its encoder sees), each region labelled with the attributes the questions
  ask about — colour, shape and size (read off the region captions of the teacher's broad
  corpus, which covers both domains), horizontal position (left / middle / right third of
  the image, by the box centre) — and, on the whole-image region, the object count. A
  logistic regression is fitted on 70 % of the images and scored on the other 30 %;
  ``chance`` is the majority class of the scored part. A *few-shot* probe fits on
  ``FEW_SHOT`` regions per class (mean of ``FEW_SHOT_DRAWS`` draws), what a low-shot
  fine-tuning run has to learn from; the row ``colour (student-unseen)`` scores the colour
  probes on the regions of the colours the student's corpus never showed.
- **teacher zero-shot** accuracy per question type and domain on the VCR problems of the
  train and eval splits: the teacher's softmax over the 4 candidates
  (``cliptd.teacher.cache.compute_targets``), as dynamic weighting sees it.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

ATTRIBUTES = ("colour", "shape", "size", "position", "count")
FEW_SHOT, FEW_SHOT_DRAWS = 5, 5


def _features(world, n_images: int, seed: int) -> dict:
    """Per region: teacher embedding, student feature, attribute labels, domain, image."""
    from cliptd.data.corpus import region_attributes
    from cliptd.model.student import load_student
    from cliptd.synthetic.corpus import attribute_groups
    from cliptd.teacher.clip import Teacher

    groups = attribute_groups()  # colours, shapes, sizes
    teacher = Teacher.load(world.teacher)
    student, _ = load_student(world.student)
    student.eval()
    size = student.cfg.image_size
    table = pq.read_table(world.synthetic / "corpus" / "teacher.parquet")
    order = np.random.default_rng(seed).permutation(table.num_rows)[:n_images]
    out = defaultdict(list)
    with torch.no_grad():
        for img_i, row in enumerate(table.take(order).to_pylist()):
            with Image.open(io.BytesIO(row["image_png"])) as im:
                rgb = im.convert("RGB")
                full = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255
                small = torch.from_numpy(np.asarray(rgb.resize((size, size), Image.BILINEAR))
                                         .copy()).permute(2, 0, 1).float() / 255
            w, h = row["width"], row["height"]
            boxes = torch.tensor([[0, 0, w, h]] + row["boxes"], dtype=torch.float)
            t_emb = teacher.encode_regions(full, boxes).float()
            scale = torch.tensor([size / w, size / h] * 2)
            s_feat = student.region_features(small[None], (boxes * scale)[None])[0].float()
            labels = [region_attributes(c, groups) for c in row["region_captions"]]
            for r, (lab, box) in enumerate(zip(labels, row["boxes"], strict=True), start=1):
                centre = (box[0] + box[2]) / 2 / w
                out["region_teacher"].append(t_emb[r].numpy())
                out["region_student"].append(s_feat[r].numpy())
                out["region_labels"].append(lab + [min(2, int(centre * 3))])
                out["region_domain"].append(row["domain"])
                out["region_image"].append(img_i)
            out["image_teacher"].append(t_emb[0].numpy())
            out["image_student"].append(s_feat[0].numpy())
            out["image_count"].append(len(row["boxes"]))
            out["image_domain"].append(row["domain"])
    return {k: np.asarray(v) for k, v in out.items()}


def linear_probe(x_train, y_train, x_test, y_test, steps: int = 300, seed: int = 0,
                 score: np.ndarray | None = None) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features
    (on the test rows ``score`` selects, all by default)."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.tensor((x_train - mean) / std, dtype=torch.float)
    xs = torch.tensor((x_test - mean) / std, dtype=torch.float)
    classes = np.unique(np.concatenate([y_train, y_test]))
    index = {c: i for i, c in enumerate(classes)}
    yt = torch.tensor([index[c] for c in y_train])
    ys = torch.tensor([index[c] for c in y_test])
    model = torch.nn.Linear(xt.shape[1], len(classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        hit = (model(xs).argmax(-1) == ys).numpy()
    return float(hit[score].mean() if score is not None else hit.mean())


def few_shot_rows(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` rows per class of ``y`` (all of a class that has fewer)."""
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)])


def probes(world, n_images: int = 600, seed: int = 0) -> list[dict]:
    """One row per (attribute, domain): teacher and student probe accuracy (fitted on all
    the fitting images, and few-shot) and chance."""
    from cliptd.synthetic.corpus import attribute_groups
    from cliptd.synthetic.scene import STUDENT_UNSEEN

    unseen = [attribute_groups()[0].index(c) for c in STUDENT_UNSEEN]
    f = _features(world, n_images, seed)
    rng = np.random.default_rng(seed)
    test_images = set(rng.permutation(len(f["image_domain"]))[: int(0.3 * len(
        f["image_domain"]))].tolist())
    rows = []
    for domain in sorted(set(f["image_domain"])):
        for a, attr in enumerate(ATTRIBUTES):
            if attr == "count":
                keep = f["image_domain"] == domain
                images = np.arange(len(f["image_domain"]))
                y, feats = f["image_count"], {m: f[f"image_{m}"] for m in ("teacher", "student")}
            else:
                keep = (f["region_domain"] == domain) & (f["region_labels"][:, a] >= 0)
                images = f["region_image"]
                y = f["region_labels"][:, a]
                feats = {m: f[f"region_{m}"] for m in ("teacher", "student")}
            test = np.array([i in test_images for i in images]) & keep
            train = ~np.array([i in test_images for i in images]) & keep
            if test.sum() < 5 or len(np.unique(y[train])) < 2:
                continue
            subsets = {attr: None}
            if attr == "colour":  # the same probes, scored on the colours the student lacks
                subsets["colour (student-unseen)"] = np.isin(y[test], unseen)
            fit = np.flatnonzero(train)
            shots = [fit[few_shot_rows(y[fit], FEW_SHOT, np.random.default_rng([seed, d]))]
                     for d in range(FEW_SHOT_DRAWS)]
            for name, score in subsets.items():
                scored = y[test] if score is None else y[test][score]
                if len(scored) < 5:  # too few regions of it to score (a tiny world)
                    continue
                row = {"attribute": name, "domain": domain, "n_train": int(train.sum()),
                       "n_test": len(scored),
                       "chance": float(np.bincount(scored).max() / len(scored))}
                for m, x in feats.items():
                    row[m] = linear_probe(x[train], y[train], x[test], y[test], seed=seed,
                                          score=score)
                    row[f"{m}_few_shot"] = float(np.mean([linear_probe(
                        x[s], y[s], x[test], y[test], seed=seed, score=score) for s in shots]))
                rows.append(row)
    return rows


def zero_shot(world, limit: int = 600) -> list[dict]:
    """Teacher zero-shot accuracy per (split, head, question type, domain) on VCR."""
    from cliptd.data.prepare import load_manifest, read_split
    from cliptd.data.problems import EVAL_SPLIT, problems_from_table
    from cliptd.teacher.cache import compute_targets
    from cliptd.teacher.clip import Teacher

    teacher = Teacher.load(world.teacher)
    data = world.data["vcr"]
    root = Path(load_manifest(data)["image_root"])
    rows = []
    for split in ("train", EVAL_SPLIT["vcr"]):
        problems = [p for p in problems_from_table("vcr", read_split(data, split), root)
                    if p.label >= 0]
        # a seeded sample across the split (its domains and types are in blocks)
        pick = np.random.default_rng(0).permutation(len(problems))[:limit]
        problems = [problems[i] for i in sorted(pick)]
        hits = defaultdict(list)
        for p, r in zip(problems, compute_targets(teacher, "vcr", problems), strict=True):
            hits[(p.head, p.qtype, p.domain)].append(r["correct"])
            hits[(p.head, "all", p.domain)].append(r["correct"])
        rows += [{"split": split, "head": h, "qtype": q, "domain": d, "n": len(v),
                  "teacher_acc": float(np.mean(v))} for (h, q, d), v in sorted(hits.items())]
    return rows


def to_markdown(probe_rows: list[dict], zs_rows: list[dict]) -> str:
    lines = [f"| attribute | domain | teacher probe | student probe | teacher {FEW_SHOT}-shot | "
             f"student {FEW_SHOT}-shot | chance | regions (train / test) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['attribute']} | {r['domain']} | {100 * r['teacher']:.1f} | "
              f"{100 * r['student']:.1f} | {100 * r['teacher_few_shot']:.1f} | "
              f"{100 * r['student_few_shot']:.1f} | {100 * r['chance']:.1f} | "
              f"{r['n_train']} / {r['n_test']} |" for r in probe_rows]
    lines += ["", "| split | head | question type | domain | teacher zero-shot | n |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['split']} | {r['head']} | {r['qtype']} | {r['domain']} | "
              f"{100 * r['teacher_acc']:.1f} | {r['n']} |" for r in zs_rows]
    return "\n".join(lines) + "\n"
