"""``report.md`` and a self-contained ``report.html`` from a compare folder's stored results.

The page opens with the verdict (one row per claim), then how each model was trained and whether
it learned, then a section per probe: what was measured in plain words, the key numbers with their
intervals, the figures, and provenance. Figures are embedded in the HTML as base64 PNG, so the file
makes no network request and can be mailed as it is. Nothing here loads a model.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np

from ..core.summary import fmt as _fmt
from ..core.summary import interval as _ci
from ..errors import UserError
from .claims import HOLM
from .claims.caveats import mid_layer_line, study_caveats

def _seconds(x) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{x:.0f}"


# ----- the verdict -----------------------------------------------------------------------------

VERDICT_CLASS = {"held": "yes", "not held": "no", "inconclusive": "inc", "not measured": "na"}


def verdict_word(c: dict) -> str:
    return c.get("verdict") or {True: "held", False: "not held", None: "not measured"}[c["held"]]


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
    m = max([(c.get("primary") or {}).get("holm_family") or 0 for c in claims] + [0])
    return ("Verdicts: held = the 95% interval excludes 0 on the claimed side and the primary "
            "test's p is below 0.05 after " + HOLM.format(m=m) + "; not held = significant the "
            "other way, or the test had 80% power for the effect the claim needs and the interval "
            "rules it out; inconclusive = neither (the interval spans 0 without that power, or a "
            "condition such as the noise floor or a significant net damage failed); not measured "
            "= the study lacks what the claim reads. Intervals resample seeds, then items. A claim "
            "that does not hold on this model is a finding, not a failure of the suite.")


# ----- what each probe says of its result (the probe declares it) -----------------------------

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


# ----- writing ---------------------------------------------------------------------------------

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


def md_cell(value) -> str:
    """A value as one Markdown table cell: a ``|`` (as in ``||dW||``) would end the cell and a
    line break the row, so pipes are escaped and line breaks become spaces."""
    return " ".join(str(value).split()).replace("|", "\\|")


def build_markdown(study, claims: list[dict]) -> str:
    lines = [f"# SFT vs GRPO: {study.base}", "",
             f"Compare folder `{study.out}`, preset `{study.preset}`. Variants: "
             + ", ".join(f"`{n}` ({v.kind or 'unknown kind'}: {v.final})"
                         for n, v in study.variants.items()), "", "## Verdict", "",
             "| claim | verdict | effect [95% CI] | primary test | statement |",
             "|---|---|---|---|---|"]
    for c in claims:
        effect, test = claim_cells(c)
        lines.append(f"| **{c['id']}** {md_cell(c['title'])} | {verdict_word(c)} | "
                     f"{md_cell(effect)} | {md_cell(test)} | {md_cell(c['statement'])} |")
    lines += ["", decision_text(claims), "", "## Caveats", ""]
    lines += [f"- {x}" for x in study_caveats(study, claims)] or ["- none generated from the data"]
    lines += ["", mid_layer_line(study), "",
              "## Training: did each run learn?", "",
              "| variant | algorithm | frozen | steps | wall time (s) | in-domain before | after | "
              "gain [95% CI] | n |", "|---|---|---|---|---|---|---|---|---|"]
    for r in training_rows(study):
        lines.append(f"| {md_cell(r['variant'])} | {md_cell(r['algorithm'])} | "
                     f"{md_cell(r['freeze'])} | {_fmt(r['steps'])} | "
                     f"{_seconds(r['wall_time_s'])} | {_fmt(r.get('before'))} | {_fmt(r.get('after'))} | "
                     f"{_fmt(r.get('gain'))} {_ci(r.get('gain_ci95'))} | {_fmt(r.get('n'))} |")
    for cap, path in _training_figures(study):
        lines += ["", f"![{cap}]({_rel(path, study.out)})"]
    for probe, res in study.results.items():
        lines += ["", f"## {probe}", "", plain_text(study, probe, res.provenance.get("probe", "")), ""]
        lines += [f"- {x}" for x in key_numbers(study, probe)]
        for png in sorted((study.out / probe).glob("*.png")):
            lines += ["", f"![{png.stem}]({probe}/{png.name})"]
        lines += ["", f"<sub>Options: {_config_text(res)}. Provenance: {_provenance(res)}</sub>"]
    return "\n".join(lines) + "\n"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;
padding-bottom:.2em;margin-top:2em}table{border-collapse:collapse;margin:1em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.35em .6em;vertical-align:top}th{background:#f3f3f3}
.yes{background:#e3f4e3}.no{background:#fbe6e6}.inc{background:#fdf5d8}.na{background:#eee}img{max-width:100%;
border:1px solid #eee;margin:.5em 0}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
.prov{color:#666;font-size:.8em}code{background:#f5f5f5;padding:0 .2em}"""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def build_html(study, claims: list[dict]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>SFT vs GRPO: {e(study.base)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>SFT vs GRPO on {e(study.base)}</h1>",
             f"<p>Compare folder <code>{e(str(study.out))}</code>, preset <code>{e(study.preset)}"
             "</code>. Variants: " + ", ".join(f"<code>{e(n)}</code> ({e(v.kind or 'unknown kind')})"
                                                for n, v in study.variants.items()) + ".</p>",
             "<h2>Verdict</h2><table><tr><th>claim</th><th>verdict</th><th>effect [95% CI]</th>"
             "<th>primary test</th><th>numbers</th></tr>"]
    for c in claims:
        effect, test = claim_cells(c)
        parts.append(f"<tr class='{VERDICT_CLASS[verdict_word(c)]}'><td><b>{e(c['id'])}</b> "
                     f"{e(c['title'])}</td><td>{e(verdict_word(c))}</td><td>{e(effect)}</td>"
                     f"<td>{e(test)}</td><td>{e(c['statement'])}</td></tr>")
    parts.append(f"</table><p>{e(decision_text(claims))}</p><h2>Caveats</h2><ul>")
    parts += [f"<li>{e(x)}</li>" for x in study_caveats(study, claims)] or [
        "<li>none generated from the data</li>"]
    parts.append(f"</ul><p>{e(mid_layer_line(study))}</p>")
    parts.append("<h2>Training: did each run learn?</h2><table><tr><th>variant</th><th>algorithm"
                 "</th><th>frozen</th><th>steps</th><th>wall time (s)</th><th>in-domain before</th>"
                 "<th>after</th><th>gain [95% CI]</th><th>n</th></tr>")
    for r in training_rows(study):
        parts.append("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
            r["variant"], r["algorithm"], r["freeze"], _fmt(r["steps"]), _seconds(r["wall_time_s"]),
            _fmt(r.get("before")), _fmt(r.get("after")),
            f"{_fmt(r.get('gain'))} {_ci(r.get('gain_ci95'))}", _fmt(r.get("n")))) + "</tr>")
    parts.append("</table>")
    parts += [_img(p, cap) for cap, p in _training_figures(study)]
    for probe, res in study.results.items():
        parts.append(f"<h2 id='{e(probe)}'>{e(probe)}</h2><p>{e(plain_text(study, probe))}</p><ul>")
        parts += [f"<li>{e(x)}</li>" for x in key_numbers(study, probe)]
        parts.append("</ul>")
        parts += [_img(p, p.stem.replace("_", " ")) for p in sorted((study.out / probe).glob("*.png"))]
        parts.append(f"<p class='prov'>Options: {e(_config_text(res))}.<br>"
                     f"Provenance: {e(_provenance(res))}</p>")
    parts.append("</body></html>")
    page = "\n".join(parts)
    assert not re.search(r"""(src|href)=["']https?:""", page), "the report must not fetch anything"
    return page


def write_report(study, claims: list[dict]) -> tuple[Path, Path]:
    md = study.out / "report.md"
    page = study.out / "report.html"
    md.write_text(build_markdown(study, claims))
    page.write_text(build_html(study, claims))
    from ..store.results import _jsonable

    (study.out / "training.json").write_text(json.dumps(
        _jsonable(training_rows(study)), indent=1, allow_nan=False) + "\n")
    return md, page
