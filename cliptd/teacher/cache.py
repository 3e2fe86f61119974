"""The teacher cache: CLIP runs once per (teacher, dataset version, split), never per trial.

Per problem (``<instance id>:<head>``) it stores, as Parquet shards:
- ``region_emb``: normalized CLIP embeddings of each region crop (region 0 = whole image);
- ``pooled``: CLIP_text(query + gold candidate); ``words``: per-word states of that text;
- ``rel_v``: region relevance cos(region, pooled); ``rel_w``: word relevance
  cos(word state, whole-image embedding) — the targeted-selection scores;
- ``gold_prob`` / ``correct``: the teacher's zero-shot softmax over the candidates
  (VCR: the 4 answers or rationales; SNLI-VE: hypothesis-image agreement mapped onto the 3
  labels; VQA: the most frequent answers of the question type), used by dynamic weighting;
- ``region_conf``: the same zero-shot gold probability from each region's crop alone
  (region 0: the whole image, = ``gold_prob``): how sure the teacher is of the answer
  looking at that region, the per-region weight of ``distill.region_weighting``.

Building is resumable: shards land in ``<key>.partial/`` one by one and a rerun skips the
finished ones; the folder is renamed to ``<key>/`` only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from cliptd.core.atomic import atomic_file
from cliptd.data.problems import Problem
from cliptd.teacher.clip import Teacher, TeacherSpec

CACHE_FORMAT = 2  # 2: region_conf
SHARD = 512  # problems per shard: the unit of resumption
VQA_ZS_CANDIDATES = 30

_f16 = pa.binary()
CACHE_SCHEMA = pa.schema([
    ("key", pa.string()), ("region_emb", _f16), ("n_regions", pa.int32()),
    ("pooled", _f16), ("words", _f16), ("n_words", pa.int32()),
    ("rel_v", pa.list_(pa.float32())), ("rel_w", pa.list_(pa.float32())),
    ("gold_prob", pa.float32()), ("correct", pa.bool_()),
    ("region_conf", pa.list_(pa.float32())),
])


def cache_key(teacher_fingerprint: str, dataset_version: str, split: str, task: str) -> str:
    raw = f"{CACHE_FORMAT}|{teacher_fingerprint}|{dataset_version}|{task}|{split}"
    return f"{task}-{split}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def _load_image(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1) / 255


def _candidate_texts(task: str, p: Problem, vqa_candidates: list[str] | None) -> list[str]:
    if task == "vqa":
        return [" ".join(p.query + a.split()) for a in vqa_candidates]
    if task == "snli_ve":
        return [" ".join(p.query)]
    return [" ".join(p.query + words) for words, _ in p.candidates]


def vqa_candidates_by_qtype(problems: list[Problem], vocab: list[str], k: int) -> dict:
    """The k most frequent vocabulary answers per question type (the zero-shot choices)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for p in problems:
        if p.label >= 0:
            counts[p.qtype][vocab[p.label]] += 1
    return {q: [a for a, _ in c.most_common(k)] for q, c in counts.items()}


