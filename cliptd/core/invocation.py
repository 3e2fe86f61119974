"""How a command was typed, for its usage line: ``cliptd tune`` or ``python -m cliptd.tune``.

The console script (``cliptd.console``) sets ``sys.argv[0]`` to ``cliptd <command>`` before it
hands the arguments to the command's ``main``; under ``python -m`` (or a ``main(argv)`` call
from Python) ``sys.argv[0]`` is something else and the usage line names the module.
"""

from __future__ import annotations

import sys

CONSOLE = "cliptd"


def prog(module: str) -> str:
    """The argparse ``prog`` of the command in ``module`` (``cliptd.tune``, ``cliptd.data``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 if argv0.startswith(f"{CONSOLE} ") else f"python -m {module}"
