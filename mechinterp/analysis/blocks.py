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

:class:`PackedBlocks` runs the same blocks on *packed* tokens instead: ``[tokens, d]`` rows that may
come from many sequences with different first positions, so one call per layer covers them all
(one large matrix product per weight, no padding). Only the attention core is written out
(PyTorch's fused ``scaled_dot_product_attention`` over a preallocated key/value buffer); norms,
projections and MLPs are the model's own modules. For the plain pre-norm blocks of Llama, Mistral,
Qwen2/3 and GPT-2 (:data:`PACKED_BLOCKS`); checked against the HF forward in the same test file.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import UserError
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


#: Decoder-block classes whose forward :class:`PackedBlocks` reproduces (pre-norm, one attention
#: and one MLP added to the residual stream, causal full attention).
PACKED_BLOCKS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                 "Qwen3DecoderLayer", "GPT2Block")


def packed_unsupported(stack: BlockStack, n_positions: int) -> str | None:
    """Why :class:`PackedBlocks` cannot reproduce ``stack``'s blocks on ``n_positions`` tokens
    (None when it can): an unknown block class, or a sliding window shorter than the sequence."""
    cfg = stack.model.hf.config
    name = type(stack.blocks[0]).__name__
    if name not in PACKED_BLOCKS:
        return f"{name} blocks are not supported"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < n_positions:
        return f"a sequence of {n_positions} tokens exceeds the sliding window {window}"
    return None


class PackedBlocks:
    """Parts of block ``layer`` applied to packed tokens ``[A, d]`` (any mix of sequences).

    Usage per layer: :meth:`kv` (keys/values of every changed token, written into a key/value
    buffer ``[rows, kv_heads, T, head_dim]`` that also holds the positions not recomputed),
    :meth:`queries` (queries of the tokens whose output is needed), :meth:`attend` (fused causal
    attention of those queries over the buffer), :meth:`attn_out` (output projection) and
    :meth:`mlp_out` (post-attention norm and MLP). The caller adds both to the residual stream
    and may overwrite either output in place first (patching).
    """

    def __init__(self, stack: BlockStack, n_positions: int):
        self.stack = stack
        cfg = stack.model.hf.config
        name = type(stack.blocks[0]).__name__
        if (why := packed_unsupported(stack, n_positions)) is not None:
            raise UserError(f"packed block calls: {why}",
                            f"use a model with {', '.join(PACKED_BLOCKS)} blocks")
        self.gpt2 = name == "GPT2Block"
        blk = stack.blocks[0]
        attn = blk.attn if self.gpt2 else blk.self_attn
        self.d = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
        self.heads = cfg.num_attention_heads if not self.gpt2 else cfg.n_head
        self.head_dim = attn.head_dim
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.cos_sin = None
        if stack.rotary is not None:
            probe = next(stack.model.hf.parameters())
            pos = torch.arange(n_positions, device=probe.device)[None]
            cos, sin = stack.rotary(probe.new_zeros(1, n_positions, 1), pos)
            self.cos_sin = (cos[0], sin[0])
            self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def _parts(self, layer: int):
        blk = self.stack.blocks[layer]
        if self.gpt2:
            return blk, blk.attn, blk.ln_1, blk.ln_2
        return blk, blk.self_attn, blk.input_layernorm, blk.post_attention_layernorm

    def normed(self, layer: int, x: Float[Tensor, "A d"]) -> Float[Tensor, "A d"]:
        """The attention's input norm."""
        return self._parts(layer)[2](x)

    def _project(self, layer: int, xn: Tensor, which: str) -> Tensor:
        _, attn, _, _ = self._parts(layer)
        if self.gpt2:
            i = "qkv".index(which)
            w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: x @ w + b, w [d, 3d]
            sl = slice(i * self.d, (i + 1) * self.d)
            out = torch.addmm(b[sl], xn, w[:, sl])
        else:
            out = getattr(attn, f"{which}_proj")(xn)
        heads = self.heads if which == "q" else self.kv_heads
        out = out.view(len(xn), heads, self.head_dim)
        norm = getattr(attn, f"{which}_norm", None)  # Qwen3
        return norm(out) if norm is not None and which != "v" else out

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        if self.cos_sin is None:
            return x
        cos, sin = (c[pos] for c in self.cos_sin)
        return self.rope(x, x, cos, sin, unsqueeze_dim=1)[0]

    def kv(self, layer: int, xn: Float[Tensor, "A d"], pos: Tensor,
           ) -> tuple[Float[Tensor, "A kvh hd"], Float[Tensor, "A kvh hd"]]:
        """Keys (rotated) and values of normed tokens ``xn`` at positions ``pos``."""
        return self._rotate(self._project(layer, xn, "k"), pos), self._project(layer, xn, "v")

    def queries(self, layer: int, xn: Float[Tensor, "A d"], pos: Tensor,
                ) -> Float[Tensor, "A heads hd"]:
        return self._rotate(self._project(layer, xn, "q"), pos)

    def attend(self, layer: int, q: Float[Tensor, "rows heads T hd"],
               k: Float[Tensor, "rows kvh T hd"], v: Float[Tensor, "rows kvh T hd"],
               ) -> Float[Tensor, "rows heads T hd"]:
        """Causal attention: fused on a GPU (no pattern is materialised); on a CPU the math
        kernel, since the flash kernel for CPU took 5x the time of eager attention on these
        short sequences (SmolLM2-135M traces)."""
        scale = self._parts(layer)[1].scaling
        cpu = q.device.type == "cpu"
        with sdpa_kernel(SDPBackend.MATH) if cpu else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=self.kv_heads != self.heads)

    def attn_out(self, layer: int, o: Float[Tensor, "A heads hd"]) -> Float[Tensor, "A d"]:
        attn = self._parts(layer)[1]
        proj = attn.c_proj if self.gpt2 else attn.o_proj
        return proj(o.reshape(len(o), -1))

    def mlp_out(self, layer: int, h: Float[Tensor, "A d"]) -> Float[Tensor, "A d"]:
        blk, _, _, ln2 = self._parts(layer)
        return blk.mlp(ln2(h))
