"""The activation-difference lens (arXiv 2510.13900): what a fine-tune adds to the residual stream.

:func:`mean_difference`: per layer, the mean over texts and over the first ``k`` token positions of
``resid_post(variant) - resid_post(base)`` (float64 sums), and the mean norm of the base's residual
stream on the same positions (its scale). :func:`steering_kl`: add ``scale * delta[L]`` to the
base's ``resid_post`` of layer L at every position of held-out texts and measure, per text, the
mean over positions of ``KL(base || variant)`` before and ``KL(steered base || variant)`` after.

Both read and steer through :func:`mechinterp.analysis.patching.hooked` (the one hook mechanism);
texts are right-padded, and padding positions are never counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..models.loaded import LoadedModel
from .divergence import kl_rows
from .lens import residual_streams
from .patching import hooked, model_logits


def text_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int,
                 ) -> list[tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]]:
    """Right-padded ``(input_ids, attention_mask)`` batches, each text cut to ``max_length``."""
    out = []
    for a in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[a:a + batch_size]), return_tensors="pt", padding=True,
                        padding_side="right", truncation=True, max_length=max_length)
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


@torch.no_grad()
def mean_difference(base: LoadedModel, variant: LoadedModel, batches, first_k: int,
                    progress: Callable[[int], None] | None = None,
                    ) -> tuple[Float[Tensor, "layer d"], Float[Tensor, " layer"], int]:
    """(mean of ``variant - base`` resid_post over texts x first ``first_k`` real positions,
    float64; mean L2 norm of the base's resid_post on the same positions; positions counted)."""
    total = None
    base_norm = None
    count = 0
    for ids, mask in batches:
        keep = mask.clone()
        keep[:, first_k:] = 0
        keep = keep.bool()
        _, hb = residual_streams(base, ids, mask)
        _, hv = residual_streams(variant, ids, mask)
        sel = keep.to(hb.device)
        d = (hv.double() - hb.double())[:, sel]  # [layer, n_pos, d]
        s = d.sum(1).cpu()
        n = hb.double()[:, sel].norm(dim=-1).sum(1).cpu()
        total = s if total is None else total + s
        base_norm = n if base_norm is None else base_norm + n
        count += int(sel.sum())
        if progress is not None:
            progress(1)
    return total / count, base_norm / count, count


def _position_means(values: Float[Tensor, "batch pos"], mask: Tensor) -> Float[Tensor, " batch"]:
    m = mask.to(values.device).double()
    return (values.double() * m).sum(1).cpu() / m.sum(1).cpu()


def _log_probs(model: LoadedModel, ids: Tensor, mask: Tensor) -> Tensor:
    return torch.log_softmax(model_logits(model, ids.to(model.device), mask.to(model.device)), -1)


@torch.no_grad()
def steering_kl(base: LoadedModel, variant: LoadedModel, batches,
                deltas: dict[int, Float[Tensor, " d"]], scale: float = 1.0,
                progress: Callable[[int], None] | None = None,
                ) -> tuple[Float[Tensor, " item"], dict[int, Float[Tensor, " item"]]]:
    """Per held-out text, the mean over its real positions of ``KL(base || variant)`` (before) and,
    for each layer L in ``deltas``, of ``KL(base with + scale * deltas[L] at resid_post L ||
    variant)`` (after), float64."""
    before, after = [], {layer: [] for layer in deltas}
    for ids, mask in batches:
        lv = _log_probs(variant, ids, mask)
        lb = _log_probs(base, ids, mask)
        before.append(_position_means(kl_rows(lb, lv), mask))
        for layer, delta in deltas.items():
            add = (scale * delta).to(base.device, base.dtype)
            with hooked(base, {("resid_post", layer): lambda act, add=add: act + add}):
                ls = _log_probs(base, ids, mask)
            after[layer].append(_position_means(kl_rows(ls, lv), mask))
            if progress is not None:
                progress(1)
    return torch.cat(before), {layer: torch.cat(v) for layer, v in after.items()}
