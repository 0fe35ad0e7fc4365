"""The activation-difference lens (arXiv 2510.13900): what a fine-tune adds to the residual stream.

:func:`mean_difference`: per layer, the mean over texts and over the first ``k`` token positions of
``resid_post(variant) - resid_post(base)`` (float64 sums; optionally leaving out the first
``skip_first`` positions, e.g. the first token, whose residual stream is an outlier of very large
norm in many models; also kept per position, as the paper reads them), and the mean norm of the base's residual
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

from ..errors import UserError
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
                    skip_first: int = 0, progress: Callable[[int], None] | None = None,
                    ) -> tuple[Float[Tensor, "layer d"], Float[Tensor, "layer k d"],
                               Int[Tensor, " k"], Float[Tensor, " layer"]]:
    """The mean of ``variant - base`` resid_post over texts and their real positions
    ``skip_first .. first_k - 1`` (float64, [layer, d]); the same per position 0..first_k-1
    ([layer, k, d]) with the number of texts long enough for each position; the mean L2 norm of
    the base's resid_post over the pooled positions."""
    total = torch.zeros(0)
    base_norm = torch.zeros(0)
    counts = torch.zeros(first_k, dtype=torch.long)
    for ids, mask in batches:
        keep = mask[:, :first_k].bool()  # [batch, k]
        _, hb = residual_streams(base, ids, mask)
        _, hv = residual_streams(variant, ids, mask)
        k = keep.shape[1]
        w = keep.to(hb.device).double()
        d = (hv[:, :, :k].double() - hb[:, :, :k].double()) * w[None, :, :, None]
        s = d.sum(1).cpu()  # [layer, k, d]
        pool = w.clone()
        pool[:, :skip_first] = 0
        n = (hb[:, :, :k].double().norm(dim=-1) * pool[None]).sum((1, 2)).cpu()
        if not total.numel():
            total = torch.zeros(s.shape[0], first_k, s.shape[2], dtype=torch.float64)
            base_norm = torch.zeros(s.shape[0], dtype=torch.float64)
        total[:, :k] += s
        base_norm += n
        counts[:k] += keep.sum(0).cpu()
        if progress is not None:
            progress(1)
    n_pool = int(counts[skip_first:].sum())
    if n_pool == 0:
        raise UserError(f"no text has more than {skip_first} tokens",
                        "lower skip_first or give longer texts")
    pooled = total[:, skip_first:].sum(1) / n_pool
    per_pos = total / counts.clamp(min=1)[None, :, None]
    return pooled, per_pos, counts, base_norm / n_pool


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
