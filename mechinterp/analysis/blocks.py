"""Run a model's transformer blocks directly: from any layer, on a suffix of positions.

The Hugging Face ``forward`` always starts at the embeddings and covers every position. Analyses
that change one activation deep in the stack (causal tracing) only need the blocks *after* the
change and only the positions *at or after* it; everything before is what an earlier run already
computed. :class:`BlockStack` calls the HF decoder blocks themselves (so every module hook of
:mod:`mechinterp.analysis.patching` still fires) with

- hidden states for query positions ``start .. T-1`` only, and
- the keys/values of positions ``0 .. start-1`` supplied per row from an earlier run (a
  duck-typed cache whose ``update`` prepends them), so attention sees the whole sequence.

Works for every family in :mod:`mechinterp.models.naming` (rotary Llama-likes and GPT-2): the only
family-specific parts are the final norm and, for rotary models, the position embeddings.
Checked against the HF forward in ``tests/test_tracing.py``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..models.loaded import LoadedModel
from ..models.unembed import logits_fp32
from .lens import final_norm


class PrefixKV:
    """Minimal cache for one block call: prepends ``prefix[layer]`` and optionally records K/V."""

    def __init__(self, record: bool = False):
        self.prefix: dict[int, tuple[Tensor, Tensor]] = {}
        self.recorded: dict[int, tuple[Tensor, Tensor]] | None = {} if record else None

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs):
        if self.recorded is not None:
            self.recorded[layer_idx] = (key, value)
        if layer_idx in self.prefix:
            pk, pv = self.prefix[layer_idx]
            key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        return key, value


class BlockStack:
    """The blocks, final norm and unembedding of a loaded model, callable one layer at a time."""

    def __init__(self, model: LoadedModel):
        self.model = model
        hf = model.hf
        fam = model.family
        self.blocks = hf.get_submodule(fam.layers_path)
        trunk = hf.get_submodule(fam.layers_path.rsplit(".", 1)[0])
        self.norm = final_norm(model)
        self.rotary = getattr(trunk, "rotary_emb", None)
        self.unembed = hf.get_output_embeddings()
        self.n_layers = model.n_layers

    def block_kwargs(self, hidden: Tensor, start: int) -> dict:
        """Attention mask and position embeddings for query positions ``start..start+q-1``."""
        q = hidden.shape[1]
        kv = start + q
        i = torch.arange(q, device=hidden.device)[:, None] + start
        j = torch.arange(kv, device=hidden.device)[None, :]
        mask = torch.zeros(q, kv, dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(j > i, torch.finfo(hidden.dtype).min)
        kw = {"attention_mask": mask[None, None]}
        if self.rotary is not None:
            pos = torch.arange(start, kv, device=hidden.device)[None]
            kw["position_embeddings"] = self.rotary(hidden, pos)
            kw["position_ids"] = pos
        return kw

    def layer(self, layer: int, hidden: Float[Tensor, "rows q d"], cache: PrefixKV,
              kwargs: dict) -> Float[Tensor, "rows q d"]:
        out = self.blocks[layer](hidden, cache=cache, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: Float[Tensor, "rows d"]) -> Float[Tensor, "rows vocab"]:
        """Final norm, then the output layer in float32 whatever the model's dtype."""
        return logits_fp32(self.model.hf, self.norm(hidden))

    @torch.no_grad()
    def embed_input(self, input_ids: Tensor) -> Float[Tensor, "rows pos d"]:
        """resid_pre of layer 0 exactly as the HF forward builds it (embedding hooks fire)."""
        store = {}

        class _Stop(Exception):
            pass

        def grab(mod, args, kwargs):
            store["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model.hf(input_ids=input_ids)
        except _Stop:
            pass
        finally:
            handle.remove()
        return store["h"]
