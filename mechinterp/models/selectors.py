"""Freeze specs: a small validated language that selects weights of a model.

Training freezes what a spec selects (:mod:`mechinterp.training.freeze`); stitching takes it from
another model (:mod:`mechinterp.models.stitch`).

Grammar (items joined by commas; whitespace ignored)::

    SPEC  := ["only:"] ITEM ("," ITEM)*
    ITEM  := COMP ["@" LAYERS] | "attn.heads@" LAYERS ":" IDX | "mlp.neurons@" LAYERS ":" (IDX | FILE)
           | "re:" REGEX
    COMP  := attn | attn.q | attn.k | attn.v | attn.o | mlp | mlp.<matrix> | embed | lm_head | norm
    LAYERS:= N | N-M   (inclusive; more layers by continuing with ",N" or ",N-M")
    IDX   := N | N-M   (likewise continued with ",N")

* ``mlp@19-25`` freezes the MLP matrices (gate/up/down; GPT-2: in/out) of layers 19..25, biases
  included; ``attn.q,attn.k`` the query and key projections of every layer; ``attn@0-5`` q/k/v/o of
  layers 0..5; ``embed`` the token (and GPT-2 position) embeddings; ``lm_head`` the output matrix
  (the same tensor as ``embed`` when embeddings are tied); ``norm`` the norm weights (``norm@3``:
  those inside block 3).
* A bare number after a comma continues the list before it: ``mlp@1,3`` is layers 1 and 3,
  ``attn.heads@12:0,3`` heads 0 and 3 of layer 12.
* ``re:REGEX`` freezes every parameter whose full name matches (``re.search``); it takes the rest
  of the spec, commas included, so put it last.
* ``only:`` inverts the spec: train what it names and freeze everything else.

Below the tensor level (slices of one parameter):

* ``attn.heads@L:H`` - query head ``H`` of layer ``L``: its rows of q (and q's bias), its columns of
  o, and the rows of k and v (and their biases) of the key/value head it reads. With grouped-query
  attention (``n_kv`` < ``n_heads``) query head ``H`` reads KV head ``H // (n_heads // n_kv)``,
  which it shares with the other query heads of its group: freezing head ``H`` freezes that whole
  KV head, so the head's own function cannot change; the summary lists the KV heads this touched.
* ``mlp.neurons@L:FILE`` - neurons of layer ``L``'s MLP: rows of gate/up (GPT-2: columns of
  ``c_fc`` and its bias entries) and columns of down (GPT-2: rows of ``mlp.c_proj``). FILE holds
  indices separated by whitespace or commas (or a JSON list); indices may also be given inline.

``--freeze-preset paper-mid-mlp`` is the paper's mitigation, freezing the mid-layer MLPs, with "mid"
the one span every claim uses (:func:`mechinterp.models.depth.mid_layers`: the middle third of the
depth; SmolLM2's 30 layers: 10-19). The paper's own run froze layers 19-25 of OLMo-2's 32; that
exact span is ``--freeze mlp@19-25``.
``paper-qk-only`` is the paper's other run, training only q and k (``only:attn.q,attn.k``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .depth import mid_layers
from .naming import ATTN, Family, family_for, n_layers

FREEZE_PRESETS = ("paper-mid-mlp", "paper-qk-only")
COMPONENTS = ("attn", "attn.q", "attn.k", "attn.v", "attn.o", "mlp", "mlp.<matrix>", "embed",
              "lm_head", "norm", "attn.heads@L:H", "mlp.neurons@L:FILE", "re:REGEX")
_ITEM = re.compile(r"^(?P<comp>[a-z_]+(?:\.[a-z_]+)?)(?:@(?P<layers>[0-9-]+)(?::(?P<idx>.+))?)?$")
_NUM = re.compile(r"^\d+(?:-\d+)?$")


class FreezeSpecError(UserError):
    """A freeze spec that does not parse or names something the model does not have."""


def preset_spec(name: str, n_layer: int) -> str:
    """The freeze spec a preset stands for on a model with ``n_layer`` layers."""
    if name == "paper-mid-mlp":
        mid = mid_layers(n_layer)
        return f"mlp@{mid.start}-{mid.stop - 1}"
    if name == "paper-qk-only":
        return "only:attn.q,attn.k"
    raise FreezeSpecError(f"unknown freeze preset {name!r}", f"use one of {', '.join(FREEZE_PRESETS)}")


# ----- parsing -----------------------------------------------------------------------------------
@dataclass
class Item:
    comp: str
    layers: list[int] | None = None
    idx: list[int] | None = None
    idx_file: str | None = None
    pattern: str | None = None
    text: str = ""


def _numbers(text: str, what: str, spec: str) -> list[int]:
    if not _NUM.match(text):
        raise FreezeSpecError(f"freeze spec {spec!r}: {what} {text!r} is not N or N-M",
                              "write e.g. mlp@19-25 or attn.heads@12:0,3")
    if "-" in text:
        a, b = (int(x) for x in text.split("-"))
        if b < a:
            raise FreezeSpecError(f"freeze spec {spec!r}: empty range {text!r}", "write LOW-HIGH")
        return list(range(a, b + 1))
    return [int(text)]


def parse(spec: str) -> tuple[bool, list[Item]]:
    """Split a spec into items (syntax only; :func:`plan` checks them against a model)."""
    text = "".join(spec.split())
    only = text.startswith("only:")
    if only:
        text = text[len("only:"):]
    items: list[Item] = []
    rest = text
    while rest:
        if rest.startswith("re:"):
            pattern = rest[3:]
            try:
                re.compile(pattern)
            except re.error as exc:
                raise FreezeSpecError(f"freeze spec {spec!r}: bad regex {pattern!r} ({exc})",
                                      "fix the regular expression") from None
            if not pattern:
                raise FreezeSpecError(f"freeze spec {spec!r}: empty regex", "write re:<regex>")
            items.append(Item("re", pattern=pattern, text=rest))
            break
        token, _, rest = rest.partition(",")
        if not token:
            raise FreezeSpecError(f"freeze spec {spec!r} has an empty item", "remove the extra comma")
        if _NUM.match(token):  # continues the previous item's list
            if not items or items[-1].comp == "re":
                raise FreezeSpecError(f"freeze spec {spec!r}: {token!r} has nothing to continue",
                                      "numbers follow an item like mlp@3 or attn.heads@3:0")
            prev = items[-1]
            if prev.idx is not None and prev.idx_file is None:
                prev.idx += _numbers(token, "index", spec)
            elif prev.layers is not None and prev.idx is None and prev.idx_file is None:
                prev.layers += _numbers(token, "layer", spec)
            else:
                raise FreezeSpecError(f"freeze spec {spec!r}: {token!r} has nothing to continue",
                                      "give layers after @ and heads/neurons after :")
            prev.text += "," + token
            continue
        m = _ITEM.match(token)
        if not m:
            raise FreezeSpecError(f"freeze spec {spec!r}: cannot read item {token!r}",
                                  f"items look like {', '.join(COMPONENTS)}")
        item = Item(m["comp"], text=token)
        if m["layers"] is not None:
            item.layers = _numbers(m["layers"], "layer", spec)
        if m["idx"] is not None:
            if _NUM.match(m["idx"]):
                item.idx = _numbers(m["idx"], "index", spec)
            else:
                item.idx_file = m["idx"]
        items.append(item)
    if only and not items:
        raise FreezeSpecError("freeze spec 'only:' names nothing to train", "e.g. only:attn.q,attn.k")
    return only, items


# ----- the plan ----------------------------------------------------------------------------------
Selection = dict[str, "torch.Tensor | bool"]  # param name -> True (whole) or bool mask


@dataclass
class FreezePlan:
    """What a spec freezes in one model: whole parameters and masks over sliced ones."""

    spec: str
    whole: list[str] = field(default_factory=list)
    partial: dict[str, torch.Tensor] = field(default_factory=dict)  # True = frozen entry
    notes: list[str] = field(default_factory=list)
    total: int = 0

    @property
    def n_frozen(self) -> int:
        return self._whole_numel + sum(int(m.sum()) for m in self.partial.values())

    @property
    def n_trainable(self) -> int:
        return self.total - self.n_frozen

    _whole_numel: int = 0

    def summary(self) -> str:
        pct = 100.0 * self.n_frozen / self.total if self.total else 0.0
        head = (f"freeze {self.spec!r}: " if self.spec else "no freezing: ")
        first = (f"{head}trainable {self.n_trainable:,} / frozen {self.n_frozen:,} parameters "
                 f"({pct:.1f}% frozen; {len(self.whole)} whole tensors, {len(self.partial)} sliced)")
        lines = [first]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())  # tied parameters appear once


def _owner(model, name: str):
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _out_axis(module) -> int:
    return 1 if type(module).__name__ == "Conv1D" else 0  # GPT-2 Conv1D stores (in, out)


def _mark(sel: Selection, name: str, shape, dim: int | None = None,
          ranges: list[tuple[int, int]] | None = None) -> None:
    if dim is None or ranges is None:
        sel[name] = True
        return
    cur = sel.get(name)
    if cur is True:
        return
    mask = cur if isinstance(cur, torch.Tensor) else torch.zeros(shape, dtype=torch.bool)
    for a, b in ranges:
        mask.narrow(dim, a, b - a).fill_(True)
    sel[name] = mask


def _layers_of(item: Item, n_layer: int, spec: str) -> list[int]:
    layers = item.layers if item.layers is not None else list(range(n_layer))
    bad = [x for x in layers if x >= n_layer]
    if bad:
        raise FreezeSpecError(f"freeze spec {spec!r}: layer {bad[0]} is out of range in "
                              f"{item.text!r}", f"the model has layers 0-{n_layer - 1}")
    return sorted(set(layers))


def _read_indices(item: Item, limit: int, what: str, spec: str) -> list[int]:
    if item.idx is not None:
        idx = item.idx
    elif item.idx_file is not None:
        path = Path(item.idx_file).expanduser()
        if not path.is_file():
            raise FreezeSpecError(f"freeze spec {spec!r}: index file {item.idx_file!r} not found",
                                  "give a file of indices or inline indices like :0,3")
        raw = path.read_text().strip()
        try:
            vals = json.loads(raw) if raw.startswith("[") else [int(t) for t in re.split(r"[\s,]+", raw) if t]
            idx = [int(v) for v in vals]
        except (ValueError, TypeError):
            raise FreezeSpecError(f"{path} does not hold integer {what} indices",
                                  "write indices separated by spaces, commas or as a JSON list") from None
    else:
        raise FreezeSpecError(f"freeze spec {spec!r}: {item.text!r} needs {what} indices after ':'",
                              f"e.g. {item.comp}@{(item.layers or [0])[0]}:0,3")
    bad = [i for i in idx if i < 0 or i >= limit]
    if bad or not idx:
        raise FreezeSpecError(f"freeze spec {spec!r}: {what} index {bad[0] if bad else '(none)'} "
                              f"out of range in {item.text!r}", f"{what}s run 0-{limit - 1}")
    return sorted(set(idx))


def _matrix(model, family, layer: int, matrix: str, sel: Selection, params, axis_kind: str | None = None,
            idx: list[int] | None = None, width: int = 0) -> None:
    """Select one matrix (and its bias), or the ``idx`` blocks of ``width`` along one axis."""
    ref = family.param(layer, matrix, model.config)
    module = _owner(model, ref.name)
    out_ax = _out_axis(module)
    w = params[ref.name]
    bias_name = ref.name[: -len("weight")] + "bias"
    has_bias = bias_name in params
    if idx is None:  # the whole matrix
        if ref.dim is None:
            _mark(sel, ref.name, w.shape)
            if has_bias:
                _mark(sel, bias_name, params[bias_name].shape)
        else:
            rng = [(ref.start, ref.stop or w.shape[ref.dim])]
            _mark(sel, ref.name, w.shape, ref.dim, rng)
            if has_bias and ref.dim == out_ax:
                _mark(sel, bias_name, params[bias_name].shape, 0, rng)
        return
    axis = out_ax if axis_kind == "out" else 1 - out_ax
    offset = ref.start if ref.dim == axis else 0
    rng = [(offset + i * width, offset + (i + 1) * width) for i in idx]
    _mark(sel, ref.name, w.shape, axis, rng)
    if has_bias and axis == out_ax:
        _mark(sel, bias_name, params[bias_name].shape, 0, rng)


_KNOWN = ("re", "attn", "mlp", "embed", "lm_head", "norm", "attn.heads", "mlp.neurons")
_LAYERED = ("attn", "mlp", "norm", "attn.heads", "mlp.neurons")
_INDEXED = ("attn.heads", "mlp.neurons")


@dataclass(frozen=True)
class _Target:
    """What an item selects in: the model, its family and parameters, and the spec (for errors)."""

    model: torch.nn.Module
    family: Family
    params: dict[str, torch.nn.Parameter]
    spec: str

    @property
    def n_layer(self) -> int:
        return n_layers(self.model.config)

    @property
    def mlp_matrices(self) -> tuple[str, ...]:
        return tuple(m for m in self.family.matrices if m not in ATTN)


def _check_item(item: Item, spec: str) -> None:
    """An item names a known component, with layers and ``:`` indices only where it takes them."""
    comp = item.comp
    if comp not in _KNOWN and not comp.startswith(("attn.", "mlp.")):
        raise FreezeSpecError(f"freeze spec {spec!r}: unknown component {comp!r}",
                              f"known: {', '.join(COMPONENTS)}")
    if item.layers is not None and not (comp in _LAYERED or comp.startswith(("attn.", "mlp."))):
        raise FreezeSpecError(f"freeze spec {spec!r}: {comp!r} has no layers ({item.text!r})",
                              f"write plain {comp}")
    if (item.idx is not None or item.idx_file is not None) and comp not in _INDEXED:
        raise FreezeSpecError(f"freeze spec {spec!r}: {item.text!r} takes no ':' indices",
                              "only attn.heads@L:H and mlp.neurons@L:FILE do")


def _select_regex(t: _Target, item: Item, sel: Selection, notes: list[str]) -> None:
    hits = [n for n in t.params if re.search(item.pattern, n)]
    if not hits:
        raise FreezeSpecError(f"freeze spec {t.spec!r}: regex {item.pattern!r} matches no parameter",
                              f"parameter names look like {next(iter(t.params))}")
    for n in hits:
        _mark(sel, n, t.params[n].shape)


def _select_matrices(t: _Target, item: Item, sel: Selection, notes: list[str]) -> None:
    """``attn``, ``mlp`` (every matrix of the group) or one matrix (``attn.q``, ``mlp.up``)."""
    group, _, sub = item.comp.partition(".")
    allowed = ATTN if group == "attn" else t.mlp_matrices
    if sub and sub not in allowed:
        raise FreezeSpecError(f"freeze spec {t.spec!r}: unknown component {item.comp!r} for a "
                              f"{t.family.name} model", f"{group} has {', '.join(allowed)}")
    for layer in _layers_of(item, t.n_layer, t.spec):
        for mat in [sub] if sub else list(allowed):
            _matrix(t.model, t.family, layer, mat, sel, t.params)


def _needs_layer(item: Item, t: _Target, example: str) -> None:
    if item.layers is None:
        raise FreezeSpecError(f"freeze spec {t.spec!r}: {item.text!r} needs a layer",
                              f"write {example}")


def _select_heads(t: _Target, item: Item, sel: Selection, notes: list[str]) -> None:
    """Query heads: their rows of q and columns of o, and the k/v rows of the KV heads they read."""
    _needs_layer(item, t, "attn.heads@L:H,H,...")
    cfg = t.model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or t.family.expected_shape("q", cfg)[0] // n_heads
    if t.family.name == "gpt2":
        head_dim = cfg.n_embd // n_heads
    heads = _read_indices(item, n_heads, "head", t.spec)
    group = n_heads // n_kv
    kv = sorted({h // group for h in heads})
    for layer in _layers_of(item, t.n_layer, t.spec):
        _matrix(t.model, t.family, layer, "q", sel, t.params, "out", heads, head_dim)
        _matrix(t.model, t.family, layer, "o", sel, t.params, "in", heads, head_dim)
        for mat in ("k", "v"):
            _matrix(t.model, t.family, layer, mat, sel, t.params, "out", kv, head_dim)
    if group > 1:
        sharing = sorted({h for k in kv for h in range(k * group, (k + 1) * group)} - set(heads))
        notes.append(f"{item.text}: query heads {heads} read KV heads {kv} (groups of {group}); "
                     f"those k/v rows are frozen too" +
                     (f", and are shared with query heads {sharing}" if sharing else ""))


def _select_neurons(t: _Target, item: Item, sel: Selection, notes: list[str]) -> None:
    """MLP neurons: their rows of gate/up (GPT-2: columns of c_fc) and columns of down."""
    _needs_layer(item, t, "mlp.neurons@L:FILE")
    d_mlp = t.family.expected_shape(t.mlp_matrices[0], t.model.config)
    d_mlp = d_mlp[1] if t.family.name == "gpt2" else d_mlp[0]
    neurons = _read_indices(item, d_mlp, "neuron", t.spec)
    for layer in _layers_of(item, t.n_layer, t.spec):
        for mat in t.mlp_matrices:
            kind = "in" if mat in ("down", "out") else "out"
            _matrix(t.model, t.family, layer, mat, sel, t.params, kind, neurons, 1)


def _select_embed(t: _Target, item: Item, sel: Selection, notes: list[str]) -> None:
    emb = t.model.get_input_embeddings().weight
    names = [n for n, p in t.params.items() if p is emb]
    if t.family.name == "gpt2":
        names += [n for n in t.params if n.endswith("wpe.weight")]
    for n in names:
        _mark(sel, n, t.params[n].shape)


def _select_lm_head(t: _Target, item: Item, sel: Selection, notes: list[str]) -> None:
    out = t.model.get_output_embeddings().weight
    for n in [n for n, p in t.params.items() if p is out]:
        _mark(sel, n, t.params[n].shape)
    if out is t.model.get_input_embeddings().weight:
        notes.append("lm_head is tied to the input embeddings: both are one tensor")


def _select_norm(t: _Target, item: Item, sel: Selection, notes: list[str]) -> None:
    """The norm weights of every block named (all norms, the final one included, without ``@``)."""
    before = set(sel)
    layers = _layers_of(item, t.n_layer, t.spec) if item.layers is not None else None
    prefixes = [t.family.block(x) + "." for x in layers] if layers is not None else [""]
    for mname, module in t.model.named_modules():
        if "norm" in type(module).__name__.lower() and any(mname.startswith(p) for p in prefixes):
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}"
                if full in t.params:
                    _mark(sel, full, p.shape)
    if set(sel) == before:
        raise FreezeSpecError(f"freeze spec {t.spec!r}: {item.text!r} found no norm parameters",
                              "this model has no norm layers there")


_SELECTORS = {"re": _select_regex, "attn.heads": _select_heads, "mlp.neurons": _select_neurons,
              "embed": _select_embed, "lm_head": _select_lm_head, "norm": _select_norm}


def _select(model, family, item: Item, spec: str, sel: Selection, notes: list[str]) -> None:
    """Add what ``item`` names to ``sel`` (notes on what it touched besides go to ``notes``)."""
    _check_item(item, spec)
    select = _SELECTORS.get(item.comp, _select_matrices)  # the rest: attn, mlp, attn.q, mlp.up...
    select(_Target(model, family, _params(model), spec), item, sel, notes)


def plan(model: torch.nn.Module, spec: str | None, family=None) -> FreezePlan:
    """Check ``spec`` against ``model`` and say exactly which entries it freezes (no side effects)."""
    family = family or family_for(model.config)
    params = _params(model)
    out = FreezePlan(spec or "", total=sum(p.numel() for p in params.values()))
    if not spec or not spec.strip():
        return out
    only, items = parse(spec)
    sel: Selection = {}
    for item in items:
        _select(model, family, item, spec, sel, out.notes)
    for name, p in params.items():
        chosen = sel.get(name, False)
        if only:  # freeze the complement of the selection
            chosen = (~chosen) if isinstance(chosen, torch.Tensor) else (not chosen)
        if isinstance(chosen, torch.Tensor):
            if bool(chosen.all()):
                chosen = True
            elif not bool(chosen.any()):
                chosen = False
        if chosen is True:
            out.whole.append(name)
            out._whole_numel += p.numel()
        elif isinstance(chosen, torch.Tensor):
            out.partial[name] = chosen
    if only and not out.whole and not out.partial:
        out.notes.append("'only:' names every parameter: nothing is frozen")
    return out
