"""The one way a probe runs: ``mi.run`` (Python), ``mechinterp run`` / ``eval`` / ``compare`` /
``demo`` (CLI) and the claim tests all come through :func:`run_probe`.

It seeds, times, attaches provenance and, with ``out``, writes ``out/<probe>/`` through the result
store. Two guarantees a long study needs:

* **reuse** (``reuse=True``): a stored result whose probe version, configuration and model weights
  (spec and weight hash of every model) equal the requested ones is returned without running; any
  difference recomputes, and the reason is reported;
* **nothing finished is lost**: ``result.json`` is written before figures are drawn; a figure that
  fails to draw is reported (``provenance["figure_errors"]``), never a lost run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import UserError
from .probe import Probe, get_probe, make_config, package_versions
from .results import RESULT_FILE, Result, read_result, save_figures, write_result


def config_hash(config: Any) -> str:
    """SHA-256 (first 16 hex) of the config's fields, order-independent."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(models) -> dict[str, dict[str, str]]:
    """``{name: {"spec", "weights_id"}}`` for every model of the set (no weights are read)."""
    if models is None:
        return {}
    return {name: {"spec": p["spec"], "weights_id": p["weights_id"]}
            for name, p in models.provenance().items()}


def run_kinds(models) -> dict[str, str | None]:
    """``{run: kind}`` from each run's training metadata (``sft``, ``grpo``, ``sft-frozen``; None
    for a model no training run of ours made): figures style runs by it."""
    from .models.lineage import training_kind

    if models is None or not hasattr(models, "runs"):
        return {}
    return {run: training_kind(models.specs[names[0]].path) if names else None
            for run, names in models.runs.items()}


def why_stale(stored: Result, probe: Probe, chash: str, identity: dict) -> str | None:
    """None when ``stored`` answers the same question on the same weights; else the reason."""
    prov = stored.provenance
    if prov.get("probe_version") != probe.version:
        return f"probe version {prov.get('probe_version')} -> {probe.version}"
    if prov.get("config_hash") != chash:
        return "configuration changed"
    if prov.get("model_identity") != identity:
        return "models or their weights changed"
    if prov.get("figure_errors"):
        return "its figures failed to draw"
    return None


def run_probe(probe: Probe | str, models, data, config=None, out: Path | str | None = None,
              draw: bool = True, reuse: bool = False, echo=None) -> Result:
    """Run ``probe`` on ``models`` (a ModelSet) with ``data`` (a DataSource) and ``config``.

    With ``out`` the result goes to ``out/<probe>/``; with ``reuse`` an equal stored result is
    returned instead of recomputed. ``echo`` (a print-like function) hears about reuse and about
    replacing a stored result of another configuration or other models; default: a warning.
    """
    import torch

    from .data import DataSource
    from .data.subset import collect_notes

    probe = get_probe(probe) if isinstance(probe, str) else probe
    config = make_config(probe) if config is None else config
    if data is None:  # as the CLI does: $MECHINTERP_DATA, else the hub (a clear error offline)
        data = DataSource.from_option(None)
    say = echo or (lambda msg: warnings.warn(msg, stacklevel=3))
    chash, identity = config_hash(config), model_identity(models)
    folder = Path(out) / probe.name if out is not None else None
    if folder is not None and (folder / RESULT_FILE).exists():
        try:
            stored = read_result(folder)
            stale = why_stale(stored, probe, chash, identity)
        except UserError:
            stored, stale = None, "the stored result is unreadable"
        if stale is None and reuse:
            stored.provenance["reused"] = True
            stored._probe = probe
            if echo:
                echo(f"{probe.name}: reusing {folder / RESULT_FILE} (same configuration and weights)")
            return stored
        if stale is not None:
            say(f"{probe.name}: replacing the result in {folder} ({stale})")

    torch.manual_seed(config.seed)
    start = time.perf_counter()
    scope = models.run_scope() if hasattr(models, "run_scope") else contextlib.nullcontext()
    # notices such as a --limit larger than the set: said at once, recorded in the provenance
    with scope, collect_notes(lambda note: say(f"{probe.name}: {note}")) as notes:
        result = probe.run(models, data, config)
    wall = time.perf_counter() - start
    result._probe = probe  # figures() and to_frame() of a probe that is not installed
    result.provenance = {
        "probe": probe.name,
        "probe_version": probe.version,
        "config": dataclasses.asdict(config),
        "config_hash": chash,
        "model_identity": identity,
        "models": models.provenance() if models is not None else {},
        "run_kinds": run_kinds(models),
        "device": str(getattr(models, "device", None) or "auto"),
        "dtype": str(getattr(models, "dtype", None) or "auto"),
        "placement": {k: v for k, v in getattr(models, "placement", {}).items()
                      if k != "offload_folder"},
        "data": data.log.to_json() if data is not None else {},
        "seed": config.seed,
        "packages": package_versions(),
        "wall_time_s": round(wall, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"notes": notes} if notes else {}),
        **result.provenance,
    }
    if folder is not None:
        write_result(result, folder)
        if draw:
            draw_figures(probe, result, folder, say)
    return result


