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
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .claims import HOLM, _floats, mean_change
from .claims.caveats import mid_layer_line, study_caveats
from .precision_report import gate_figures, html_section, markdown_section

#: What each probe measured, for a reader who has not read the code.
PLAIN: dict[str, str] = {
    "weight-change": "How far each matrix moved: ||W_variant - W_base||_F / ||W_base||_F per layer "
                     "and matrix kind, at every checkpoint, and how sparse the update is.",
    "kl-drift": "How far each model's next-token distribution moved from the base's, teacher-forced "
                "on held-out in-domain items (the arithmetic task in the training prompt format): "
                "mean over answer tokens of KL(base || model), in nats.",
    "task-accuracy": "In-domain accuracy: greedy answers to held-out arithmetic questions in the "
                     "training prompt format, scored by the same answer extraction as the GRPO "
                     "reward; paired against the base on the same items.",
    "mmlu": "General knowledge: MMLU in cloze format (log-likelihood of each answer's text after "
            "the question, as lm-evaluation-harness scores it) on a fixed stratified sample, "
            "paired against the base item by item.",
    "attention-shift": "How differently each head attends: Jensen-Shannon divergence between the "
                       "base's and the variant's attention patterns on the same prompts.",
    "mlp-patching": "Cross-model activation patching: the base's activation at one layer is patched "
                    "into the variant; recovery 1 means the variant then answers as the base does.",
    "causal-trace": "ROME causal tracing: subject tokens are corrupted with noise and the clean "
                    "hidden state / MLP / attention output restored at one (token, layer); the "
                    "average indirect effect shows where a fact is recalled.",
    "damage-attribution": "Which layers carry SFT's MMLU damage: items whose gold-answer margin "
                          "dropped are re-scored with the base's MLP (or attention) output patched in "
                          "per layer; the share of the margin drop each layer gives back.",
    "activation-diff": "The activation-difference lens: the mean difference of the residual stream "
                       "(variant minus base) over the first tokens of neutral text, per layer; its "
                       "norm, the tokens it promotes when read through the unembedding, and how "
                       "much of KL(base || variant) on held-out text disappears when it is added to "
                       "the base's residual stream at one layer.",
    "logit-lens": "The logit lens across models: each layer's residual stream read through the "
                  "final norm and unembedding, for base and variants on the same prompts; "
                  "KL(base lens || variant lens) per layer and the gold answer's rank per layer.",
    "stitch": "Weight-space module swaps: a model that takes one block of modules (attention or "
              "MLP, early/mid/late third of the layers) from the fine-tune and the rest from the "
              "base, or the reverse; KL from each parent, MMLU cloze and in-domain accuracy on "
              "the same items - which modules carry the new skill, which carry the damage.",
    "update-geometry": "The update's precision and geometry per layer and matrix: the share of "
                       "entries exactly unchanged, unchanged once stored in bf16, or within a "
                       "tolerance (what 'RL updates are sparse' depends on); how far the top-k "
                       "singular subspaces rotated, how much the top-k singular values moved, how "
                       "much of ||dW||^2 lies in the base's top-k subspace against a random "
                       "update's share, and the effective / stable rank of dW.",
}


def _seconds(x) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{x:.0f}"


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}"
    return str(x)


