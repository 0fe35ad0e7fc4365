"""The logit lens: read a residual-stream vector through the model's final norm and unembedding.

``resid_post`` of layer L (the output of block L) is what the next block reads; the lens asks what
the model would predict if it stopped there: ``unembed(final_norm(h))``. The final norm runs in
the model's own module (so the last layer's lens is exactly the model's output), the unembedding
and log-softmax in float32 (:mod:`mechinterp.models.unembed`). Residual streams are read with
:func:`mechinterp.analysis.patching.capture`, the one hook mechanism.

A *difference* of two residual streams (the activation-difference lens) is not a residual stream:
it is decoded by :func:`decode_direction`, which applies the final norm's normalisation and
elementwise scale but not its additive bias (see there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..models.loaded import LoadedModel
from ..models.unembed import logits_fp32
from .patching import capture


def final_norm(model: LoadedModel) -> torch.nn.Module:
    """The norm applied to the last block's output before the unembedding (Llama-likes' ``norm``,
    GPT-2's ``ln_f``)."""
    trunk = model.hf.get_submodule(model.family.layers_path.rsplit(".", 1)[0])
    return getattr(trunk, "norm", None) or trunk.ln_f


def lens_logits(model: LoadedModel, resid: Float[Tensor, "*rows d"]) -> Float[Tensor, "*rows vocab"]:
    """Final norm (the model's module, in its dtype), then the output layer in float32."""
    norm = final_norm(model)
    return logits_fp32(model.hf, norm(resid.to(model.device, model.dtype)))


def lens_log_probs(model: LoadedModel,
                   resid: Float[Tensor, "*rows d"]) -> Float[Tensor, "*rows vocab"]:
    """float32 log-softmax of :func:`lens_logits`."""
    return torch.log_softmax(lens_logits(model, resid), dim=-1)


@torch.no_grad()
def residual_streams(model: LoadedModel, input_ids: Int[Tensor, "batch pos"],
                     attention_mask: Tensor | None, layers: Sequence[int] | None = None,
                     logits: bool = False,
                     ) -> tuple[Float[Tensor, "batch pos vocab"] | None,
                                Float[Tensor, "layer batch pos d"]]:
    """(the model's float32 logits if ``logits`` else None, ``resid_post`` of each layer in
    ``layers`` (default all))."""
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    ids = input_ids.to(model.device)
    mask = None if attention_mask is None else attention_mask.to(model.device)
    out, store = capture(model, ids, mask, [("resid_post", layer) for layer in layers], logits)
    return out, torch.stack([store[("resid_post", layer)] for layer in layers])


@torch.no_grad()
def decode_direction(model: LoadedModel, delta: Float[Tensor, "*rows d"]) -> Float[Tensor, "*rows vocab"]:
    """Logits of a direction (a difference of residual streams) through the final norm and
    unembedding, float32.

    The final norm is applied to the direction itself, as science-of-finetuning's diffing-toolkit
    does (``lm_head(ln_final(delta))``), with one change: a norm's additive bias (GPT-2's LayerNorm
    ``beta``) is removed again, since it belongs to a residual stream, not to a difference of two
    (RMSNorm has none, so for Llama-likes this is the toolkit's readout exactly). The
    normalisation itself only rescales ``delta`` by a positive number, which changes no ranking:
    the promoted tokens are the largest logits, the suppressed ones the smallest (the toolkit's
    ``lm_head(-ln_final(delta))``). Computed in float32 for a low-precision model.
    """
    norm = final_norm(model)
    dtype = torch.float32 if model.dtype in (torch.float16, torch.bfloat16) else model.dtype
    x = delta.to(model.device, dtype)
    with torch.autocast(model.device.type, enabled=False):
        normed = _norm_fp(norm, x)
    bias = getattr(norm, "bias", None)
    if bias is not None:
        normed = normed - bias.to(normed.dtype)
    return logits_fp32(model.hf, normed)


def _norm_fp(norm: torch.nn.Module, x: Tensor) -> Tensor:
    """``norm(x)`` with its parameters cast to ``x``'s dtype (a bf16 model's norm, float32 input);
    the module itself is left untouched."""
    params = {n: p.to(x.dtype) for n, p in norm.named_parameters()}
    return torch.func.functional_call(norm, params, (x,))


def gold_ranks(log_probs: Float[Tensor, "*rows vocab"],
               gold: Int[Tensor, "*rows"]) -> Int[Tensor, "*rows"]:
    """Rank of the gold token in each distribution: 1 = top-1; ties count in the gold's favour
    (rank = 1 + number of tokens with a strictly larger log-prob)."""
    g = log_probs.gather(-1, gold[..., None].to(log_probs.device))
    return (log_probs > g).sum(-1) + 1