@torch.no_grad()
def compute_targets(teacher: Teacher, task: str, problems: list[Problem],
                    vqa_choices: dict | None = None, vocab: list[str] | None = None) -> list[dict]:
    """Teacher targets for a list of problems (also used live, beside the student)."""
    region_cache: dict[tuple, torch.Tensor] = {}
    rows = []
    pooled, words = teacher.encode_words([p.teacher_words() for p in problems])
    for p, t_pooled, t_words in zip(problems, pooled, words, strict=True):
        ident = (p.image, p.boxes.tobytes())
        if ident not in region_cache:
            region_cache[ident] = teacher.encode_regions(_load_image(p.image),
                                                         torch.from_numpy(p.boxes))
        regions = region_cache[ident]
        image_emb = regions[0]
        cands = (vqa_choices or {}).get(p.qtype, vocab[:VQA_ZS_CANDIDATES] if vocab else [])
        texts = _candidate_texts(task, p, cands)
        # every region's similarity to every candidate text; row 0 is the whole image's
        sims = regions @ teacher.encode_texts(texts).T if texts else torch.zeros(len(regions), 0)
        if task == "vqa":
            gold = vocab[p.label] if p.label >= 0 else None
            gi = cands.index(gold) if gold in cands else -1
        else:
            gi = p.label
        probs = _zero_shot(task, sims, teacher.logit_scale)
        conf = probs[:, gi] if gi >= 0 and probs.shape[1] else torch.zeros(len(regions))
        rows.append({
            "key": p.key, "region_emb": regions, "pooled": t_pooled, "words": t_words,
            "rel_v": (regions @ t_pooled), "rel_w": (t_words @ image_emb)
            if len(t_words) else torch.zeros(0), "gold_prob": float(conf[0]),
            "correct": bool(gi >= 0 and probs.shape[1] and int(probs[0].argmax()) == gi),
            "region_conf": conf, "sim": sims,
        })
    if task == "snli_ve" and rows:  # centre the agreement on this dataset's mean similarity
        mean = float(np.mean([float(r["sim"][0, 0]) for r in rows]))
        for r, p in zip(rows, problems, strict=True):
            probs = _zero_shot(task, r["sim"] - mean, teacher.logit_scale)
            r["region_conf"] = probs[:, p.label] if p.label >= 0 else torch.zeros(len(probs))
            r["gold_prob"] = float(r["region_conf"][0])
            r["correct"] = bool(p.label >= 0 and int(probs[0].argmax()) == p.label)
    return rows


