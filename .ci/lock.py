"""Write constraints.txt: the exact versions tested together, from the installed venv.

Starts at pyproject.toml's dependencies and its ``test`` extra, follows every installed
distribution's requirements (markers evaluated, extras followed), and pins each one reached
at its installed version. cliptd itself is left out. Run by ``make lock``::

    .venv/bin/python .ci/lock.py > constraints.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = [(Requirement(r), frozenset()) for r in requirements]
    while todo:
        req, parent_extras = todo.pop()
        env = default_environment()
        if req.marker and not any(req.marker.evaluate({**env, "extra": e})
                                  for e in (parent_extras or {""})):
            continue
        key = (canon(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"lock: {req.name} is required but not installed")
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"lock: installed {req.name} {dist.version} does not satisfy {req}")
        pins[canon(req.name)] = dist.version
        for sub in dist.requires or []:
            todo.append((Requirement(sub), frozenset(req.extras)))
    pins.pop("cliptd", None)
    return pins


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = closure(roots)
    print("# The exact set tested together (pyproject.toml gives the ranges). Written by")
    print("# `make lock` (.ci/lock.py) from the venv the tests passed in; installed with")
    print("# `pip install -c constraints.txt -e '.[test]'` (make, CI).")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
