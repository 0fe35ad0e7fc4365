"""Activation capture and patching on the Hugging Face view: one generic mechanism.

Sites (see :mod:`mechinterp.models.naming`): ``resid_pre`` (input of block L), ``attn_out`` and
``mlp_out`` (outputs of block L's attention and MLP, before they are added to the residual stream),
``resid_post`` (output of block L) and ``attn_z`` (input of block L's attention output projection:
the heads' outputs side by side, ``[batch, pos, n_heads * d_head]``, TransformerLens' ``hook_z``
flattened). A :class:`Patch` replaces a site's activation - optionally
only for some batch rows and some positions - with a given tensor; every analysis (cross-model
patching, causal tracing, damage attribution) is a thin specialisation of :func:`patching`.

Sweeps are batched by putting one (layer, window, ...) condition per group of batch rows: a single
forward pass then evaluates many patches at once (``rows`` selects each group).

Plain module hooks on the HF view are used because they are the cheapest; a test checks that they
agree exactly with the same patch done through TransformerLens' bridge hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import UserError
from ..models.loaded import LoadedModel
from ..models.unembed import final_hidden, logits_fp32

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post", "attn_z")
SiteKey = tuple[str, int]


@dataclass
class Patch:
    """Replace ``site`` of ``layer`` by ``value`` on the selected rows and positions.

    ``value`` has the shape of the selected activation: ``[len(rows), pos, d_model]`` (or
    ``[len(rows), len(positions), d_model]`` when ``positions`` is given), or anything that
    broadcasts to it. ``rows``/``positions`` are index tensors (None = all).
    """

    site: str
    layer: int
    value: Tensor
    rows: Tensor | None = None
    positions: Tensor | None = None

    def apply(self, act: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        act = act.clone()
        # a model placed across devices runs this layer wherever accelerate put it: the patch
        # follows the activation
        rows = (self.rows.to(act.device) if self.rows is not None
                else torch.arange(act.shape[0], device=act.device))
        value = self.value.to(act.device, act.dtype)
        if self.positions is None:
            act[rows] = value.expand_as(act[rows])
        else:
            pos = self.positions.to(act.device)
            act[rows[:, None], pos[None, :]] = value.expand(len(rows), len(pos), act.shape[-1])
        return act


def _check_site(model: LoadedModel, site: str, layer: int) -> None:
    if site not in SITES:
        raise UserError(f"unknown site {site!r}", f"use one of {', '.join(SITES)}")
    if not 0 <= layer < model.n_layers:
        raise UserError(f"layer {layer} is out of range for {model.name} "
                        f"({model.n_layers} layers)", f"use 0..{model.n_layers - 1}")


def _module_for(model: LoadedModel, site: str, layer: int) -> tuple[torch.nn.Module, bool]:
    """(module, is_pre_hook): resid_pre is the *input* of block L, attn_z that of its o_proj."""
    if site == "resid_pre":
        return model.hf.get_submodule(model.family.block(layer)), True
    if site == "attn_z":
        path = f"{model.family.block(layer)}.{model.family.param_names['o']}"
        return model.hf.get_submodule(path), True
    return model.module(layer, site), False


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def hooked(model: LoadedModel, fns: dict[SiteKey, callable]) -> Iterator[None]:
    """Run ``fn(activation) -> activation | None`` at each (site, layer) while inside."""
    handles = []
    try:
        for (site, layer), fn in fns.items():
            _check_site(model, site, layer)
            module, pre = _module_for(model, site, layer)
            if pre:
                def pre_hook(mod, args, kwargs, fn=fn):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    new = fn(hidden)
                    if new is None:
                        return None
                    if args:
                        return (new, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": new}

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def hook(mod, args, out, fn=fn):
                    new = fn(_first(out))
                    return None if new is None else _replace_first(out, new)

                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def patch_fns(patches: Iterable[Patch]) -> dict[SiteKey, callable]:
    """The :func:`hooked` functions that apply ``patches`` (several may share a site: they are
    applied in order)."""
    by_site: dict[SiteKey, list[Patch]] = {}
    for p in patches:
        by_site.setdefault((p.site, p.layer), []).append(p)

    def chain(ps: list[Patch]):
        def fn(act):
            for p in ps:
                act = p.apply(act)
            return act
        return fn

    return {k: chain(v) for k, v in by_site.items()}


@contextmanager
def patching(model: LoadedModel, patches: Iterable[Patch]) -> Iterator[None]:
    """Apply patches (several may share a site: they are applied in order)."""
    with hooked(model, patch_fns(patches)):
        yield


@torch.no_grad()
def capture(model: LoadedModel, input_ids: Int[Tensor, "batch pos"],
            attention_mask: Tensor | None = None,
            sites: Iterable[SiteKey] = (), logits: bool = True,
            ) -> tuple[Tensor | None, dict[SiteKey, Tensor]]:
    """One forward pass returning (logits, {(site, layer): activation [batch, pos, d]});
    ``logits=False`` skips the output layer (None instead: a full-vocabulary unembedding of every
    position can cost more than the blocks of a small model)."""
    store: dict[SiteKey, Tensor] = {}

    def saver(key):
        def fn(act):
            store[key] = act.detach().clone()
        return fn

    with hooked(model, {k: saver(k) for k in sites}):
        if not logits:
            final_hidden(model.hf, input_ids, attention_mask)
            return None, store
        return model_logits(model, input_ids, attention_mask), store


def capture_grads(model: LoadedModel, forward: Callable[[], Tensor],
                  sites: Iterable[SiteKey]) -> tuple[Tensor, dict[SiteKey, Tensor],
                                                     dict[SiteKey, Tensor]]:
    """Run ``forward()`` (a forward pass of ``model`` under these hooks returning one value per
    item) with gradients: ``(values, {site: activation}, {site: d sum(values) / d activation})``.

    Only the activations' gradients are computed (``torch.autograd.grad``): nothing accumulates
    in the parameters' ``.grad``. Rows are independent, so the gradient of the sum is each row's
    gradient of its own value."""
    sites = list(sites)
    live: dict[SiteKey, Tensor] = {}

    def keep(key):
        def fn(act):
            if act.requires_grad:
                live[key] = act
                return None
            live[key] = act.detach().requires_grad_(True)  # frozen weights: start the graph here
            return live[key]
        return fn

    with torch.enable_grad(), hooked(model, {k: keep(k) for k in sites}):
        values = forward()
    grads = torch.autograd.grad(values.sum(), [live[k] for k in sites], allow_unused=True)
    acts = {k: live[k].detach() for k in sites}
    return values.detach(), acts, {k: torch.zeros_like(acts[k]) if g is None else g
                                   for k, g in zip(sites, grads)}


@torch.no_grad()
def run_patched(model: LoadedModel, input_ids: Int[Tensor, "batch pos"],
                attention_mask: Tensor | None, patches: Iterable[Patch]) -> Tensor:
    """Logits of ``model`` with ``patches`` applied."""
    with patching(model, patches):
        return model_logits(model, input_ids, attention_mask)


def model_logits(model: LoadedModel, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The model's logits with the output layer in float32 (a bf16 model's own logits are
    rounded to 8 significant bits, too coarse for log-prob metrics); hooks apply as usual."""
    return logits_fp32(model.hf, final_hidden(model.hf, input_ids, attention_mask))
