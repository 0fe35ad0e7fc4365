"""Probes: one experiment each, as plugins.

A probe is an object with ``name``, ``version``, a ``Config`` dataclass, ``run(models, data,
config) -> Result`` and ``plot(result) -> {name: Figure}``. Probes never print or save: the runner
(:func:`mechinterp.core.runner.run_probe`) times them, attaches provenance and writes the result store.

Built-in probes live in the top-level ``probes`` package; other packages add theirs through the
``mechinterp.probes`` entry-point group (the entry point loads the probe object).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import pkgutil
import typing
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, ClassVar, Protocol

from ..errors import UserError
from ..store.results import Result, set_probe_finder

ENTRY_POINT_GROUP = "mechinterp.probes"
BUILTIN_PACKAGE = "probes"  # the built-in probes: one module each, its probe object ``PROBE``

@dataclass
class BaseConfig:
    """Options every probe shares; probe configs subclass this.

    Every config is checked when it is built (:func:`check_config`): each value has its field's
    type, and numbers are at least their lower bound: ``at_least`` (merged along the class
    hierarchy) where one is declared, else 0 (counts, sizes and scales are never negative;
    ``seed`` is free). A bad value is a :class:`UserError` naming the field, so the CLI exits 2.
    """

    seed: int = 0  # random seed (selections of items, noise, bootstrap)
    # at most this many data items in all, shared between a probe's prompt sets (seeded)
    limit: int | None = None

    at_least: ClassVar[dict[str, float]] = {"limit": 1}
    signed: ClassVar[tuple[str, ...]] = ("seed",)

    def __post_init__(self):
        check_config(self)


def _bounds(cls: type) -> tuple[dict[str, float], set[str]]:
    lows: dict[str, float] = {}
    signed: set[str] = set()
    for klass in reversed(cls.__mro__):
        lows.update(vars(klass).get("at_least", {}))
        signed.update(vars(klass).get("signed", ()))
    return lows, signed


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value fits ``hint``, the value normalised: int -> float, tuple -> list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return type(None) in args, None
        for a in args:
            if a is not type(None):
                ok, v = _type_ok(value, a)
                if ok:
                    return True, v
        return False, value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return False, value
        inner = args[0] if args else Any
        out = []
        for v in value:
            ok, v = _type_ok(v, inner)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out) if origin is tuple else out
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is not None:  # list[str], int | None
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_config(config: Any) -> None:
    """Check (and normalise) every field of a probe config; raise :class:`UserError` on the first
    bad one, naming the option, the value and what it must be."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    lows, signed = _bounds(cls)
    module = getattr(cls, "__module__", "")
    # built-in configs live in probes.<name>; others (a notebook's) are named by their class
    probe = (module.rsplit(".", 1)[-1].replace("_", "-") if module.startswith("probes.")
             else cls.__qualname__)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, norm = _type_ok(value, hints[f.name])
        if not ok:
            raise UserError(f"option {f.name}={value!r} of {probe} must be "
                            f"{_type_name(hints[f.name])}", f"set {f.name} to a value of that type")
        setattr(config, f.name, norm)
        nums = norm if isinstance(norm, (list, tuple)) else [norm]
        low = lows.get(f.name, None if f.name in signed else 0)
        for v in nums:
            if low is not None and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and not v >= low:  # also catches NaN
                default = "" if f.default is dataclasses.MISSING else f"; default {f.default}"
                raise UserError(f"option {f.name}={value!r} of {probe} must be at least {low:g}",
                                f"set {f.name} to {low:g} or more{default}")
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"option {f.name}={value!r} of {probe} must be a finite number",
                                f"set {f.name} to a finite value")


class Probe(Protocol):
    name: str
    version: str
    description: str
    Config: type

    def run(self, models, data, config) -> Result: ...

    def plot(self, result: Result) -> dict[str, Any]: ...


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


def make_config(probe: Probe, options: dict[str, Any] | None = None, **common) -> Any:
    """Build a probe config from typed values and ``key=value`` strings, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(probe.Config)}
    hints = typing.get_type_hints(probe.Config)
    values: dict[str, Any] = {k: v for k, v in common.items() if v is not None}
    for key, raw in (options or {}).items():
        key = key.replace("-", "_")
        if key not in fields:
            raise UserError(f"probe {probe.name!r} has no option {key!r}",
                            f"its options: {', '.join(fields)}")
        values[key] = _coerce(raw, hints[key], key, probe.name) if isinstance(raw, str) else raw
    return probe.Config(**values)


def _coerce(raw: str, hint: Any, key: str, probe: str) -> Any:
    """Parse a CLI string into the field's type (int, float, bool, str, list/tuple of those)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        if raw.lower() in ("none", "null", ""):
            return None
        return _coerce(raw, args[0], key, probe)
    if origin in (list, tuple):
        inner = args[0] if args else str
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        out = [_coerce(p, inner, key, probe) for p in parts]
        return tuple(out) if origin is tuple else out
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float, str):
            return hint(raw)
    except ValueError:
        raise UserError(f"option {key}={raw!r} of probe {probe!r} is not a valid "
                        f"{getattr(hint, '__name__', hint)}", "check the value") from None
    return raw


def option_help(config_cls: type) -> dict[str, str]:
    """One line of meaning per option, read from the config's source: the comment on the field's
    line, else the comment lines just above it (``field(metadata={"help": ...})`` wins)."""
    import inspect
    import io
    import tokenize

    out: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        lines = src.splitlines()
        for i, line in enumerate(lines, 1):
            name = line.strip().split(":", 1)[0]
            if not line.startswith("    ") or not name.isidentifier() or ":" not in line:
                continue
            text = comments.get(i)
            if text is None:  # comment lines right above the field
                above, j = [], i - 1
                while j in comments and lines[j - 1].strip().startswith("#"):
                    above.insert(0, comments[j])
                    j -= 1
                text = " ".join(above) or None
            if text:
                out[name] = text
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("help"):
            out[f.name] = f.metadata["help"]
    return out


def options(probe: Probe) -> list[dict[str, str]]:
    """Each option of a probe: name, type, default, lower bound and meaning."""
    hints = typing.get_type_hints(probe.Config)
    lows, signed = _bounds(probe.Config)
    meaning = option_help(probe.Config)
    rows = []
    for f in dataclasses.fields(probe.Config):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                     "min": "" if f.name in signed else f"{lows.get(f.name, 0):g}"
                     if any(a in (int, float) for a in
                            (typing.get_args(hints[f.name]) or (hints[f.name],))) else "",
                     "meaning": meaning.get(f.name, "")})
    return rows


def describe(probe: Probe) -> str:
    """A probe's description, module documentation and option table, as plain text (what
    ``help(mi.probe(NAME))`` and ``mechinterp probes show NAME`` print)."""
    import inspect

    doc = inspect.getdoc(inspect.getmodule(type(probe))) or ""
    lines = [f"{probe.name} (version {probe.version}): {probe.description}", "", doc, "",
             "Options (--set NAME=VALUE on the command line, NAME=VALUE in mi.run):"]
    for o in options(probe):
        bound = f", >= {o['min']}" if o["min"] else ""
        lines.append(f"  {o['name']} ({o['type']}, default {o['default']}{bound}): "
                     f"{o['meaning']}")
    return "\n".join(lines)


set_probe_finder(get_probe)
