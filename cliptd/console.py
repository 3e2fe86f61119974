"""The ``cliptd`` command: ``cliptd <command> [args]`` is ``python -m cliptd.<module> [args]``.

    cliptd tune --task vcr                   # python -m cliptd.tune --task vcr
    cliptd data prepare --task vcr --src /data/vcr --out /data/prepared/vcr
    cliptd teacher-cache --data /data/prepared/vcr --teacher ViT-B-32:openai

Only the chosen command's module is imported (``cliptd --help`` imports none of them), and
its ``main(argv)`` gets the remaining arguments.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from cliptd.core.invocation import CONSOLE

# command -> (module whose main(argv) runs it, one line for `cliptd --help`)
COMMANDS = {
    "tune": ("cliptd.tune", "a sweep: Optuna + ASHA search per condition x method, seed "
                            "re-runs, the comparison table"),
    "train": ("cliptd.train", "one training run (a method and data condition, or a sweep's "
                              "best --config)"),
    "data": ("cliptd.data.__main__", "real dataset files -> Parquet shards; low-shot subsets"),
    "teacher-cache": ("cliptd.teacher_cache", "a prepared dataset's teacher cache, from any "
                                              "open_clip CLIP"),
    "pretrain": ("cliptd.pretrain", "pre-train a student on a caption corpus (Ray Train)"),
    "teacher": ("cliptd.teacher.__main__", "pre-train the embedded tiny CLIP teacher"),
    "synthetic": ("cliptd.synthetic.__main__", "write the embedded synthetic world"),
    "report": ("cliptd.report", "tables and plots from a sweep's MLflow runs"),
    "bench": ("cliptd.bench", "benchmarks: step cost, the synthetic science, Ray overhead"),
    "clusters": ("cliptd.clusters", "check `ray up` cluster files offline"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {CONSOLE} <command> [args]   ({CONSOLE} <command> --help for its flags)",
             "", "CLIP Targeted Distillation on Ray Train / Tune with MLflow.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cliptd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"{CONSOLE} {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"{CONSOLE}: error: unknown command {name!r}{hint} (commands: "
              f"{', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # the command's own module missing (an older or partial install), not a dependency
        if exc.name and (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
            print(f"{CONSOLE}: error: `{CONSOLE} {name}` runs {module_name}, which this "
                  f"installation of cliptd ({_version()}) does not have", file=sys.stderr)
            return 2
        raise
    saved, sys.argv[0:1] = sys.argv[0:1], [f"{CONSOLE} {name}"]
    try:
        return module.main(rest)
    finally:
        sys.argv[0:1] = saved


if __name__ == "__main__":
    raise SystemExit(main())
