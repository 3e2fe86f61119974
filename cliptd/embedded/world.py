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

from cliptd.data.prepare import MANIFEST, prepare
from cliptd.teacher.clip import TeacherSpec, embedded_teacher_spec
from cliptd.teacher.pretrain import TeacherPretrainConfig

TASK_SOURCES = {  # task → (folder in the synthetic world, has a box file)
    "vcr": ("vcr", False),
    "snli_ve": ("snli_ve", True),
    "vqa": ("vqa", True),
}


def eval_words() -> dict[str, list[str]]:
    """The run config's ``eval_words`` on the embedded world: the questions about the
    colours the student's corpus never showed, scored apart."""
    from cliptd.synthetic.scene import STUDENT_UNSEEN

    return {"student_unseen": list(STUDENT_UNSEEN)}


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIPTD_CACHE", ".cliptd_cache")).resolve()


@dataclass
class WorldConfig:
    seed: int = 0
    scale: float = 1.0
    teacher: TeacherPretrainConfig = field(default_factory=TeacherPretrainConfig)
    student_steps: int = 500
    student: str = "visualbert-tiny"
    # Bumped when the student's code or corpus changes meaning, so cached students are
    # rebuilt (6: its corpus lost the colours it must not know).
    student_version: int = 6

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
    teacher_caches: dict[str, Path] = field(default_factory=dict)  # task → train-split cache


def _timed(timings: dict, name: str, fn):
    start = time.time()
    out = fn()
    timings[name] = round(time.time() - start, 1)
    return out


def _pretrain_student_process(corpus: str, out_dir: str, synthetic: str, prepared: dict,
                              cfg: dict, progress: bool) -> float:
    """The student's pre-training in its own process (one thread), beside the teacher's."""
    import torch

    from cliptd.objective.pretrain_task import PretrainConfig
    from cliptd.synthetic.corpus import attribute_groups
    from cliptd.training.pretrain_loop import pretrain_student

    torch.set_num_threads(1)
    start = time.time()
    words = world_words(Path(synthetic), {k: Path(v) for k, v in prepared.items()})
    pretrain_student(Path(corpus), Path(out_dir), words, PretrainConfig(**cfg),
                     attribute_groups=attribute_groups(Path(corpus)), progress=progress,
                     bar_position=1)
    return time.time() - start


def ensure_world(cache: Path | None = None, cfg: WorldConfig | None = None, *,
                 tasks: tuple[str, ...] = ("vcr", "snli_ve", "vqa"),
                 caches_for: tuple[str, ...] = (), progress: bool = True,
                 log=print) -> World:
    """Build what is missing: world, Parquet data, teacher, student, and the teacher caches
    of ``caches_for``. The student pre-trains in a second process while this one
    pre-trains the teacher and builds its caches: on a 2-core machine the two tiny models
    run one thread each, side by side, instead of one after the other."""
    from cliptd.synthetic.world import GENERATOR_VERSION, generate_world

    cfg = cfg or WorldConfig()
    root = Path(cache or default_cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    # The generator's version in the names: a cache of an older world is left as it is
    where = f"v{GENERATOR_VERSION}-seed{cfg.seed}-scale{cfg.scale:g}"
    world_dir = root / f"synthetic-{where}"
    if not (world_dir / "world.json").exists():
        log(f"[cliptd] generating the synthetic world into {world_dir}")
    synthetic = _timed(timings, "synthetic", lambda: generate_world(
        world_dir, seed=cfg.seed, scale=cfg.scale))
    prepared = {}
    for task in tasks:
        folder, has_boxes = TASK_SOURCES[task]
        src = Path(synthetic) / folder
        out = root / "prepared" / f"{task}-{where}"
        if not (out / MANIFEST).exists():
            log(f"[cliptd] preparing {task} as Parquet into {out}")
            _timed(timings, f"prepare_{task}", lambda src=src, out=out, task=task,
                   has_boxes=has_boxes: prepare(
                       task, src, out, boxes=src / "boxes.json" if has_boxes else None,
                       domains=src / "domains.json"))
        prepared[task] = out
    student_dir = root / f"student-{cfg.digest('student')}"
    student_job = None
    started = time.time()
    if not (student_dir / "student.pt").exists():
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        log(f"[cliptd] pre-training the student ({cfg.student_steps} steps: MLM, ITM, choice, "
            "alignment, region attributes) on "
            f"{synthetic}/corpus/student.parquet, in a second process")
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        student_job = pool.submit(
            _pretrain_student_process, str(Path(synthetic) / "corpus" / "student.parquet"),
            str(student_dir), str(synthetic), {k: str(v) for k, v in prepared.items()},
            {"student": cfg.student, "steps": cfg.student_steps, "seed": cfg.seed}, progress)
    try:
        teacher_dir = root / f"teacher-{cfg.digest('teacher')}"
        if not (teacher_dir / "open_clip_pytorch_model.bin").exists():
            from cliptd.teacher.pretrain import pretrain_tiny_teacher

            log(f"[cliptd] pre-training the tiny CLIP teacher ({cfg.teacher.steps} steps) "
                f"on {synthetic}/corpus/teacher.parquet")
            _timed(timings, "teacher_pretrain", lambda: _one_thread_while(
                student_job, lambda: pretrain_tiny_teacher(
                    Path(synthetic) / "corpus" / "teacher.parquet", teacher_dir, cfg.teacher,
                    progress=progress)))
        teacher = embedded_teacher_spec(teacher_dir)
        caches = {}
        if caches_for:
            from cliptd.core.config import DEFAULT_CONFIG
            from cliptd.teacher.cache import ensure_cache
            from cliptd.teacher.clip import Teacher

            model = Teacher.load(teacher)  # once: its fingerprint keys every cache
            for task in caches_for:
                caches[task] = _timed(timings, f"teacher_cache_{task}", lambda task=task: (
                    _one_thread_while(student_job, lambda: ensure_cache(
                        model, prepared[task], root / "teacher_cache",
                        vqa_vocab=DEFAULT_CONFIG["vqa_vocab"]))))
        if student_job is not None:
            timings["student_pretrain"] = round(student_job.result(), 1)
            timings["student_wait"] = round(time.time() - started, 1)
    finally:
        if student_job is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return World(root=root, synthetic=Path(synthetic), data=prepared, teacher=teacher,
                 student=student_dir, timings=timings, teacher_caches=caches)


def _one_thread_while(job, fn):
    """Run ``fn`` with one torch thread while ``job`` (the student process) runs."""
    import torch

    if job is None or job.done():
        return fn()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def world_words(synthetic: Path, prepared: dict[str, Path]) -> set[str]:
    """The closed vocabulary: both corpora and every task's text."""
    from cliptd.data.corpus import corpus_words, dataset_words

    words = corpus_words(synthetic / "corpus" / "student.parquet")
    words |= corpus_words(synthetic / "corpus" / "teacher.parquet")
    for folder in prepared.values():
        words |= dataset_words(folder)
    return words


def world_tokenizer(synthetic: Path, prepared: dict[str, Path]):
    """A word-level tokenizer over ``world_words``."""
    from cliptd.model.tokenizers import build_word_tokenizer

    return build_word_tokenizer(world_words(synthetic, prepared))