def _zero_shot(task: str, sims: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """R×K region-candidate similarities → R×C zero-shot probabilities over the choices.
    SNLI-VE has one hypothesis and three labels: agreement above the dataset's typical
    similarity means entailment, below it contradiction, near it neutral (a
    reconstruction)."""
    if task == "snli_ve":
        s = sims[:, :1]
        sims = torch.cat([s, torch.zeros_like(s), -s], dim=1)
    return (sims * logit_scale).softmax(-1) if sims.shape[1] else sims


def shard_records(teacher: Teacher, task: str, shard: list[Problem], choices, vocab
                  ) -> list[dict]:
    """One shard's cache rows (what a Parquet shard holds)."""
    return [_to_record(r) for r in compute_targets(teacher, task, shard, choices, vocab)]


def ray_pool(spec: TeacherSpec, task: str, actors: int, *, gpus_per_actor: float = 1,
             cpus_per_actor: float = 1):
    """A ``build_cache`` pool on a Ray cluster: ``actors`` copies of the teacher (one per
    GPU), each computing whole shards; the driver writes them as they come back (to the
    cache root, shared storage on a cluster). The weights file a ``spec`` names must be at
    the same path on the actors' nodes."""
    import ray
    from ray.util import ActorPool

    device = "cuda" if gpus_per_actor > 0 else "cpu"

    @ray.remote
    class TeacherActor:
        def __init__(self):
            self.teacher = Teacher.load(spec, device=device)

        def shard(self, n: int, problems: list[Problem], choices, vocab):
            return n, shard_records(self.teacher, task, problems, choices, vocab)

    def run(todo, choices, vocab):
        workers = [TeacherActor.options(num_gpus=gpus_per_actor, num_cpus=cpus_per_actor)
                   .remote() for _ in range(max(1, min(actors, len(todo))))]
        try:
            yield from ActorPool(workers).map_unordered(
                lambda actor, item: actor.shard.remote(*item, choices, vocab), todo)
        finally:
            for w in workers:
                ray.kill(w)

    return run


def _to_record(row: dict) -> dict:
    def f16(t):
        return t.detach().cpu().numpy().astype(np.float16).tobytes()
    return {"key": row["key"], "region_emb": f16(row["region_emb"]),
            "n_regions": len(row["region_emb"]), "pooled": f16(row["pooled"]),
            "words": f16(row["words"]), "n_words": len(row["words"]),
            "rel_v": row["rel_v"].float().tolist(), "rel_w": row["rel_w"].float().tolist(),
            "gold_prob": row["gold_prob"], "correct": row["correct"],
            "region_conf": row["region_conf"].float().tolist()}


def build_cache(teacher: Teacher, task: str, problems: list[Problem], root: Path, key: str, *,
                vocab: list[str] | None = None, progress: bool = True,
                source: dict | None = None, pool=None) -> Path:
    """Compute (or resume computing) the cache for ``problems``; returns its folder.
    ``source``: what the problems are (``data``, ``version``, ``split``), recorded so that a
    run on other data or another split can refuse the cache (``check_cache``). ``pool``:
    computes shards elsewhere (``ray_pool``: one actor per GPU of a cluster); each finished
    shard is written here as it arrives, so an interrupted pass resumes either way."""
    final = Path(root) / key
    if (final / "_SUCCESS").exists():
        return final
    partial = Path(root) / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    labelled = [p for p in problems if p.label >= 0]
    choices = vqa_candidates_by_qtype(labelled, vocab, VQA_ZS_CANDIDATES) if task == "vqa" \
        else None
    if task == "snli_ve":  # the centring needs every problem in one pass
        shards = [labelled]
    else:
        shards = [labelled[i: i + SHARD] for i in range(0, len(labelled), SHARD)]
    bar = tqdm(total=len(labelled), desc=f"teacher cache {task}", disable=not progress)
    todo = []
    for n, shard in enumerate(shards):
        if (partial / f"part-{n:05d}.parquet").exists():  # done by an interrupted pass
            bar.update(len(shard))
        else:
            todo.append((n, shard))
    done = pool(todo, choices, vocab) if pool else (
        (n, shard_records(teacher, task, shard, choices, vocab)) for n, shard in todo)
    for n, rows in done:
        with atomic_file(partial / f"part-{n:05d}.parquet") as tmp:  # whole or not at all
            pq.write_table(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), tmp)
        bar.update(len(rows))
    bar.close()
    (partial / "meta.json").write_text(json.dumps({
        "task": task, "teacher": teacher.spec.describe(),
        "teacher_spec": {"model": teacher.spec.model, "pretrained": teacher.spec.pretrained},
        "problems": len(labelled), "dim": teacher.embed_dim, "format": CACHE_FORMAT,
        **({"source": source} if source else {})}, indent=2))
    (partial / "_SUCCESS").write_text("")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def cache_teacher(folder: Path) -> TeacherSpec:
    """The CLIP that filled a teacher cache: the run's teacher, which ``clip_features`` puts
    inside the student (so a run names its CLIP once, through its teacher cache)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"teacher cache {folder} has no readable meta.json ({exc})") \
            from None
    if "teacher_spec" in meta:
        return TeacherSpec(**meta["teacher_spec"])
    # caches written before teacher_spec: describe() = "<model>:<pretrained or none>", and a
    # local-dir model holds a colon itself, so split at the last one
    model, _, pretrained = meta["teacher"].rpartition(":")
    return TeacherSpec(model=model, pretrained=None if pretrained == "none" else pretrained)


def cache_format(folder: Path) -> int:
    """The format a finished cache was written in (1 when its meta.json does not say)."""
    return int(json.loads((Path(folder) / "meta.json").read_text()).get("format", 1))


def load_cache(folder: Path, keys: set[str] | None = None) -> dict[str, dict]:
    """problem key → numpy targets, for the keys a run needs (all when ``keys`` is None)."""
    folder = Path(folder)
    if not (folder / "_SUCCESS").exists():
        raise FileNotFoundError(f"teacher cache {folder} is incomplete or missing")
    dim = json.loads((folder / "meta.json").read_text())["dim"]
    out = {}
    for shard in sorted(folder.glob("part-*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            if keys is not None and r["key"] not in keys:
                continue
            out[r["key"]] = {
                "region_emb": np.frombuffer(r["region_emb"], np.float16).reshape(
                    r["n_regions"], dim).astype(np.float32),
                "pooled": np.frombuffer(r["pooled"], np.float16).astype(np.float32),
                "words": np.frombuffer(r["words"], np.float16).reshape(
                    r["n_words"], dim).astype(np.float32),
                "rel_v": np.asarray(r["rel_v"], np.float32),
                "rel_w": np.asarray(r["rel_w"], np.float32),
                "gold_prob": r["gold_prob"], "correct": r["correct"],
                # a format-1 cache has none: its regions weigh the same
                "region_conf": np.asarray(r.get("region_conf") or [1.0] * r["n_regions"],
                                          np.float32),
            }
    return out


def targets_as_cache_rows(rows: list[dict]) -> dict[str, dict]:
    """Live-teacher rows in the same form ``load_cache`` returns (for the benchmark)."""
    return {r["key"]: {
        "region_emb": r["region_emb"].float().numpy(), "pooled": r["pooled"].float().numpy(),
        "words": r["words"].float().numpy(), "rel_v": r["rel_v"].float().numpy(),
        "rel_w": r["rel_w"].float().numpy(), "gold_prob": r["gold_prob"],
        "correct": r["correct"], "region_conf": r["region_conf"].float().numpy()}
        for r in rows}


def check_cache(folder: Path, *, task: str, version: str, split: str = "train",
                teacher: TeacherSpec | None = None) -> None:
    """Refuse a teacher cache built for another task, other data (another prepared
    dataset version), another split, or (``teacher``) by another CLIP."""
    folder = Path(folder)
    if not (folder / "_SUCCESS").exists():
        raise FileNotFoundError(f"teacher cache {folder} is incomplete or missing")
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("task") != task:
        raise ValueError(f"teacher cache {folder} is for task {meta.get('task')!r}, not {task}")
    src = meta.get("source")
    if src:  # caches written before the source was recorded cannot be checked
        if src.get("version") != version:
            raise ValueError(f"teacher cache {folder} was built for other data ({src.get('data')}"
                             f", version {src.get('version')}), not version {version}")
        if src.get("split") != split:
            raise ValueError(f"teacher cache {folder} holds split {src.get('split')!r}, "
                             f"not {split!r}")
    if teacher is not None and cache_teacher(folder) != teacher:
        raise ValueError(f"teacher cache {folder} was built by {cache_teacher(folder).describe()}"
                         f", not {teacher.describe()}")


def ensure_cache(teacher: Teacher, data: Path, root: Path, *, split: str = "train",
                 vqa_vocab: int = 100, progress: bool = True, pool=None) -> Path:
    """The cache of ``teacher`` on a prepared dataset's ``split``, built once per
    (teacher weights, dataset version, split, task) under ``root``, resumed if a previous
    pass was interrupted."""
    from cliptd.data.prepare import answer_vocab, load_manifest, read_split
    from cliptd.data.problems import problems_from_table

    data = Path(data)
    manifest = load_manifest(data)
    task = manifest["task"]
    if split not in manifest["counts"]:
        raise ValueError(f"{data}: no split {split!r} (has {sorted(manifest['counts'])})")
    key = cache_key(teacher.fingerprint(), manifest["version"], split, task)
    if (Path(root) / key / "_SUCCESS").exists():
        return Path(root) / key
    table = read_split(data, split)
    vocab = answer_vocab(read_split(data, "train") if split != "train" else table, vqa_vocab) \
        if task == "vqa" else None
    problems = problems_from_table(task, table, Path(manifest["image_root"]), vocab)
    return build_cache(teacher, task, problems, Path(root), key, vocab=vocab, progress=progress,
                       pool=pool(task) if pool else None, source={"data": str(data.resolve()), "version": manifest["version"],
                               "split": split})
