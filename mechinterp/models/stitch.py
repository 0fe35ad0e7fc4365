"""Stitched models: chosen modules from one model, the rest from another, without a copy.

A *recipe* names a host, a donor and which parameters come from the donor::

    RECIPE := [HOST "+"] DONOR ":" SPEC  |  NAME
    SPEC   := a freeze spec (:mod:`mechinterp.models.selectors`), layers also as early|mid|late|all

``base+sft:mlp@mid`` is the base with SFT's MLPs in the middle third of the layers;
``sft+base:mlp@10-19`` SFT with the base's MLPs of layers 10..19; ``base+grpo:attn.q,attn.k``
the base with GRPO's query and key projections (every layer); ``sft:only:mlp`` (host omitted:
the base) SFT's weights everywhere except the MLPs; a bare ``NAME`` is that model unchanged.
``all`` as a whole spec takes every parameter from the donor. The thirds are
``round(k L / 3)`` boundaries (30 layers: 0-9, 10-19, 20-29; 4 layers: 0, 1-2, 3).

:class:`Stitcher` holds one working module (itself one of the parents, normally the base) and the
parameter tensors of every parent. :meth:`Stitcher.stitched` points each parameter of the working
module at the host's or the donor's tensor (``Parameter.data`` reassigned: shared by reference,
nothing copied, nothing written) and points them back at the working model's own tensors on
exit, also on error; so the working model and every parent are bit for bit what they were. Only a
parameter the spec splits inside one tensor (``attn.heads@L:H``, GPT-2's fused q/k/v slices) gets a
new tensor, merged with ``torch.where``. Buffers (rotary tables) are the working model's; parents
of one architecture have the same ones. Views over the working module's parameters (the
TransformerLens bridge, nnsight) see the stitched weights too.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from .naming import n_layers
from .selectors import FreezePlan, FreezeSpecError, plan

THIRDS = ("early", "mid", "late")
_THIRD = re.compile(r"@(early|mid|late)(?=$|[,:])")
_NAME = re.compile(r"^[A-Za-z0-9][\w.@-]*$")
FIX = ("write HOST+DONOR:SPEC (e.g. base+sft:mlp@mid, sft+base:attn@0-9, base+grpo:attn.q,attn.k) "
       "or a model name; SPEC is a freeze spec, layers as N-M or early/mid/late")


@dataclass(frozen=True)
class Recipe:
    """Which parameters of ``host`` are replaced by ``donor``'s (``spec``; empty: none)."""

    host: str
    donor: str | None = None
    spec: str = ""
    text: str = ""  # as written

    @property
    def label(self) -> str:
        return self.text or (f"{self.host}+{self.donor}:{self.spec}" if self.donor else self.host)

    @property
    def parents(self) -> tuple[str, ...]:
        return (self.host,) if self.donor is None else (self.host, self.donor)


def parse_recipe(text: str, default_host: str = "base") -> Recipe:
    """Syntax only (:meth:`Stitcher.plan` checks names and the spec against the models)."""
    raw = " ".join(str(text).split())
    if not raw:
        raise UserError("an empty recipe", FIX)
    if ":" not in raw:
        if not _NAME.match(raw) or "+" in raw:
            raise UserError(f"recipe {raw!r} names no modules", FIX)
        return Recipe(raw, text=raw)
    models, spec = (s.strip() for s in raw.split(":", 1))
    host, plus, donor = models.rpartition("+")
    host = host.strip() if plus else default_host
    donor = donor.strip()
    for name in (host, donor):
        if not _NAME.match(name):
            raise UserError(f"recipe {raw!r}: {name!r} is not a model name", FIX)
    if host == donor:
        raise UserError(f"recipe {raw!r} takes {donor!r} from itself", "name two different models")
    if not spec:
        raise UserError(f"recipe {raw!r} has an empty spec after ':'", FIX)
    return Recipe(host, donor, spec, raw)


def parse_recipes(text: str | Sequence[str], default_host: str = "base") -> list[Recipe]:
    """Recipes separated by ``;`` (a spec may hold commas), or a list of them."""
    parts = text.split(";") if isinstance(text, str) else list(text)
    out = [parse_recipe(p, default_host) for p in parts if str(p).strip()]
    if not out:
        raise UserError("no recipe given", FIX)
    return out


def thirds(n_layers: int) -> dict[str, tuple[int, int]]:
    """``{early, mid, late}`` -> inclusive layer span; boundaries ``round(k L / 3)``."""
    cuts = [round(k * n_layers / 3) for k in range(4)]
    return {name: (cuts[i], cuts[i + 1] - 1) for i, name in enumerate(THIRDS)}


def expand_spec(spec: str, n_layers: int) -> str:
    """``all`` -> ``re:.``; ``@early`` / ``@mid`` / ``@late`` -> ``@a-b`` on this model."""
    if spec.strip() == "all":
        return "re:."
    span = thirds(n_layers)

    def repl(m: re.Match) -> str:
        lo, hi = span[m.group(1)]
        if hi < lo:
            raise UserError(f"the {m.group(1)} third of a {n_layers}-layer model is empty",
                            "give layers as numbers")
        return f"@{lo}-{hi}"

    return _THIRD.sub(repl, spec)


