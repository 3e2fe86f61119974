"""The embedded default, assembled once and cached: the synthetic world in the real formats,
its prepared Parquet datasets, the tiny CLIP teacher pre-trained on the broad caption corpus
and the student pre-trained on the narrow one.

Every step is skipped when its output is already in the cache (``$CLIPTD_CACHE``, default
``./.cliptd_cache``), and every step writes atomically, so an interrupted first run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cliptd import data as data_mod
from cliptd.teacher import TeacherPretrainConfig, TeacherSpec, embedded_teacher_spec

TASK_SOURCES = {  # task → (folder in the synthetic world, has a box file)
    "vcr": ("vcr", False),
    "snli_ve": ("snli_ve", True),
    "vqa": ("vqa", True),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIPTD_CACHE", ".cliptd_cache")).resolve()


@dataclass
class WorldConfig:
    seed: int = 0
    scale: float = 1.0
    teacher: TeacherPretrainConfig = field(default_factory=TeacherPretrainConfig)
    student_steps: int = 500
    student: str = "visualbert-tiny"
    # Bumped when the student's code changes meaning, so cached students are rebuilt.
    student_version: int = 4

    def digest(self, part: str) -> str:
        """Cache key of one stage: only the settings that stage depends on."""
        fields = {"teacher": ("seed", "scale", "teacher"),
                  "student": ("seed", "scale", "student", "student_steps", "student_version")}
        data = {k: v for k, v in asdict(self).items() if k in fields[part]}
        return hashlib.sha256(json.dumps([part, data], sort_keys=True,
                                         default=str).encode()).hexdigest()[:10]


@dataclass
class World:
    root: Path
    synthetic: Path
    data: dict[str, Path]
    teacher: TeacherSpec
    student: Path
    timings: dict[str, float]


def _timed(timings: dict, name: str, fn):
    start = time.time()
    out = fn()
    timings[name] = round(time.time() - start, 1)
    return out


def ensure_world(cache: Path | None = None, cfg: WorldConfig | None = None, *,
                 tasks: tuple[str, ...] = ("vcr", "snli_ve", "vqa"), progress: bool = True,
                 log=print) -> World:
    from cliptd.synthetic import generate_world

    cfg = cfg or WorldConfig()
    root = Path(cache or default_cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    world_dir = root / f"synthetic-seed{cfg.seed}-scale{cfg.scale:g}"
    if not (world_dir / "world.json").exists():
        log(f"[cliptd] generating the synthetic world into {world_dir}")
    synthetic = _timed(timings, "synthetic", lambda: generate_world(
        world_dir, seed=cfg.seed, scale=cfg.scale))
    prepared = {}
    for task in tasks:
        folder, has_boxes = TASK_SOURCES[task]
        src = Path(synthetic) / folder
        out = root / "prepared" / f"{task}-seed{cfg.seed}-scale{cfg.scale:g}"
        if not (out / data_mod.MANIFEST).exists():
            log(f"[cliptd] preparing {task} as Parquet into {out}")
            _timed(timings, f"prepare_{task}", lambda src=src, out=out, task=task,
                   has_boxes=has_boxes: data_mod.prepare(
                       task, src, out, boxes=src / "boxes.json" if has_boxes else None,
                       domains=src / "domains.json"))
        prepared[task] = out
    teacher_dir = root / f"teacher-{cfg.digest('teacher')}"
    if not (teacher_dir / "open_clip_pytorch_model.bin").exists():
        from cliptd.teacher import pretrain_tiny_teacher

        log(f"[cliptd] pre-training the tiny CLIP teacher ({cfg.teacher.steps} steps) "
            f"on {synthetic}/corpus/teacher.parquet")
        _timed(timings, "teacher_pretrain", lambda: pretrain_tiny_teacher(
            Path(synthetic) / "corpus" / "teacher.parquet", teacher_dir, cfg.teacher,
            progress=progress))
    student_dir = root / f"student-{cfg.digest('student')}"
    if not (student_dir / "student.pt").exists():
        from cliptd.pretrain import PretrainConfig, pretrain_student

        log(f"[cliptd] pre-training the student ({cfg.student_steps} steps, MLM + ITM) on "
            f"{synthetic}/corpus/student.parquet")
        tokenizer = world_tokenizer(Path(synthetic), prepared)
        _timed(timings, "student_pretrain", lambda: pretrain_student(
            Path(synthetic) / "corpus" / "student.parquet", student_dir, tokenizer,
            PretrainConfig(student=cfg.student, steps=cfg.student_steps, seed=cfg.seed),
            progress=progress))
    return World(root=root, synthetic=Path(synthetic), data=prepared,
                 teacher=embedded_teacher_spec(teacher_dir), student=student_dir,
                 timings=timings)


def world_tokenizer(synthetic: Path, prepared: dict[str, Path]):
    """A word-level vocabulary over the corpus and every task's text (the world is closed)."""
    from cliptd.pretrain import corpus_words
    from cliptd.student import build_word_tokenizer

    words = corpus_words(synthetic / "corpus" / "student.parquet")
    words |= corpus_words(synthetic / "corpus" / "teacher.parquet")
    for folder in prepared.values():
        manifest = data_mod.load_manifest(folder)
        for split in manifest["counts"]:
            table = data_mod.read_split(folder, split, columns=["query", "candidates",
                                                                "rationales", "answers"])
            for col in ("query", "answers"):
                for toks in table.column(col).to_pylist():
                    for t in toks:
                        words.update(t.split())
            for col in ("candidates", "rationales"):
                for lists in table.column(col).to_pylist():
                    for toks in lists:
                        words.update(toks)
    return build_word_tokenizer(words)
