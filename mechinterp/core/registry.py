"""The probe registry: every probe, built-in or from another package, found through the
``mechinterp.probes`` entry-point group.

The built-in probes are listed there too (``pyproject.toml``), so they are found the way any
plugin is. A source tree can be newer than its installed metadata (a probe added since ``pip
install -e``): the modules of the built-in ``probes`` package are therefore also found by name
(``importlib``), each module's ``PROBE`` being its probe. Nothing here imports a probe module
statically.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import warnings
from importlib import metadata

from ..errors import UserError
from ..store.results import set_probe_finder
from .options import describe
from .probe import Probe

ENTRY_POINT_GROUP = "mechinterp.probes"
BUILTIN_PACKAGE = "probes"  # the built-in probes: one module each, its probe object ``PROBE``

#: entry points that failed to load: ``{entry point name: "value: error"}`` (``probes list``)
BROKEN: dict[str, str] = {}


def _load(ep) -> Probe | None:
    """The probe object of an entry point; None (with a warning, listed in :data:`BROKEN`) when
    it fails to load."""
    try:
        probe = ep.load()
        probe.name  # noqa: B018 - an object without a name is as broken as an import error
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the suite
        if ep.name not in BROKEN:
            warnings.warn(f"probe plugin {ep.name!r} ({ep.value}) failed to load: {exc}; "
                          "fix or uninstall that package", stacklevel=3)
        BROKEN[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
        return None
    return probe


def _builtin_modules() -> list[str]:
    """The modules of the built-in ``probes`` package, found by name on the import path."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [f"{BUILTIN_PACKAGE}.{m.name}"
            for m in pkgutil.iter_modules(spec.submodule_search_locations) if not m.ispkg]


def registry() -> dict[str, Probe]:
    """Every probe: those of the ``mechinterp.probes`` entry-point group (the built-in ones are
    listed there too), and the modules of the built-in ``probes`` package that the installed
    metadata does not list (a source tree newer than its install). Built-ins win on a clash.

    A plugin that fails to load is skipped with a warning and listed in :data:`BROKEN`: one broken
    third-party package must not stop every command.

    Returns:
        ``{name: probe object}``, sorted by name.
    """
    plugins: dict[str, Probe] = {}
    builtin: dict[str, Probe] = {}
    loaded: set[str] = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        module = ep.value.partition(":")[0].strip()
        probe = _load(ep)
        if probe is not None:
            is_builtin = module.split(".")[0] == BUILTIN_PACKAGE
            (builtin if is_builtin else plugins)[probe.name] = probe
            loaded.add(module)
    for module in _builtin_modules():
        if module not in loaded:
            probe = getattr(importlib.import_module(module), "PROBE", None)
            if probe is not None:
                builtin[probe.name] = probe
    return dict(sorted({**plugins, **builtin}.items()))


def get_probe(name: str) -> Probe:
    """The installed probe of a name, its class's documentation set to its option table (what
    ``help()`` shows).

    Args:
        name: the probe's name (``"weight-change"``).

    Returns:
        The probe object.

    Raises:
        UserError: no probe of that name is installed (the message lists the known ones).
    """
    probes = registry()
    if name not in probes:
        raise UserError(f"unknown probe {name!r}", f"known probes: {', '.join(probes)}")
    probe = probes[name]
    cls = type(probe)
    if not getattr(cls, "_described", False):  # help(probe) shows the options
        try:
            cls.__doc__ = describe(probe)
            cls._described = True
        except (AttributeError, TypeError):  # a plugin class that refuses: its own doc stays
            pass
    return probe


set_probe_finder(get_probe)
