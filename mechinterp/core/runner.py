"""The one way a probe runs: ``mi.run`` (Python), ``mechinterp run`` / ``eval`` / ``compare`` /
``demo`` (CLI) and the claim tests all come through :func:`run_probe`.

It seeds, times, attaches provenance and, with ``out``, writes ``out/<probe>/`` through the result
store. Two guarantees a long study needs:

* **reuse** (``reuse=True``): a stored result whose probe version, configuration and the content
  of every input it read (each model's weights, config and tokenizer files, each data file) equal
  the requested ones is returned without running; any difference recomputes, and the reason is
  reported ("weights of sft changed", "data file mmlu/test/x.csv changed");
* **nothing else's result is lost**: a stored result of another model set (other names or specs)
  is never replaced unless ``overwrite=True`` (``--overwrite``);
* **commit whole or not at all**: result, arrays, tables and figures go into a temporary sibling
  and are swapped in with one rename, under the out folder's writer lock; a figure that fails to
  draw is recorded (``provenance["figure_errors"]``) and drawn again on reuse.
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

import torch

from ..data import DataSource
from ..data.base import DataLog
from ..data.subset import collect_notes
from ..errors import UserError
from ..models.lineage import training_kind
from ..models.modelset import ModelSet
from ..models.safetensors_io import input_kind
from ..models.zoo import DEFAULT_MODEL
from ..progress import quiet_library_bars
from ..store.hashing import content_hash
from ..store.locking import writer_lock
from ..store.provenance import build_provenance
from ..store.results import (
    RESULT_FILE,
    Result,
    check_out,
    find_results,
    incomplete,
    read_payload,
    read_result,
    remove_temp_siblings,
    write_result,
)
from .options import make_config
from .probe import Probe
from .registry import get_probe


def config_hash(config: Any) -> str:
    """SHA-256 (first 16 hex) of the config's fields, order-independent."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(models) -> dict[str, dict]:
    """``{name: {"spec", "weights_id", "files"}}`` for every model of the set: the spec as
    written and the content hash of every file the model reads (weights, config, tokenizer;
    :func:`mechinterp.models.safetensors_io.model_files`), from the hash cache when unchanged."""
    if models is None:
        return {}
    return {name: {"spec": p["spec"], "weights_id": p["weights_id"], "files": p.get("files", {})}
            for name, p in models.provenance().items()}


def run_kinds(models) -> dict[str, str | None]:
    """``{run: kind}`` from each run's training metadata (``sft``, ``grpo``, ``sft-frozen``; None
    for a model no training run of ours made): figures style runs by it."""
    if models is None or not hasattr(models, "runs"):
        return {}
    return {run: training_kind(models.specs[names[0]].path) if names else None
            for run, names in models.runs.items()}


def other_models(stored: dict, identity: dict) -> str | None:
    """None when a stored result's model set has the same names and specs as ``identity``; else
    how they differ (the stored result then belongs to another study)."""
    spec = {n: m.get("spec") for n, m in stored.items()}
    want = {n: m["spec"] for n, m in identity.items()}
    if spec == want:
        return None
    diffs = [f"{n}: {spec[n]} -> {want[n]}" for n in want if n in spec and spec[n] != want[n]]
    diffs += [f"no {n}" for n in want if n not in spec]
    diffs += [f"also {n}={spec[n]}" for n in spec if n not in want]
    return "stored " + "; ".join(diffs)


def _other_set(stored, identity: dict) -> str | None:
    """:func:`other_models` for a stored identity that names a spec for each model; None for a
    missing or malformed one (that result is recomputed, not protected)."""
    known = isinstance(stored, dict) and all(
        isinstance(m, dict) and isinstance(m.get("spec"), str) for m in stored.values())
    return other_models(stored, identity) if known else None


def _content_change(stored: dict, identity: dict) -> str | None:
    """Which input of which model changed since the stored result (same specs assumed)."""
    for name, now in identity.items():
        old = stored[name].get("files") if isinstance(stored.get(name), dict) else None
        if not isinstance(old, dict):
            return f"no content hashes stored for {name}"
        for f in sorted(set(old) | set(now["files"])):
            if old.get(f) != now["files"].get(f):
                kind = input_kind(f)
                what = {"weights": "weights", "config": f"{f}"}.get(kind, f"tokenizer file {f}")
                return f"{what} of {name} changed"
    return None


