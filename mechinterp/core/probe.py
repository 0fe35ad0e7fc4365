"""The probe protocol: what a probe is, and the options every probe shares.

A probe is an object with ``name``, ``version``, ``description``, a ``Config`` dataclass (a
:class:`BaseConfig`), ``run(models, data, config) -> Result`` and ``plot(result) -> {name:
Figure}``. It declares its own story: the tables of its result (``frames``, read by
:meth:`Result.to_frame <mechinterp.store.results.Result.to_frame>`), the plain-words text of the
report (``plain``), the report's key numbers (``summary``) and which models a result covers
(``model_names``). Probes never print or save: the runner (:func:`mechinterp.core.runner.run_probe`)
times them, attaches provenance and writes the result store.

Built-in probes live in the top-level ``probes`` package; they and other packages' probes are
found through the ``mechinterp.probes`` entry-point group (:mod:`mechinterp.core.registry`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..store.frames import Table
from ..store.results import Result
from .options import check_config


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


class Probe(Protocol):
    """What the runner, the report and the study ask of a probe."""

    name: str
    version: str
    description: str  # one line: ``probes list``
    plain: str  # what it measures, for a reader who has not read the code (the report)
    Config: type
    frames: Sequence[Table]  # the tables of its result (Result.to_frame)

    def run(self, models, data, config) -> Result: ...

    def plot(self, result: Result) -> dict[str, Any]: ...

    def summary(self, result: Result, study) -> list[str]:
        """The report's key numbers of ``result``, one line each."""

    def model_names(self, data: dict) -> list[str]:
        """The names of the models a result's ``data`` covers."""


def declare(probe, *, plain: str, summary: Callable[[Result, Any], list[str]],
            model_names: Callable[[dict], list[str]]):
    """Attach a probe's story to it: what the report says of it and what the study reads.

    Args:
        probe: the probe object.
        plain: what it measures, in plain words (a paragraph of the report).
        summary: ``summary(result, study) -> lines``: the report's key numbers of a result.
        model_names: ``model_names(data) -> names``: the models a result's data covers.

    Returns:
        ``probe``, with ``plain``, ``summary`` and ``model_names`` set.
    """
    probe.plain, probe.summary, probe.model_names = plain, summary, model_names
    return probe


def _listed(key: str, table: str | None, data: dict) -> list[str]:
    listed = data.get(key)
    if isinstance(listed, list):
        return list(listed)
    keyed = data.get(table) if table is not None else None
    return list(keyed) if isinstance(keyed, dict) else []


def listed_models(key: str, table: str | None = None) -> Callable[[dict], list[str]]:
    """``model_names`` of a probe whose result lists its models under ``key``.

    Args:
        key: the data key of the list (``"models"``: base included; ``"variants"``).
        table: a data key keyed by model name, read when the list is absent (a result written
            by hand, or before the list was stored).

    Returns:
        A function from a result's data to those names ([] when it holds neither); it pickles,
        as a probe object sent to a worker process must.
    """
    return functools.partial(_listed, key, table)
