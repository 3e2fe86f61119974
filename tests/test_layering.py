"""The layout is the architecture: packages in the order the data flows, imports one way.

Every import in ``cliptd/`` (function-level ones too: a lazy import is still a dependency)
must point to the same layer or a lower one, no two modules may import each other through
any chain, and package ``__init__`` files import nothing (so that importing one module of
a package never pulls in its siblings: the trial driver's light launch path relies on it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cliptd"

# Lowest first. A module may import its own layer and the layers before it, never after.
# The commands users type (top-level modules, and each package's ``__main__``) are the top.
LAYERS = (
    "core",  # configs, errors, atomic writes, versions, schedules: no torch, no cliptd
    "tracking",  # MLflow runs and result tables
    "data",  # schema, real formats, prepare, subsets and presets, problems, metrics, corpora
    "synthetic",  # the embedded world, written in the real formats
    "teacher",  # open_clip wrapper, the tiny teacher's pre-training, the teacher cache
    "model",  # the student: encoders, region features, CLIP region encoder, tokenizers
    "objective",  # distillation, the task module, the pre-training task
    "training",  # run assembly, the loops, runtimes, checkpoints, launch, inference cost
    "sweep",  # search spaces, the trial driver, searches, planning, closing trials
    "embedded",  # the embedded default assembled: world, teacher, student, caches
    "cli",  # what the commands share: flags, Ray start-up, the embedded default's set-up
    "<commands>",
)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 or parts[-1] == "__main__":
        return "<commands>"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The cliptd modules ``path`` imports, anywhere in the file."""
    name = module_name(path)
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "cliptd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != "cliptd":
                continue
            for a in node.names:  # "from cliptd.x import y": y may be a submodule
                sub = f"{base}.{a.name}"
                out.add(sub if _is_module(sub) else base)
    out.discard(name)
    return out


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(root.rglob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            if dep == "cliptd":
                bad.append(f"{mod} imports the package root")
            elif rank[layer_of(dep)] > rank[layer_of(mod)]:
                bad.append(f"{mod} ({layer_of(mod)}) imports {dep} ({layer_of(dep)})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS) - {"<commands>"}


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=str)
def test_package_inits_import_nothing(init):
    tree = ast.parse(init.read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_the_checks_catch_a_back_import_and_a_cycle(tmp_path):
    """The guard itself: a deliberately added upward import and cycle are both reported."""
    pkg = tmp_path / "cliptd"
    for sub, text in {"core/__init__.py": "", "core/a.py": "from cliptd.core import b\n",
                      "core/b.py": "def f():\n    from cliptd.core.a import x\n",
                      "data/__init__.py": "", "data/c.py": "",
                      "core/d.py": "import cliptd.data.c\n"}.items():
        (pkg / sub).parent.mkdir(parents=True, exist_ok=True)
        (pkg / sub).write_text(text)
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        graph = import_graph(pkg)
        assert upward_imports(graph) == ["cliptd.core.d (core) imports cliptd.data.c (data)"]
        assert cycles(graph) == [["cliptd.core.a", "cliptd.core.b"]]
    finally:
        PACKAGE = saved


def test_the_launch_path_stays_light():
    """What every trial driver and Ray Train controller imports (the trial function, the
    search job, the trainer factory) pulls in neither torch nor transformers nor open_clip:
    each is its own process, and on 2 cores those imports cost seconds per trial."""
    import subprocess
    import sys

    code = ("import sys, cliptd.sweep.driver, cliptd.sweep.search, cliptd.training.launch; "
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"
