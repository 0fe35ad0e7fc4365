"""Results as one long table: the same columns for every probe, so ``df.query(...)`` and seaborn
work the same on weight change, KL, accuracy, patching or tracing.

A probe declares which of its result keys are tables and what each nesting level means
(``frames = (Table("kl", ("model",)), Table("recovery", ("model", "site", "direction", "layer"),
ci="recovery_ci95"), ...)``); :func:`to_frame` walks them. A probe whose result is nested by
position instead (a list over checkpoints) also defines ``frame_data(data) -> dict``: the data,
keyed by model, that its tables walk. Columns, in this order, those absent from a probe's tables
dropped::

    probe, model, run, step, layer, component, head, token_group, site, direction, format,
    metric, value, lo, hi, n

``model`` is the model's name in the result (``base``, ``sft``, ``sft@step-8``); ``run`` and
``step`` come from it (``sft``, 8; a final model's step is empty). ``lo`` / ``hi`` are the 95%
interval the probe reported for that number, where it reports one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..paths import checkpoint_step

COLUMNS = ("probe", "model", "run", "step", "layer", "component", "head", "token_group", "site",
           "direction", "format", "metric", "value", "lo", "hi", "n")
PARQUET_FILE = "result.parquet"


@dataclass(frozen=True)
class Table:
    """A result key holding numbers nested as ``axes`` (dict keys or list positions per level).

    ``ci``: a key nested the same way whose leaves are ``[lo, hi]``, or whose last dict level is
    ``{"lo": [...], "hi": [...], "n": ...}`` (one list per level below). ``metric``: the name in
    the ``metric`` column (default: ``key``); an axis named ``metric`` (a dict of statistics)
    is appended to it (``paired.difference``)."""

    key: str
    axes: tuple[str, ...]
    ci: str | None = None
    metric: str | None = None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _walk(node: Any, axes: Sequence[str], at: dict) -> Iterator[tuple[dict, Any]]:
    if not axes:
        yield at, node
        return
    axis, rest = axes[0], axes[1:]
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        return
    for k, v in items:
        yield from _walk(v, rest, {**at, axis: k})


def _ci_at(ci: Any, where: dict, axes: Sequence[str]) -> tuple[float, float, Any]:
    """The [lo, hi] (and n) of the number at ``where`` in a CI structure, NaN when absent."""
    node = ci
    for i, axis in enumerate(axes):
        if isinstance(node, dict) and "lo" in node and "hi" in node:
            # {"lo": [...], "hi": [...], "n": n}: the remaining levels index into lo and hi
            lo, hi = node["lo"], node["hi"]
            for a in axes[i:]:
                lo, hi = lo[where[a]], hi[where[a]]
            return lo, hi, node.get("n")
        key = where[axis]
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return math.nan, math.nan, None
    if isinstance(node, (list, tuple)) and len(node) == 2:
        return node[0], node[1], None
    return math.nan, math.nan, None


def _run_step(model: str, runs: dict) -> tuple[str, Any]:
    for run, names in (runs or {}).items():
        if model in names:
            return run, checkpoint_step(model) if len(names) > 1 or "@" in model else None
    if "@" in model:
        return model.split("@", 1)[0], checkpoint_step(model)
    return model, None


def _table_rows(probe_name: str, table: Table, data: dict, runs: dict) -> Iterator[dict]:
    """The rows of one declared table of a result's ``data``."""
    ci = data.get(table.ci) if table.ci else None
    for where, value in _walk(data[table.key], table.axes, {}):
        if value is None:
            value = math.nan
        if not _is_number(value):
            continue
        where = dict(where)
        name = table.metric or table.key
        if "metric" in where:
            name = f"{name}.{where.pop('metric')}"
        row = {"probe": probe_name, **where, "metric": name, "value": float(value)}
        if ci is not None:
            lo, hi, n = _ci_at(ci, where, table.axes)
            row["lo"] = math.nan if lo is None else float(lo)
            row["hi"] = math.nan if hi is None else float(hi)
            if n is not None:
                row["n"] = n
        if "model" in row:
            row["run"], row["step"] = _run_step(row["model"], runs)
        yield row


def rows(result, schema=None) -> list[dict]:
    """The rows of one result (see the module doc for the columns).

    Args:
        result: a :class:`~mechinterp.store.results.Result`.
        schema: what declares its tables: an object with ``frames`` (a sequence of
            :class:`Table`) and optionally ``frame_data(data) -> dict`` (the probe object).
            None: the result's own probe (:meth:`~mechinterp.store.results.Result.probe_object`);
            no rows when that probe is not installed.

    Returns:
        One dict per number, keyed by the columns of :data:`COLUMNS` that apply.
    """
    if schema is None:
        try:
            schema = result.probe_object()
        except Exception:  # noqa: BLE001 - an uninstalled probe: no declared tables
            schema = None
    data = result.data
    if hasattr(schema, "frame_data"):  # results nested by position (training-drift's checkpoints)
        data = schema.frame_data(data)
    runs = data.get("runs") or {}
    return [row for table in getattr(schema, "frames", ()) if table.key in data
            for row in _table_rows(result.probe, table, data, runs)]


def to_frame(result, schema=None):
    """One result as a pandas DataFrame in the long schema (columns absent here are dropped).

    Args:
        result: a :class:`~mechinterp.store.results.Result`.
        schema: the object that declares its tables (see :func:`rows`); None: its probe.

    Returns:
        A DataFrame with the columns of :data:`COLUMNS` that apply, in that order.
    """
    import pandas as pd  # pandas

    return order_columns(pd.DataFrame(rows(result, schema)))


def order_columns(df):
    """``df`` with the long schema's columns in order and its integer columns nullable."""
    if df.empty:
        return df
    cols = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    df = df[cols]
    for c in ("layer", "head", "step", "n"):
        if c in df.columns:
            df[c] = df[c].astype("Int64")
    return df.reset_index(drop=True)


def write_parquet(result, folder: Path, schema=None) -> Path | None:
    """``folder/result.parquet`` beside ``result.json`` (None when the probe declares no table
    or no Parquet engine is installed); ``schema`` as in :func:`rows`."""
    df = to_frame(result, schema)
    if df.empty:
        return None
    try:
        path = Path(folder) / PARQUET_FILE
        df.to_parquet(path, index=False)
        return path
    except ImportError:
        return None
