"""What every stored result records about how it was made: the one provenance builder, used by
the probe runner (:func:`mechinterp.core.runner.run_probe`) and by training's drift log."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

TRACKED_PACKAGES = ("mechinterp", "torch", "transformers", "transformer-lens", "nnsight", "trl",
                    "numpy", "safetensors")


def package_versions() -> dict[str, str]:
    """``{package: version}`` of Python and of the installed packages a result depends on."""
    versions = {"python": platform.python_version()}
    for package in TRACKED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def build_provenance(probe: str, version: str, *, models: dict[str, Any], data: dict[str, Any],
                     seed: int, device: Any, dtype: Any, **details: Any) -> dict[str, Any]:
    """The provenance of one result.

    Args:
        probe: the name of the probe (or log) that made it.
        version: that probe's version (reuse compares it).
        models: ``{name: provenance}`` of every model read (``ModelSet.provenance()``).
        data: the data files and hub sets read (``DataLog.to_json()``).
        seed: the random seed.
        device, dtype: where and in which precision it ran (stored as text).
        details: what else the caller records (configuration, timing, ...), after the name and
            version.

    Returns:
        ``{"probe", "probe_version", **details, "models", "data", "seed", "packages", "device",
        "dtype"}``, ``packages`` being :func:`package_versions`.
    """
    return {"probe": probe, "probe_version": version, **details, "models": models, "data": data,
            "seed": seed, "packages": package_versions(), "device": str(device),
            "dtype": str(dtype)}