def _ci(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""


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


# ----- key numbers per probe (one markdown bullet each) ------------------------------------------

def _weight_change(study, d) -> list[str]:
    out = []
    for v in study.variants:
        name = study.final_name(v, "weight-change")
        rel = d["relative_change"].get(name)
        if rel:
            kinds = sorted(rel, key=lambda m: -float(np.nanmean(_floats(rel[m]))))
            out.append(f"{name}: mean relative change {_fmt(mean_change(rel))}; most changed "
                       + ", ".join(f"{m} {_fmt(float(np.nanmean(_floats(rel[m]))))}" for m in kinds[:3]))
    return out


def _kl(study, d) -> list[str]:
    out = []
    for name, kl in d["kl"].items():
        sem = d.get("kl_sem", {}).get(name)
        half = 1.96 * sem if sem is not None else None
        ci = f" [{_fmt(kl - half)}, {_fmt(kl + half)}]" if half is not None and kl is not None else ""
        out.append(f"{name}: KL {_fmt(kl)}{ci} nats/token over {d.get('n_items')} items")
    return out


def _paired_line(name: str, acc, ci, p: dict | None) -> str:
    line = f"{name}: accuracy {_fmt(acc)} {_ci(ci)}"
    if p:
        line += (f"; vs base {p['difference']:+.3f} {_ci(p['difference_ci95'])}, McNemar p "
                 f"{_fmt(p['mcnemar']['p_value'])}, flips right->wrong {p['right_to_wrong']}, "
                 f"wrong->right {p['wrong_to_right']}")
    return line


def _task(study, d) -> list[str]:
    return [_paired_line(n, d["accuracy"][n], d["ci95"][n], d.get("paired", {}).get(n))
            + (f"; format ok {_fmt(d['format_rate'][n])}" if "format_rate" in d else "")
            for n in d["models"]]


def _mmlu(study, d) -> list[str]:
    fmt = d["formats"][0]
    return [f"({d['n_items']} items, {fmt})"] + [
        _paired_line(n, d["accuracy"][n][fmt], d["ci95"][n][fmt],
                     d.get("paired", {}).get(n, {}).get(fmt)) for n in d["models"]]


def _attention(study, d) -> list[str]:
    out = []
    for name, js in d["js"].items():
        a = np.asarray(_nested_floats(js))
        layer, head = np.unravel_index(np.nanargmax(a), a.shape)
        out.append(f"{name}: mean JS {_fmt(float(np.nanmean(a)))}, largest at layer {layer} head "
                   f"{head} ({_fmt(float(a[layer, head]))}) over {d.get('n_prompts')} prompts")
    return out


def _nested_floats(x):
    if isinstance(x, list):
        return [_nested_floats(v) for v in x]
    return np.nan if x is None else float(x)


def _patching(study, d) -> list[str]:
    out = []
    for name, sites in d["recovery"].items():
        parts = []
        for site, dirs in sites.items():
            rec = _floats(dirs.get("denoise", []))
            if rec.size and np.isfinite(rec).any():
                k = int(np.nanargmax(rec))
                ci = d.get("recovery_ci95", {}).get(name, {}).get(site, {}).get("denoise")
                band = (f" [{_fmt(ci[k][0])}, {_fmt(ci[k][1])}]"
                        if ci and ci[k] and None not in ci[k] else "")
                parts.append(f"{site} best at layer {k} ({_fmt(float(rec[k]))}{band})")
        out.append(f"{name}: denoising recovery " + "; ".join(parts)
                   + f" ({d.get('n_prompts')} prompts)")
    return out


def _trace(study, d) -> list[str]:
    out = []
    for name, kinds in d["aie"].items():
        parts = []
        for kind, groups in kinds.items():
            best = max(((float(np.nanmax(_floats(v))), g, int(np.nanargmax(_floats(v))))
                        for g, v in groups.items() if np.isfinite(_floats(v)).any()), default=None)
            if best:
                parts.append(f"{kind} peak AIE {_fmt(best[0])} at {best[1]} layer {best[2]}")
        out.append(f"{name} ({d['n_facts'].get(name)} facts): " + "; ".join(parts))
    return out


def _damage(study, d) -> list[str]:
    out = [f"format {d.get('format', 'letter')}"]
    for name in d.get("n_failures", {}):
        line = f"{name}: {d['n_failures'][name]} flipped failures"
        if "n_damaged" in d:
            line += (f", {d['n_damaged'].get(name)} items with a margin drop (mean drop "
                     f"{_fmt(d.get('margin_drop', {}).get(name))} "
                     f"{_ci(d.get('margin_drop_ci95', {}).get(name))})")
        top = (d.get("top_layers_margin") or d.get("top_layers") or {}).get(name)
        if top:
            line += f"; layers that give back most: {top[:5]}"
        out.append(line)
    return out


def _activation_diff(study, d) -> list[str]:
    out = []
    for v in d["variants"]:
        norm = _floats(d["diff_norm"][v])
        red = _floats(d["steering_kl_reduction"][v])
        line = f"{v}: difference norm largest at layer {int(np.nanargmax(norm))} ({_fmt(np.nanmax(norm))})"
        if np.isfinite(red).any():
            k = int(np.nanargmax(red))
            line += (f"; steering removes at most {_fmt(float(red[k]))} "
                     f"{_ci(d['steering_kl_reduction_ci95'][v][k])} of KL "
                     f"{_fmt(d['kl_before'][v])} nats/token (layer {k}), "
                     f"least {_fmt(float(np.nanmin(red)))} (layer {int(np.nanargmin(red))})")
        out.append(line)
    return out


def _logit_lens(study, d) -> list[str]:
    out = []
    for v in d["variants"]:
        kl = _floats(d["lens_kl"][v])
        out.append(f"{v}: lens KL from the base peaks at layer {int(np.nanargmax(kl))} "
                   f"({_fmt(np.nanmax(kl))} nats), last layer {_fmt(kl[-1])} "
                   f"{_ci(d['lens_kl_ci95'][v][-1])}")
    out.append("median first top-1 layer of the gold answer: " + ", ".join(
        f"{m} {_fmt(d['first_top1_layer'][m])}" for m in d["models"])
        + f" ({d['n_prompts']} prompts)")
    return out


def _stitch(study, d) -> list[str]:
    return [f"{r['recipe']}: MMLU cloze {_fmt(r['mmlu_cloze'])} {_ci(r['mmlu_cloze_ci95'])}, "
            f"in-domain {_fmt(r['task_accuracy'])} {_ci(r['task_accuracy_ci95'])}, KL from "
            + ", ".join(f"{p} {_fmt(k)}" for p, k in r["kl"].items())
            for r in d["rows"]]


def _update_geometry(study, d) -> list[str]:
    from probes.update_geometry import summary_lines

    return summary_lines(study, d)


SUMMARY: dict[str, Callable] = {"weight-change": _weight_change, "kl-drift": _kl,
                                "task-accuracy": _task, "mmlu": _mmlu,
                                "attention-shift": _attention, "mlp-patching": _patching,
                                "causal-trace": _trace, "damage-attribution": _damage,
                                "activation-diff": _activation_diff, "logit-lens": _logit_lens,
                                "stitch": _stitch, "update-geometry": _update_geometry}


def key_numbers(study, probe: str) -> list[str]:
    res = study.results.get(probe)
    if res is None:
        return []
    try:
        return SUMMARY.get(probe, lambda s, d: [])(study, res.data)
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
        lines += ["", f"## {probe}", "", PLAIN.get(probe, res.provenance.get("probe", "")), ""]
        lines += [f"- {x}" for x in key_numbers(study, probe)]
        for png in sorted((study.out / probe).glob("*.png")):
            lines += ["", f"![{png.stem}]({probe}/{png.name})"]
        lines += ["", f"<sub>Options: {_config_text(res)}. Provenance: {_provenance(res)}</sub>"]
    lines += markdown_section(study.out)  # OUT/precision: demo --precision-contrast
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
        parts.append(f"<h2 id='{e(probe)}'>{e(probe)}</h2><p>{e(PLAIN.get(probe, ''))}</p><ul>")
        parts += [f"<li>{e(x)}</li>" for x in key_numbers(study, probe)]
        parts.append("</ul>")
        parts += [_img(p, p.stem.replace("_", " ")) for p in sorted((study.out / probe).glob("*.png"))]
        parts.append(f"<p class='prov'>Options: {e(_config_text(res))}.<br>"
                     f"Provenance: {e(_provenance(res))}</p>")
    parts += html_section(study.out) + [_img(p, cap) for cap, p in gate_figures(study.out)]
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