def draw_figures(probe: Probe, result: Result, folder: Path, say=print) -> list[Path]:
    """Best-effort figures for a result already on disk; a failure is reported and recorded."""
    from .plotting.style import house_style

    try:
        with house_style():
            figures = probe.plot(result)
        return save_figures(figures, folder)
    except Exception as exc:  # noqa: BLE001 - a plotting bug must not cost a finished run
        msg = f"{type(exc).__name__}: {exc}"
        say(f"{probe.name}: figures failed ({msg}); the result is saved in {folder}")
        result.provenance["figure_errors"] = [msg]
        write_result(result, folder)
        return []


def run(probe: str | Probe, base=None, variants: dict[str, Any] | None = None, *,
        data=None, out: Path | str | None = None, device: str = "auto", dtype: str = "auto",
        device_map=None, max_memory: dict | str | None = None, reuse: bool = False,
        draw: bool = True, echo=None, **options) -> Result:
    """Run one probe from Python: ``mi.run("weight-change", base="smollm2-135m-instruct",
    variants={"sft": "runs/sft@all"}, out="results")``.

    ``base`` is a spec (default: the built-in model) or a ready ``ModelSet`` (then ``variants``
    must be None); ``data`` a DataSource, a data-root path or None (``$MECHINTERP_DATA``);
    ``options`` are the probe's Config fields (``limit``, ``seed`` and the probe's own), checked by
    name and type. ``device_map="auto"`` (with ``max_memory``, e.g. ``{0: "70GiB", 1: "70GiB"}``)
    spreads models larger than one device over the GPUs (accelerate's big-model placement).
    """
    from .data import DataSource
    from .models.modelset import ModelSet
    from .models.zoo import DEFAULT_MODEL
    from .progress import quiet_library_bars

    quiet_library_bars()  # one bar per model load from transformers floods a notebook
    probe = get_probe(probe) if isinstance(probe, str) else probe
    config = make_config(probe, options)
    if isinstance(base, ModelSet):
        if variants is not None:
            raise UserError("pass either a ModelSet or base/variants specs, not both",
                            "drop variants= when base is a ModelSet")
        models = base
    else:
        models = ModelSet(base or DEFAULT_MODEL, variants or {}, device=device, dtype=dtype,
                          device_map=device_map, max_memory=max_memory)
    source = data if isinstance(data, DataSource) else DataSource.from_option(data)
    return run_probe(probe, models, source, config, out=out, draw=draw, reuse=reuse, echo=echo)


def redraw(folder: Path | str) -> list[Path]:
    """Re-draw the figures of every stored result under ``folder`` (no model needed); a stored
    result whose probe version differs from the installed probe is refused, not mis-drawn."""
    from .plotting.style import house_style
    from .results import find_results

    written: list[Path] = []
    for res_dir in find_results(Path(folder)):
        result = read_result(res_dir)
        probe = get_probe(result.probe)
        stored = result.provenance.get("probe_version")
        if stored is not None and stored != probe.version:
            raise UserError(f"{res_dir} was written by {probe.name} version {stored}, installed is "
                            f"version {probe.version}", "re-run the probe to refresh the result")
        with house_style():
            try:
                figures = probe.plot(result)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise UserError(f"{probe.name}'s figures cannot be drawn from {res_dir}/result.json "
                                f"({type(exc).__name__}: {exc}); the file looks damaged",
                                "re-run the probe to rewrite it") from exc
        written += save_figures(figures, res_dir)
    return written
