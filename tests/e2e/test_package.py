"""`pip install .`, not editable: the wheel holds every module of every package, the search
spaces and the model configs, and no tests or benchmarks; installed into a fresh venv, the
`cliptd` command runs and the packaged resources load from the installed copy.

The fresh venv reuses the dependencies of the interpreter running the tests (nothing is
downloaded): a ``.pth`` file names that interpreter's site-packages, after the venv's own,
so the venv's installed cliptd wins over the editable one the tests run from.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from cliptd import console
from cliptd.sweep.space import shipped_spaces

# ~35 s: a wheel build, a venv, and three fresh processes importing torch
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build",
                                "dist", ".cliptd_cache", "runs", "mlruns", "mlflow.db",
                                ".pytest_cache", ".ruff_cache")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def source_copy(dest: Path) -> Path:
    """What a clone holds (tracked and new files, not ignored ones), copied: the build
    writes build/ and *.egg-info beside its sources, which must not land in the checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=REPO, capture_output=True,
                                check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=IGNORE)
        return dest
    for rel in filter(None, listed):
        if (REPO / rel).is_file():  # not a deletion still in the index
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the source tree it was built from)."""
    tmp = tmp_path_factory.mktemp("package")
    src = source_copy(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", tmp / "dist", src], timeout=300)
    (wheel,) = (tmp / "dist").glob("cliptd-*.whl")
    return wheel, src


def test_the_wheel_holds_the_package_and_nothing_else(built):
    wheel, src = built
    names = set(zipfile.ZipFile(wheel).namelist())
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {n.split("/")[0] for n in names} == {"cliptd", info}  # no tests/, bench/, ...
    package = src / "cliptd"
    modules = {p.relative_to(src).as_posix() for p in package.rglob("*.py")}
    spaces = {f"cliptd/sweep/spaces/{name}.yaml" for name in shipped_spaces()}
    configs = {p.relative_to(src).as_posix() for p in (package / "model_configs").glob("*.json")}
    # every module of every package (the nested ones too), the spaces, the model configs
    shipped, expected = {n for n in names if n.startswith("cliptd/")}, modules | spaces | configs
    assert not expected - shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    assert not shipped - expected, f"not expected in the wheel: {sorted(shipped - expected)}"
    assert {"cliptd/data/formats/vcr.py", "cliptd/data/formats/snli_ve.py",
            "cliptd/data/formats/vqa.py", "cliptd/console.py",
            "cliptd/teacher_cache.py"} <= names
    assert {"cliptd/sweep/spaces/vcr.yaml", "cliptd/model_configs/cliptd-tiny.json",
            "cliptd/model_configs/student-visualbert-tiny.json"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)

    z = zipfile.ZipFile(wheel)
    entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert "[console_scripts]\ncliptd = cliptd.console:main" in entry_points
    # the dependencies are the pyproject ranges (the exact pins live in constraints.txt)
    meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
    required = {str(Requirement(r)) for r in meta.get_all("Requires-Dist")
                if "extra ==" not in r}
    project = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    assert required == {str(Requirement(r)) for r in project["dependencies"]}
    assert not [r for r in required if "==" in r]


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable) and the running interpreter's
    dependencies on its path, after its own site-packages."""
    wheel, _ = built
    root = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", root], timeout=120)
    python = root / "bin" / "python"
    # installed before the dependencies are visible: pip sees an empty environment
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", "-q", wheel], timeout=300)
    own = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               timeout=60).stdout.strip()
    paths = sysconfig.get_paths()
    deps = dict.fromkeys([paths["purelib"], paths["platlib"]])  # this interpreter's
    # plain path lines: the .pth files in there (the editable cliptd's finder) are not run
    (Path(own) / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    return root


def _in_venv(venv: Path, *cmd, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONNOUSERSITE="1")
    return _run(cmd, cwd=cwd, env=env, timeout=300)


def test_the_installed_command_runs(venv, tmp_path):
    python, cliptd = venv / "bin" / "python", venv / "bin" / "cliptd"
    where = _in_venv(venv, python, "-c", "import cliptd, importlib.metadata as m; "
                     "print(cliptd.__file__); print(m.distribution('cliptd').read_text("
                     "'direct_url.json') or '')", cwd=tmp_path).stdout.splitlines()
    assert Path(where[0]).resolve().is_relative_to(venv.resolve())
    assert '"editable": true' not in "".join(where[1:])

    listed = _in_venv(venv, cliptd, "--help", cwd=tmp_path).stdout
    assert listed.startswith("usage: cliptd <command>")
    assert [line.split()[0] for line in listed.splitlines() if line.startswith("  ")] == \
        list(console.COMMANDS)
    tune = _in_venv(venv, cliptd, "tune", "--help", cwd=tmp_path).stdout
    assert tune.startswith("usage: cliptd tune ")
    assert "--budget" in tune and "--space" in tune
    data = _in_venv(venv, cliptd, "data", "prepare", "--help", cwd=tmp_path).stdout
    assert data.startswith("usage: cliptd data prepare ")


def test_the_packaged_resources_load_from_the_install(venv, tmp_path):
    code = """
import json, open_clip
from cliptd.model.config import CONFIG_DIR, StudentConfig
from cliptd.sweep.space import load_space, shipped_spaces
import cliptd.teacher.clip as clip
spaces = {name: load_space(name) for name in shipped_spaces()}
student = StudentConfig.from_name("visualbert-tiny")
print(json.dumps({"spaces": {n: [str(s.path), s.task] for n, s in spaces.items()},
                  "student": student.arch, "configs": str(CONFIG_DIR),
                  "teacher": open_clip.get_model_config(clip.EMBEDDED_TEACHER) is not None}))
"""
    import json

    out = json.loads(_in_venv(venv, venv / "bin" / "python", "-c", code,
                              cwd=tmp_path).stdout.splitlines()[-1])
    assert sorted(out["spaces"]) == ["snli_ve", "vcr", "vqa"]
    for name, (path, task) in out["spaces"].items():
        assert task == name
        assert Path(path).resolve().is_relative_to(venv.resolve())
    assert Path(out["configs"]).resolve().is_relative_to(venv.resolve())
    assert out["student"] == "visualbert"
    assert out["teacher"] is True
