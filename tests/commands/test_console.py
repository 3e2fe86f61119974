"""The `cliptd` console command: one subcommand per command module, only the chosen one
imported, each command's usage line as it was typed (`cliptd X` or `python -m cliptd.X`),
and a clean line when a command's module is missing."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cliptd import console

PACKAGE = Path(__file__).resolve().parents[2] / "cliptd"


def command_modules() -> set[str]:
    """What users type, found on disk: the top-level modules and the packages' __main__."""
    top = {f"cliptd.{p.stem}" for p in PACKAGE.glob("*.py")} - {"cliptd.__init__"}
    mains = {f"cliptd.{p.parent.name}.__main__" for p in PACKAGE.glob("*/__main__.py")}
    return (top | mains) - {"cliptd.console"}


def test_every_command_module_is_a_subcommand():
    assert {module for module, _ in console.COMMANDS.values()} == command_modules()
    assert console.COMMANDS["teacher-cache"][0] == "cliptd.teacher_cache"
    assert console.COMMANDS["data"][0] == "cliptd.data.__main__"


def test_help_lists_every_command_and_imports_none_of_them():
    code = ("import sys; from cliptd.console import main; rc = main(['--help']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('cliptd', 'torch', 'ray', 'mlflow', 'transformers', 'open_clip', 'yaml')))")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, env=env, cwd=PACKAGE.parent).stdout
    *help_lines, modules = out.strip().splitlines()
    assert modules == "['cliptd', 'cliptd.console', 'cliptd.core', 'cliptd.core.invocation']"
    assert help_lines[0].startswith("usage: cliptd <command>")
    listed = [line.split()[0] for line in help_lines if line.startswith("  ")]
    assert listed == list(console.COMMANDS)
    for name, (_, line) in console.COMMANDS.items():
        assert f"  {name:<13}  {line}" in help_lines


@pytest.mark.parametrize("name", list(console.COMMANDS))
def test_usage_line_reads_as_typed(name, capsys):
    """`cliptd X --help` says `usage: cliptd X`, the module run directly says
    `usage: python -m cliptd.X`, and the console leaves sys.argv[0] as it found it."""
    module_name = console.COMMANDS[name][0]
    argv0 = sys.argv[0]
    with pytest.raises(SystemExit) as exit_:
        console.main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: cliptd {name} ")
    assert sys.argv[0] == argv0
    with pytest.raises(SystemExit):
        importlib.import_module(module_name).main(["--help"])
    typed = module_name.removesuffix(".__main__")
    assert capsys.readouterr().out.startswith(f"usage: python -m {typed} ")


def test_arguments_reach_the_command(tmp_path, capsys):
    """What follows the subcommand is the command's own argv: here `data subsets` on a
    folder that is not a prepared dataset fails the way `python -m cliptd.data` does."""
    rc = console.main(["data", "subsets", "--data", str(tmp_path / "nothing")])
    assert rc == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


def test_no_command_and_unknown_command(capsys):
    assert console.main([]) == 2
    assert capsys.readouterr().err.startswith("usage: cliptd <command>")
    assert console.main(["tuen", "--task", "vcr"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'tuen'; did you mean 'tune'?" in err
    assert "teacher-cache" in err


def test_a_command_whose_module_is_missing_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(console.COMMANDS, "ghost", ("cliptd.ghost_command", "not shipped"))
    assert console.main(["ghost", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cliptd: error: `cliptd ghost` runs cliptd.ghost_command, which "
                          "this installation of cliptd")
    # a dependency missing inside a command is a real error, not "no such command"
    (tmp_path / "broken_command.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(console.COMMANDS, "broken", ("broken_command", ""))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        console.main(["broken"])
