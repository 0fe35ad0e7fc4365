"""A probe's options: checked when a config is built, parsed from the command line's strings, and
explained (``help(mi.probe(NAME))``, ``mechinterp probes show NAME``).

Each option's meaning is the comment on its field's line in the config's source, or the comment
lines just above it, or ``field(metadata={"help": ...})``.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import tokenize
import types
import typing
from typing import Any

from ..errors import UserError

_UNIONS = (typing.Union, types.UnionType)


def bounds(cls: type) -> tuple[dict[str, float], set[str]]:
    lows: dict[str, float] = {}
    signed: set[str] = set()
    for klass in reversed(cls.__mro__):
        lows.update(vars(klass).get("at_least", {}))
        signed.update(vars(klass).get("signed", ()))
    return lows, signed


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value fits ``hint``, the value normalised: int -> float, tuple -> list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNIONS:
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
    lows, signed = bounds(cls)
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


def make_config(probe, options: dict[str, Any] | None = None, **common) -> Any:
    """Build a probe's config.

    Args:
        probe: the probe object.
        options: ``{option: value}``; a string value is parsed into the option's type (the
            command line's ``--set NAME=VALUE``), ``-`` in a name read as ``_``.
        common: options every probe shares (``seed``, ``limit``); None values are left out.

    Returns:
        The probe's ``Config``, checked (:func:`check_config`).

    Raises:
        UserError: an unknown option, or a value of the wrong type or out of bounds.
    """
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
    if origin in _UNIONS and args:
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


def options(probe) -> list[dict[str, str]]:
    """Each option of a probe: name, type, default, lower bound and meaning."""
    hints = typing.get_type_hints(probe.Config)
    lows, signed = bounds(probe.Config)
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


def describe(probe) -> str:
    """A probe's description, module documentation and option table, as plain text (what
    ``help(mi.probe(NAME))`` and ``mechinterp probes show NAME`` print)."""
    doc = inspect.getdoc(inspect.getmodule(type(probe))) or ""
    lines = [f"{probe.name} (version {probe.version}): {probe.description}", "", doc, "",
             "Options (--set NAME=VALUE on the command line, NAME=VALUE in mi.run):"]
    for o in options(probe):
        bound = f", >= {o['min']}" if o["min"] else ""
        lines.append(f"  {o['name']} ({o['type']}, default {o['default']}{bound}): "
                     f"{o['meaning']}")
    return "\n".join(lines)
