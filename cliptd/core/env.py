"""The environment a run records: package versions, peak memory."""

from __future__ import annotations

import resource
import sys


def package_versions() -> dict:
    from importlib.metadata import version

    names = ("cliptd", "ray", "torch", "torchvision", "transformers", "open_clip_torch",
             "optuna", "mlflow", "pyarrow")
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except Exception:  # noqa: BLE001 - a missing optional package is just absent
            out[n] = "absent"
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (ru_maxrss: KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
