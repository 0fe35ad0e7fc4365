"""``report.md`` and a self-contained ``report.html`` from a compare folder's stored results.

The page opens with the verdict (one row per claim), then how each model was trained and whether
it learned, then a section per probe: what was measured in plain words, the key numbers with their
intervals, the figures, and provenance. The report is one
:class:`~mechinterp.study.document.Document` built by the functions of :data:`SECTIONS` in turn and
rendered twice, as Markdown and as HTML (figures embedded as base64 PNG, so the file makes no
network request and can be mailed as it is).
Nothing here loads a model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..core.summary import fmt as _fmt
from ..core.summary import interval as _ci
from ..errors import UserError
from ..store.results import jsonable
from .claims import HOLM, verdict_word
from .claims.caveats import mid_layer_line, study_caveats
from .document import (
    BREAK,
    Block,
    Bold,
    Bullets,
    Code,
    Document,
    Figure,
    Heading,
    Paragraph,
    Table,
    render_html,
    render_markdown,
)
from .precision_report import gate_blocks


def _seconds(x) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{x:.0f}"


# ----- the verdict -----------------------------------------------------------------------------

VERDICT_CLASS = {"held": "yes", "not held": "no", "inconclusive": "inc", "not measured": "na"}


def claim_cells(c: dict) -> tuple[str, str]:
    """``(effect [95% CI], primary test with p, Holm p, MDE, n)`` of a claim ("" when not
    measured)."""
    p = c.get("primary")
    if not p:
        return "", ""
    if p.get("units") == "log ratio":  # shown as the ratio itself
        effect = f"{_fmt(np.exp(p['effect']))}x {_ci([np.exp(x) for x in p['ci95']])}"
    else:
        effect = f"{_fmt(p['effect'])} {_ci(p['ci95'])} {p.get('units', '')}".strip()
    holm = f", Holm {_fmt(p['p_holm'])}" if p.get("p_holm") is not None else ""
    test = (f"{p['measure']}; {p['test']}; p {_fmt(p['p_value'])}{holm}; MDE (80% power) "
            f"{_fmt(p['mde'])}, needed {_fmt(p['needed'])}; n {p['n']}, {p['n_seeds']} seed(s)")
    return effect, test


def decision_text(claims: list[dict]) -> str:
    """The report's paragraph on how a verdict is decided (with the Holm family's size)."""
    m = max([(c.get("primary") or {}).get("holm_family") or 0 for c in claims] + [0])
    return ("Verdicts: held = the 95% interval excludes 0 on the claimed side and the primary "
            "test's p is below 0.05 after " + HOLM.format(m=m) + "; not held = significant the "
            "other way, or the test had 80% power for the effect the claim needs and the interval "
            "rules it out; inconclusive = neither (the interval spans 0 without that power, or a "
            "condition such as the noise floor or a significant net damage failed); not measured "
            "= the study lacks what the claim reads. Intervals resample seeds, then items. A claim "
            "that does not hold on this model is a finding, not a failure of the suite.")


# ----- key numbers per probe (one markdown bullet each) ------------------------------------------

def _probe_of(res):
    """The probe that made a stored result; None when it is not installed."""
    try:
        return res.probe_object()
    except UserError:
        return None


def plain_text(study, probe: str, default: str = "") -> str:
    """What ``probe`` measured, in the plain words it declares (``default`` when it declares
    none or is not installed)."""
    res = study.results.get(probe)
    return (getattr(_probe_of(res), "plain", None) if res is not None else None) or default


def key_numbers(study, probe: str) -> list[str]:
    """The key numbers of ``probe``'s result in the study, one line each, as the probe's
    ``summary`` writes them ([] when there is no result or the probe declares no summary)."""
    res = study.results.get(probe)
    summary = getattr(_probe_of(res), "summary", None) if res is not None else None
    if summary is None:
        return []
    try:
        return summary(res, study)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        return [f"(summary unavailable: {type(exc).__name__}: {exc})"]


# ----- training section ------------------------------------------------------------------------

def training_rows(study) -> list[dict]:
    """Per variant: how it was trained, and its in-domain accuracy before and after."""
    task = study.results.get("task-accuracy")
    rows = []
    for name, v in study.variants.items():
        row = {"variant": name, "algorithm": v.algorithm or "?", "freeze": v.freeze or "none",
               "steps": v.train.get("steps"), "wall_time_s": v.train.get("wall_time_s")}
        if task is not None:
            final = study.final_name(name, "task-accuracy")
            p = task.data.get("paired", {}).get(final)
            if p:
                row |= {"before": p["base_accuracy"], "after": p["variant_accuracy"],
                        "gain": p["difference"], "gain_ci95": p["difference_ci95"],
                        "n": p["n"]}
        rows.append(row)
    return rows


def _training_figures(study) -> list[tuple[str, Path]]:
    figs = []
    for name, v in study.variants.items():
        folder = Path(v.final) / "training-drift"
        figs += [(f"{name}: {p.stem.replace('_', ' ')}", p) for p in sorted(folder.glob("*.png"))]
    return figs


# ----- the document ---------------------------------------------------------------------------

def _provenance(res) -> str:
    p = res.provenance
    models = ", ".join(f"{n}={m.get('spec')} ({str(m.get('weights_id'))[:14]})"
                       for n, m in p.get("models", {}).items())
    return (f"probe {p.get('probe')} v{p.get('probe_version')}, config {p.get('config_hash')}, "
            f"{p.get('wall_time_s')} s on {p.get('device')}/{p.get('dtype')}, "
            f"created {p.get('created')}; models: {models}")


def _config_text(res) -> str:
    cfg = res.provenance.get("config", {})
    return ", ".join(f"{k}={v}" for k, v in cfg.items() if v not in (None, [], {}))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _intro(study, claims: list[dict]) -> list[Block]:
    variants: list = []
    for name, v in study.variants.items():
        variants += [", "] if variants else []
        variants += [Code(name), f" ({v.kind or 'unknown kind'}: {v.final})"]
    return [Heading(1, f"SFT vs GRPO: {study.base}"),
            Paragraph(("Compare folder ", Code(str(study.out)), ", preset ", Code(study.preset),
                       ". Variants: ", *variants))]


def _verdict(study, claims: list[dict]) -> list[Block]:
    rows = []
    for c in claims:
        effect, test = claim_cells(c)
        rows.append(((Bold(c["id"]), f" {c['title']}"), (verdict_word(c),), (effect,), (test,),
                     (c["statement"],)))
    return [Heading(2, "Verdict"),
            Table(("claim", "verdict", "effect [95% CI]", "primary test", "statement"),
                  tuple(rows), tuple(VERDICT_CLASS[verdict_word(c)] for c in claims)),
            Paragraph((decision_text(claims),))]


def _caveats(study, claims: list[dict]) -> list[Block]:
    return [Heading(2, "Caveats"),
            Bullets(tuple(study_caveats(study, claims)), empty="none generated from the data"),
            Paragraph((mid_layer_line(study),))]


def _training(study, claims: list[dict]) -> list[Block]:
    rows = tuple(tuple((cell,) for cell in (
        r["variant"], r["algorithm"], r["freeze"], _fmt(r["steps"]), _seconds(r["wall_time_s"]),
        _fmt(r.get("before")), _fmt(r.get("after")),
        f"{_fmt(r.get('gain'))} {_ci(r.get('gain_ci95'))}", _fmt(r.get("n"))))
        for r in training_rows(study))
    header = ("variant", "algorithm", "frozen", "steps", "wall time (s)", "in-domain before",
              "after", "gain [95% CI]", "n")
    return [Heading(2, "Training: did each run learn?"), Table(header, rows),
            *(Figure(path, cap, _rel(path, study.out)) for cap, path in _training_figures(study))]


def _probes(study, claims: list[dict]) -> list[Block]:
    blocks: list[Block] = []
    for probe, res in study.results.items():
        blocks += [Heading(2, probe, anchor=True),
                   Paragraph((plain_text(study, probe, res.provenance.get("probe", "")),)),
                   Bullets(tuple(key_numbers(study, probe)))]
        blocks += [Figure(png, png.stem.replace("_", " "), f"{probe}/{png.name}")
                   for png in sorted((study.out / probe).glob("*.png"))]
        blocks.append(Paragraph((f"Options: {_config_text(res)}.", BREAK,
                                 f"Provenance: {_provenance(res)}"), small=True))
    return blocks


#: The report's sections in order: each builds its blocks from the study and the decided claims.
#: A new section is a function appended (or inserted) here.
SECTIONS: list[Callable[..., list[Block]]] = [_intro, _verdict, _caveats, _training,
                                               gate_blocks, _probes]


def build_document(study, claims: list[dict]) -> Document:
    """The report as a document.

    Args:
        study: the :class:`~mechinterp.study.folder.Study`.
        claims: its decided claims.

    Returns:
        A document with the blocks of every section of :data:`SECTIONS`.
    """
    return Document(f"SFT vs GRPO: {study.base}",
                    [block for section in SECTIONS for block in section(study, claims)])


def build_markdown(study, claims: list[dict]) -> str:
    """The report as Markdown (figures linked relative to the study folder)."""
    return render_markdown(build_document(study, claims))


def build_html(study, claims: list[dict]) -> str:
    """The report as one self-contained HTML page."""
    return render_html(build_document(study, claims))


def write_report(study, claims: list[dict]) -> tuple[Path, Path]:
    """Write ``OUT/report.md``, ``OUT/report.html`` and ``OUT/training.json``.

    Args:
        study: the study (its ``out`` is where the files go).
        claims: its decided claims.

    Returns:
        ``(report.md, report.html)`` paths.
    """
    doc = build_document(study, claims)
    md = study.out / "report.md"
    page = study.out / "report.html"
    md.write_text(render_markdown(doc))
    page.write_text(render_html(doc))
    (study.out / "training.json").write_text(json.dumps(
        jsonable(training_rows(study)), indent=1, allow_nan=False) + "\n")
    return md, page