def _data_change(stored: dict, data) -> str | None:
    """Which data file the stored result read is missing or changed under the current root."""
    if not isinstance(stored, dict) or not isinstance(stored.get("files", {}), dict):
        return "no data hashes stored"
    root = getattr(data, "root", None)
    if stored.get("hub") and root is not None:
        return "data source changed (the hub then, a data root now)"
    old_root = stored.get("root")
    for path, digest in stored.get("files", {}).items():
        rel = Path(path)
        if old_root is not None:
            try:
                rel = Path(path).relative_to(old_root)
            except ValueError:
                pass
        now = (Path(root) / rel) if root is not None and not rel.is_absolute() else rel
        try:
            same = content_hash(now) == digest
        except OSError:
            return f"data file {rel} is missing"
        if not same:
            return f"data file {rel} changed"
    return None


def why_stale(stored: Result, probe: Probe, chash: str, identity: dict, data=None) -> str | None:
    """None when ``stored`` answers the same question on the same inputs; else the reason:
    probe version, configuration, the content of a model's weights, config or tokenizer files,
    or of a data file it read."""
    prov = stored.provenance
    if prov.get("probe_version") != probe.version:
        return f"probe version {prov.get('probe_version')} -> {probe.version}"
    if prov.get("config_hash") != chash:
        return "configuration changed"
    stored_models = prov.get("model_identity")
    if not isinstance(stored_models, dict) or not all(isinstance(m, dict)
                                                      for m in stored_models.values()):
        return "no model identity stored"
    if other := other_models(stored_models, identity):
        return f"other models ({other})"
    return _content_change(stored_models, identity) or _data_change(prov.get("data"), data)


def _assess(folder: Path, probe: Probe, chash: str, identity: dict, data, overwrite: bool):
    """``(stored, stale, redraw)`` for the result in ``folder``: the stored Result (None when
    there is none or it is unreadable), why it cannot be reused (None: it can), and whether only
    its figures need drawing again. Refuses to go on over another model set's result."""
    if not (folder / RESULT_FILE).exists():
        return None, None, False
    try:
        payload = read_payload(folder)
        bad = incomplete(folder, payload)
        stored = read_result(folder)
    except UserError as exc:
        return None, f"the stored result is unreadable: {exc.message}", False
    other = _other_set(stored.provenance.get("model_identity"), identity)
    if other is not None and not overwrite:
        raise UserError(f"{folder} holds a result of other models ({other})",
                        "pass --overwrite (overwrite=True) to replace it, or use another --out")
    try:
        stale = why_stale(stored, probe, chash, identity, data)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        stale = f"its provenance is malformed ({type(exc).__name__})"
    if stale is None and bad and not all(b.endswith((".png", ".pdf")) for b in bad):
        stale = f"its files {', '.join(bad[:3])} are missing or incomplete"
    redraw = bool(bad) or bool(stored.provenance.get("figure_errors"))
    return stored, stale, redraw


def _plot(probe: Probe, result: Result, say) -> dict | None:
    """The probe's figures of ``result``; a failure is reported and recorded in its provenance."""
    from ..plotting.style import house_style  # matplotlib

    result.provenance.pop("figure_errors", None)
    try:
        with house_style():
            return probe.plot(result)
    except Exception as exc:  # noqa: BLE001 - a plotting bug must not cost a finished run
        msg = f"{type(exc).__name__}: {exc}"
        say(f"{probe.name}: figures failed ({msg}); the result is saved without them")
        result.provenance["figure_errors"] = [msg]
        return None


def _reuse(probe: Probe, folder: Path, out: Path, chash: str, identity: dict, data,
           options: dict, say, echo) -> Result | None:
    """The stored result in ``folder`` when ``options["reuse"]`` allows it and it answers the
    same question on the same inputs (its figures drawn again where they are missing); else
    None, after saying why a stored result will be replaced."""
    with writer_lock(out):
        remove_temp_siblings(folder)
        stored, stale, redraw = _assess(folder, probe, chash, identity, data, options["overwrite"])
        if stored is not None and stale is None and options["reuse"]:
            stored.made_by = probe
            if options["draw"] and (redraw or stored.provenance.get("drawn") is False):
                say(f"{probe.name}: drawing the figures of {folder} again")
                stored.provenance["drawn"] = True
                write_result(stored, folder, _plot(probe, stored, say))
            stored.provenance["reused"] = True
            if echo:
                echo(f"{probe.name}: reusing {folder / RESULT_FILE} (same configuration, "
                     "model files and data)")
            return stored
        if stale is not None:
            say(f"{probe.name}: replacing the result in {folder} ({stale})")
    return None