def grid(variants: Sequence[str], base: str = "base") -> list[Recipe]:
    """Per variant ``V``: ``base+V:{attn,mlp}@{early,mid,late}`` (the variant's block in the base)
    and ``V+base:...`` (the base's block in the variant), 12 recipes."""
    out = []
    for v in variants:
        for host, donor in ((base, v), (v, base)):
            for kind in ("attn", "mlp"):
                for third in THIRDS:
                    out.append(parse_recipe(f"{host}+{donor}:{kind}@{third}"))
    return out


class Stitcher:
    """One working module whose parameters are pointed at its parents' tensors, recipe by recipe.

    ``parents`` maps a name to a module of one architecture; ``working`` names the parent whose
    module is stitched (its own tensors are kept aside and put back after each recipe).
    """

    def __init__(self, parents: dict[str, torch.nn.Module], working: str):
        if working not in parents:
            raise UserError(f"working model {working!r} is not a parent",
                            f"use one of {', '.join(parents)}")
        self.module = parents[working]
        self.working = working
        self.params = dict(self.module.named_parameters())  # tied parameters appear once
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name, module in parents.items():
            self.add(name, module)

    def add(self, name: str, module: torch.nn.Module) -> None:
        """Make ``module`` available as a parent (checked against the working module)."""
        got = dict(module.named_parameters())
        if set(got) != set(self.params):
            missing = sorted(set(self.params) ^ set(got))[0]
            raise UserError(f"model {name!r} and {self.working!r} differ in parameter {missing}",
                            "stitch models of one architecture")
        for k, p in got.items():
            w = self.params[k]
            if (p.shape, p.dtype, p.device) != (w.shape, w.dtype, w.device):
                raise UserError(f"{k} of {name!r} is {tuple(p.shape)} {p.dtype} on {p.device}, "
                                f"of {self.working!r} {tuple(w.shape)} {w.dtype} on {w.device}",
                                "load the models with one dtype and device")
        self.tensors[name] = {k: p.data for k, p in got.items()}

    def remove(self, name: str) -> None:
        if name != self.working:
            self.tensors.pop(name, None)

    def plan(self, recipe: Recipe) -> FreezePlan:
        """Which parameters (whole, or masked entries) ``recipe`` takes from its donor."""
        for name in recipe.parents:
            if name not in self.tensors:
                raise UserError(f"recipe {recipe.label!r} names model {name!r}",
                                f"models here: {', '.join(self.tensors)}")
        return self.selection(recipe)

    def selection(self, recipe: Recipe) -> FreezePlan:
        """:meth:`plan` without the check that its models are here (the spec alone)."""
        if recipe.donor is None:
            return FreezePlan("")
        spec = expand_spec(recipe.spec, n_layers(self.module.config))
        try:
            out = plan(self.module, spec)
        except FreezeSpecError as exc:
            raise UserError(f"recipe {recipe.label!r}: {exc.message.replace('freeze spec ', '')}",
                            exc.fix) from None
        if not out.whole and not out.partial:
            raise UserError(f"recipe {recipe.label!r} takes nothing from {recipe.donor!r}",
                            "name some modules (an only: spec that names everything takes none)")
        return out

    def sources(self, recipe: Recipe, selection: FreezePlan | None = None) -> dict[str, object]:
        """Per parameter: the parent name it comes from, or a bool mask (True: the donor)."""
        selection = selection if selection is not None else self.plan(recipe)
        whole = set(selection.whole)
        out: dict[str, object] = {}
        for k in self.params:
            if k in whole:
                out[k] = recipe.donor
            elif k in selection.partial:
                out[k] = selection.partial[k]
            else:
                out[k] = recipe.host
        return out

    @contextlib.contextmanager
    def stitched(self, recipe: Recipe) -> Iterator[torch.nn.Module]:
        """The working module with ``recipe``'s weights inside the block; its own after it."""
        src = self.sources(recipe)
        try:
            with torch.no_grad():
                for k, p in self.params.items():
                    s = src[k]
                    if isinstance(s, torch.Tensor):
                        host, donor = self.tensors[recipe.host][k], self.tensors[recipe.donor][k]
                        p.data = torch.where(s.to(host.device), donor, host)
                    else:
                        p.data = self.tensors[s][k]
            yield self.module
        finally:
            self.restore()

    def restore(self) -> None:
        own = self.tensors[self.working]
        for k, p in self.params.items():
            p.data = own[k]

    def donor_fraction(self, recipe: Recipe) -> float:
        """Share of the parameters (entries, tied ones counted once) taken from the donor."""
        if recipe.donor is None:
            return 0.0
        selection = self.plan(recipe)
        return selection.n_frozen / selection.total if selection.total else 0.0
