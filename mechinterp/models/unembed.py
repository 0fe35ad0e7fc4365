"""The output layer in float32, whatever the model's dtype.

A bf16 model's logits are rounded to bf16 (8 significant bits: a logit of 20 is off by up to
0.06 nats), which is too coarse for KL divergences and log-likelihoods. Here the final hidden
states (the final norm's output, in the model's dtype) are multiplied by the unembedding in
float32, the logit transforms some architectures apply after the head are applied in float32
(Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``),
and the log-softmax is taken in float32. A float32 model gets exactly what its own forward gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 24  # weight elements converted to float32 at a time (64 MB)


def final_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                 **kw) -> Tensor:
    """Hidden states after the final norm (the input of the unembedding), ``(batch, pos, d)``."""
    body = getattr(model, "base_model", None)
    if body is not None and body is not model:
        return body(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                **kw)
    return out.hidden_states[-1]


def logits_fp32(model: torch.nn.Module, hidden: Tensor) -> Tensor:
    """``hidden`` (rows..., d) through the output layer in float32: logits ``(rows..., vocab)``,
    on the output layer's device (for a model placed by accelerate, the head's weight is brought
    in from the CPU or disk for the duration when it is offloaded)."""
    from accelerate.utils import align_module_device  # deferred: accelerate is heavy to import

    head = model.get_output_embeddings()
    with align_module_device(head):
        return _scaled(getattr(model, "config", None), _head_fp32(head, hidden))


def _head_fp32(head: torch.nn.Module, hidden: Tensor) -> Tensor:
    weight, bias = head.weight, getattr(head, "bias", None)
    h = hidden.to(weight.device, torch.float32)
    if weight.dtype == torch.float32:
        logits = F.linear(h, weight, bias)
    else:
        vocab, d = weight.shape
        step = max(1, _CHUNK_ELEMENTS // max(1, d))
        logits = torch.empty((*h.shape[:-1], vocab), dtype=torch.float32, device=h.device)
        for a in range(0, vocab, step):
            b = min(vocab, a + step)
            logits[..., a:b] = F.linear(h, weight[a:b].to(torch.float32),
                                        None if bias is None else bias[a:b].to(torch.float32))
    return logits


def _scaled(config, logits: Tensor) -> Tensor:
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divide = getattr(config, "logits_scaling", None)
    if isinstance(divide, (int, float)) and divide != 1:
        logits = logits / divide
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def log_probs_fp32(model: torch.nn.Module, hidden: Tensor) -> Tensor:
    """float32 log-softmax over the vocabulary of :func:`logits_fp32`."""
    return torch.log_softmax(logits_fp32(model, hidden), dim=-1)
