"""Caveats generated from a study's own data: single seed, the relative-change map reading the
base's weight scale, claims without power for the effect they need, a task the runs saturate
before their last checkpoint, and the mid-layer span the claims use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...models.depth import MID_LAYERS_RULE, mid_layers

SFT_LOSS_SATURATED = 0.05  # nats/token: SFT's loss below this has little left to learn
GRPO_STD_SATURATED = 0.05  # GRPO's within-group reward std below this: no advantage, no gradient
EARLY = 0.5  # "well before the last checkpoint": in the first half of the steps


def history(variant) -> list[dict]:
    """The run's logged loss / reward curve: ``train["history"]`` when the summary holds one, else
    the drift log ``<final>/training-drift/result.json`` (``data.history``), else []."""
    if isinstance(variant.train.get("history"), list):
        return variant.train["history"]
    path = Path(str(variant.final)) / "training-drift" / "result.json"
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    data = body.get("data", body)
    return data.get("history") or [] if isinstance(data, dict) else []


def saturation(variant) -> str | None:
    """A sentence when the run saturated in the first half of its steps, else None."""
    h = [r for r in history(variant) if isinstance(r.get("step"), (int, float))]
    if not h:
        return None
    last = max(r["step"] for r in h)
    early = [r for r in h if r["step"] <= EARLY * last]
    if variant.algorithm == "sft":
        low = [r for r in early if r.get("loss") is not None and r["loss"] < SFT_LOSS_SATURATED]
        if low:
            r = low[0]
            return (f"{variant.name}: training loss {r['loss']:.3g} < {SFT_LOSS_SATURATED} by step "
                    f"{r['step']} of {last}: the task saturates and the later steps are noise-driven")
    if variant.algorithm == "grpo":
        late = [r["reward_std"] for r in h if r["step"] > EARLY * last
                and r.get("reward_std") is not None]
        if late and float(np.mean(late)) < GRPO_STD_SATURATED:
            return (f"{variant.name}: reward std within groups {np.mean(late):.3g} < "
                    f"{GRPO_STD_SATURATED} over the second half of its steps: the groups agree, "
                    "the advantage is zero, GRPO has no gradient left")
    return None


def n_layers(study) -> int | None:
    """The model's layer count, from the weight-change result (None without one)."""
    res = study.results.get("weight-change")
    if res is None:
        return None
    if res.data.get("n_layers"):
        return int(res.data["n_layers"])
    for per in res.data.get("relative_change", {}).values():
        for v in per.values():
            return len(v)
    return None


def mid_layer_line(study) -> str:
    """The report's line saying which layers are the mid layers the claims test."""
    n = n_layers(study)
    if n is None:
        return f"Mid layers: {MID_LAYERS_RULE} (C4, C6, C8 and the paper-mid-mlp freeze preset)."
    span = mid_layers(n)
    which = (f"layer {span.start}" if len(span) == 1 else f"layers {span.start}-{span.stop - 1}")
    return (f"Mid layers: {MID_LAYERS_RULE}; for this {n}-layer model {which} (C4, C6, C8 and "
            "the paper-mid-mlp freeze preset).")


def study_caveats(study, claims: list[dict]) -> list[str]:
    """Every caveat, de-duplicated: the study's (seeds, saturation) and each claim's own."""
    out: list[str] = []
    kinds: dict[str, int] = {}
    for v in study.variants.values():
        if v.kind:
            kinds[v.kind] = kinds.get(v.kind, 0) + 1
    single = sorted(k for k, n in kinds.items() if n < 2)
    if single:
        out.append(f"single seed for {', '.join(single)}: intervals reflect item-to-item "
                   "variation only, not seed-to-seed")
    for v in study.variants.values():
        if (s := saturation(v)) is not None:
            out.append(s)
    for c in claims:
        p = c.get("primary") or {}
        if c.get("verdict") in ("inconclusive", "not held") and p.get("power_at_needed", 1) < 0.8:
            out.append(f"{c['id']}: low power: {p['power_at_needed']:.0%} for the needed effect "
                       f"{p['needed']:.3g} (minimum detectable {p['mde']:.3g}, n = {p['n']})")
        for cav in c.get("caveats", []):
            if not cav.startswith("single seed"):
                out.append(f"{c['id']}: {cav}")
    seen, unique = set(), []
    for line in out:
        key = line.split(": ", 1)[-1] if line[:1] == "C" and line[1:2].isdigit() else line
        if key not in seen:
            seen.add(key)
            unique.append(line)
    return unique
