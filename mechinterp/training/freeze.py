"""Freezing during training: what a freeze spec (:mod:`mechinterp.models.selectors`) selects stays put.

Whole tensors are frozen with ``requires_grad_(False)`` (the optimizer never sees them). Slices are
frozen by a gradient hook that zeroes their gradient entries - so gradient clipping and the Adam
moments see zeros - and, because weight decay would still shrink them, by :meth:`FrozenState.restore`,
which writes the original values back after every optimizer step (``FreezeGuard`` callback).
"""

from __future__ import annotations

import torch

from ..models.selectors import FreezePlan


class FrozenState:
    """A plan applied to a model: ``requires_grad`` off, gradient hooks, and saved slice values."""

    def __init__(self, model: torch.nn.Module, freeze_plan: FreezePlan):
        self.plan = freeze_plan
        params = dict(model.named_parameters())
        self._handles = []
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for name in freeze_plan.whole:
            params[name].requires_grad_(False)
        for name, mask in freeze_plan.partial.items():
            p = params[name]
            mask = mask.to(p.device)
            flat = mask.flatten().nonzero().squeeze(1)
            self._saved.append((p, flat, p.detach().flatten()[flat].clone()))
            self._handles.append(p.register_hook(lambda g, m=mask: g.masked_fill(m, 0)))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen slices' original values back (after an optimizer step)."""
        for p, flat, vals in self._saved:
            p.data.view(-1).index_copy_(0, flat, vals)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