def _execute(probe: Probe, models, data, config, say) -> tuple[Result, dict, list, float]:
    """Run the probe seeded and timed: ``(result, the data it read, notes, seconds)``. The data
    log counts this probe's own reads (a shared log gets them added afterwards)."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    scope = models.run_scope() if hasattr(models, "run_scope") else contextlib.nullcontext()
    shared_log = getattr(data, "log", None)
    if shared_log is not None:
        data.log = DataLog(root=getattr(data, "root", None))
    try:
        # notices such as a --limit larger than the set: said at once, recorded in the provenance
        with scope, collect_notes(lambda note: say(f"{probe.name}: {note}")) as notes:
            result = probe.run(models, data, config)
    finally:
        if shared_log is not None:
            mine, data.log = data.log, shared_log
            shared_log.files.update(mine.files)
            shared_log.hub += [h for h in mine.hub if h not in shared_log.hub]
    read = mine.to_json() if shared_log is not None else {}
    return result, read, notes, time.perf_counter() - start


def _provenance(probe: Probe, models, config, chash: str, identity: dict, read: dict,
                notes: list, wall: float) -> dict:
    """What the runner records of a run (the probe's own provenance keys are added after it)."""
    placement = {k: v for k, v in getattr(models, "placement", {}).items()
                 if k != "offload_folder"}
    return build_provenance(
        probe.name, probe.version, config=dataclasses.asdict(config), config_hash=chash,
        model_identity=identity, run_kinds=run_kinds(models), placement=placement,
        wall_time_s=round(wall, 3), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"notes": notes} if notes else {}),
        models=models.provenance() if models is not None else {}, data=read, seed=config.seed,
        device=getattr(models, "device", None) or "auto",
        dtype=getattr(models, "dtype", None) or "auto")


def _commit(probe: Probe, result: Result, folder: Path, out: Path, identity: dict, draw: bool,
            overwrite: bool, say) -> None:
    """Write ``result`` (and its figures when ``draw``) into ``folder``, refusing to replace a
    result of other models that another run stored meanwhile."""
    result.provenance["drawn"] = draw
    figures = _plot(probe, result, say) if draw else None
    with writer_lock(out):
        try:
            now = read_result(folder).provenance.get("model_identity")
        except UserError:
            now = None
        if _other_set(now, identity) and not overwrite:
            raise UserError(f"{folder} was written by another run of other models while "
                            "this one ran", "pass --overwrite, or use another --out")
        write_result(result, folder, figures)
    if result.provenance.get("figure_errors"):
        say(f"{probe.name}: {len(result.provenance['figure_errors'])} figure(s) failed; "
            f"the result is saved in {folder} and a re-run with reuse draws them again")


def run_probe(probe: Probe | str, models, data, config=None, out: Path | str | None = None,
              draw: bool = True, reuse: bool = False, echo=None, overwrite: bool = False) -> Result:
    """Run one probe: the one path every command, ``mi.run`` and the claim tests take.

    Args:
        probe: a probe object or the name of an installed one.
        models: a :class:`~mechinterp.models.ModelSet` (None for a probe that reads no model).
        data: a :class:`~mechinterp.data.DataSource`; None: ``$MECHINTERP_DATA``, else the hub.
        config: the probe's Config (None: its defaults).
        out: a results folder: the result goes to ``out/<probe>/``, checked before any work and
            written whole, figures included, under ``out``'s writer lock. None: nothing is saved.
        draw: draw and save the figures with the result.
        reuse: return a stored result of the same probe version, configuration and input
            contents instead of recomputing it.
        echo: a print-like function told about reuse and replacement (default: a warning).
        overwrite: replace a stored result of *other models* (never replaced otherwise).

    Returns:
        The :class:`~mechinterp.store.results.Result`, with provenance and its probe attached.

    Raises:
        UserError: bad options or input, or ``out`` holds another model set's result.
    """
    probe = get_probe(probe) if isinstance(probe, str) else probe
    config = make_config(probe) if config is None else config
    if data is None:  # as the CLI does: $MECHINTERP_DATA, else the hub (a clear error offline)
        data = DataSource.from_option(None)
    say = echo or (lambda msg: warnings.warn(msg, stacklevel=3))
    folder = Path(out) / probe.name if out is not None else None
    if out is not None:
        check_out(out)
    chash, identity = config_hash(config), model_identity(models)
    if folder is not None and Path(out).is_dir():  # nothing stored (and nothing made) otherwise
        options = {"reuse": reuse, "draw": draw, "overwrite": overwrite}
        stored = _reuse(probe, folder, Path(out), chash, identity, data, options, say, echo)
        if stored is not None:
            return stored
    result, read, notes, wall = _execute(probe, models, data, config, say)
    result.made_by = probe  # figures() and to_frame() of a probe that is not installed
    result.provenance = {**_provenance(probe, models, config, chash, identity, read, notes, wall),
                         **result.provenance}
    if folder is not None:
        _commit(probe, result, folder, Path(out), identity, draw, overwrite, say)
    return result


