"""GRPO with each group's prompt run once: TRL's GRPOTrainer, same loss, less arithmetic.

GRPO samples ``num_generations`` completions of every prompt, and TRL scores (and differentiates)
each (prompt + completion) row on its own: the prompt's forward and backward pass is repeated
``num_generations`` times, and on a CPU its LM head scores every prompt position only to mask them
away. :class:`SharedPromptGRPOTrainer` computes the same per-token log-probabilities another way:

1. the distinct (left-padded) prompts of the batch go through the backbone once, keeping their
   key/value cache;
2. the cache is indexed out to every row (``index_select``: in the backward pass the gradients of
   a group's rows sum into its prompt's single forward pass);
3. the completions run on top of that cache, at the positions they have in the full row;
4. the LM head scores only the completion tokens (TRL's own chunked log-prob kernel, so the
   log-probabilities and entropies are those of TRL's fused head).

Causal attention makes the prompt's keys and values independent of what follows, so this is the
same function of the weights as TRL's full-row pass; only the order of floating-point sums
differs (``tests/test_grpo_speed_math.py`` checks loss and gradients against TRL's path). With
``num_generations`` 4 and prompts of ~106 tokens followed by 32 (the ``cpu-demo`` preset), the
backbone runs 234 instead of 552 tokens per group and the LM head 32 instead of 137 positions per
row.

Generation does the same: transformers' ``generate`` (TRL's sampling settings, its KV cache) starts
from a cache of the distinct prompts' tokens, all but the last, computed once and indexed out to
the ``num_generations`` rows of each, at the positions ``generate`` itself gives them; it then
samples as it would have. vLLM (``--use-vllm``), transformers' continuous batching and multimodal
prompts take TRL's own path.

Anything this does not cover falls back to TRL's pass: a model wrapped for distributed training
(DDP, DeepSpeed, FSDP: their hooks live on the wrapper's forward), gradient checkpointing,
multimodal inputs, MoE auxiliary losses, logit scaling or soft-capping, an fp32 LM head cast, or a
batch with no repeated prompt.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction, pad

#: config fields that make TRL's fused head scale or cap the logits (not reproduced here)
_SCALING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
            "logits_scaling", "output_router_logits")


class SharedPromptGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose log-prob passes run each distinct prompt once (see the module docstring)."""

    def _shareable(self, model, batch_size, compute_aux_loss, extra) -> bool:  # noqa: ARG002
        if compute_aux_loss or any(v is not None for v in extra.values()):
            return False
        if self.accelerator.unwrap_model(model) is not model:  # DDP / DeepSpeed / FSDP wrapper
            return False
        if getattr(model, "is_gradient_checkpointing", False) or getattr(
                self.args, "cast_lm_head_to_fp32", False):
            return False
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            return False
        text = model.config.get_text_config()
        if text is not model.config or any(getattr(text, k, None) for k in _SCALING):
            return False
        return True  # TRL's `batch_size` chunking only bounds memory; sharing needs less

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False,
                                           compute_aux_loss=False, **extra):
        if not self._shareable(model, batch_size, compute_aux_loss, extra):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        out = shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep,
                                  self.temperature, compute_entropy, self.accelerator.autocast)
        if out is None:  # every prompt distinct: nothing to share
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        return out

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):
        plain = not (self.use_vllm or self.use_transformers_continuous_batching or images
                     or multimodal_fields or has_tool_images or self._is_vlm
                     or self.args.cache_implementation not in (None, "dynamic"))
        if not plain or len({tuple(p) for p in prompt_ids}) == len(prompt_ids) or min(
                len(p) for p in prompt_ids) < 2:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                 num_generations, has_tool_images)
        device = self.accelerator.device
        rows = [torch.tensor(ids) for ids in prompt_ids]  # left-padded as TRL pads them
        ids = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                  pad_to_multiple_of=self.pad_to_multiple_of).to(device)
        mask = pad([torch.ones_like(t) for t in rows], padding_value=0, padding_side="left",
                   pad_to_multiple_of=self.pad_to_multiple_of).to(device)
        with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as unwrapped, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped,
                                                                        recurse=False):
            cache = shared_prompt_cache(unwrapped, ids, mask)
            out = unwrapped.generate(input_ids=ids, attention_mask=mask, cache=cache,
                                     generation_config=self.generation_config)
        completion = out[:, ids.size(1):]
        # as TRL: keep each completion up to and including its first EOS
        is_eos = torch.isin(completion, torch.tensor(self.eos_token_ids, device=device))
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.size(1))
        keep = torch.arange(completion.size(1), device=device)[None] <= ends[:, None]
        return [c[k].tolist() for c, k in zip(completion.cpu(), keep.cpu(), strict=True)], None


def shared_prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor):
    """The KV cache of every row's tokens but the last, for ``generate`` to start from: each
    distinct (row, mask) run once at ``generate``'s positions (the mask's cumulative sum), then
    indexed out to its rows."""
    key = torch.cat([ids, mask.to(ids.dtype)], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    u_ids, u_mask = uniq[:, :ids.size(1)], uniq[:, ids.size(1):]
    pos = (u_mask.long().cumsum(-1) - 1).masked_fill(u_mask == 0, 0)
    out = model(input_ids=u_ids[:, :-1], attention_mask=u_mask[:, :-1], position_ids=pos[:, :-1],
                use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.reorder_cache(inverse)
    return cache


def shared_prompt_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_to_keep: int, temperature: float, compute_entropy: bool = False,
                        autocast=None):
    """Per-token log-probs (and entropies) of the last ``logits_to_keep`` tokens of each row, with
    each distinct prompt (the columns before them, with their mask) run once; ``None`` when no
    two rows share a prompt. Returns ``(logps, entropies or None, None)`` as TRL's method does,
    zero where the completion is masked."""
    n_prompt = input_ids.size(1) - logits_to_keep
    if n_prompt < 1:
        return None
    key = torch.cat([input_ids[:, :n_prompt], attention_mask[:, :n_prompt].to(input_ids.dtype)], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    if uniq.size(0) == input_ids.size(0):
        return None
    backbone = getattr(model, model.base_model_prefix)
    completion = input_ids[:, n_prompt:]
    with autocast() if autocast is not None else nullcontext():
        first = backbone(input_ids=uniq[:, :n_prompt], attention_mask=uniq[:, n_prompt:],
                         use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        cache.reorder_cache(inverse)  # index_select per layer: differentiable, gradients sum
        rest = backbone(input_ids=completion, attention_mask=attention_mask, cache=cache,
                        use_cache=True)
        # the hidden state before each completion token: the prompt's last, then the completion's
        hidden = torch.cat([first.last_hidden_state[:, -1:].index_select(0, inverse),
                            rest.last_hidden_state[:, :-1]], 1)
        mask = attention_mask[:, n_prompt:].bool()
        head = model.get_output_embeddings()
        outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
        per_token = _ChunkedLogProbFunction.apply(
            hidden[mask], head.weight, head.bias, completion[mask], temperature,
            _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
    logps = per_token[0].new_zeros(mask.shape).masked_scatter(mask, per_token[0])
    ent = per_token[1].new_zeros(mask.shape).masked_scatter(mask, per_token[1]) \
        if compute_entropy else None
    return logps, ent, None