def draw_figures(probe: Probe, result: Result, folder: Path, say=print) -> list[Path]:
    """Draw ``result``'s figures and commit them with it into ``folder`` (one atomic write); a
    failure is reported and recorded in the result."""
    write_result(result, folder, _plot(probe, result, say))
    return [folder / f for files in read_payload(folder).get("figures", {}).values() for f in files]


def run(probe: str | Probe, base=None, variants: dict[str, Any] | None = None, *,
        data=None, out: Path | str | None = None, device: str = "auto", dtype: str = "auto",
        device_map=None, max_memory: dict | str | None = None, reuse: bool = False,
        draw: bool = True, echo=None, overwrite: bool = False, **options) -> Result:
    """Run one probe from Python: ``mi.run("weight-change", base="smollm2-135m-instruct",
    variants={"sft": "runs/sft@all"}, out="results")``.

    Args:
        probe: a probe's name or a probe object (a notebook's own probe too).
        base: the base model's spec (default: the built-in model), or a ready ``ModelSet``
            (then ``variants`` must be None).
        variants: ``{name: spec}`` of the fine-tunes (``"runs/sft@all"``: every checkpoint).
        data: a DataSource, a data-root path, or None (``$MECHINTERP_DATA``, else the hub).
        out: a results folder; the result goes to ``out/<probe>/`` (None: nothing is saved).
        device, dtype: where and in which precision the models run (``"auto"``: the best one).
        device_map, max_memory: ``device_map="auto"`` (with e.g. ``max_memory={0: "70GiB",
            1: "70GiB"}``) spreads a model too large for one device over the GPUs (accelerate's
            big-model placement).
        reuse, draw, echo, overwrite: as in :func:`run_probe`.
        options: the probe's Config fields (``limit``, ``seed`` and its own), checked by name
            and type.

    Returns:
        The :class:`~mechinterp.store.results.Result`: ``res["key"]``, ``res.to_frame()``,
        ``res.figures()``.

    Raises:
        UserError: an unknown probe or option, a bad value, or an unusable ``out``.
    """
    quiet_library_bars()  # one bar per model load from transformers floods a notebook
    probe = get_probe(probe) if isinstance(probe, str) else probe
    config = make_config(probe, options)
    if out is not None:
        check_out(out)  # before any model is resolved or loaded
    if isinstance(base, ModelSet):
        if variants is not None:
            raise UserError("pass either a ModelSet or base/variants specs, not both",
                            "drop variants= when base is a ModelSet")
        models = base
    else:
        models = ModelSet(base or DEFAULT_MODEL, variants or {}, device=device, dtype=dtype,
                          device_map=device_map, max_memory=max_memory)
    source = data if isinstance(data, DataSource) else DataSource.from_option(data)
    return run_probe(probe, models, source, config, out=out, draw=draw, reuse=reuse, echo=echo,
                     overwrite=overwrite)


def redraw(folder: Path | str) -> list[Path]:
    """Re-draw the figures of every stored result under ``folder`` (no model needed), each
    committed with its result in one atomic write under the folder's writer lock; a stored
    result whose probe version differs from the installed probe is refused, not mis-drawn."""
    written: list[Path] = []
    for res_dir in find_results(Path(folder)):
        with writer_lock(res_dir.parent):
            result = read_result(res_dir)
            probe = get_probe(result.probe)
            stored = result.provenance.get("probe_version")
            if stored is not None and stored != probe.version:
                raise UserError(f"{res_dir} was written by {probe.name} version {stored}, "
                                f"installed is version {probe.version}",
                                "re-run the probe to refresh the result")
            written += draw_figures(probe, result, res_dir, say=lambda m: None)
            if errors := result.provenance.get("figure_errors"):
                raise UserError(f"{probe.name}'s figures cannot be drawn from {res_dir}/result.json "
                                f"({errors[0]}); the file looks damaged",
                                "re-run the probe to rewrite it")
    return written
