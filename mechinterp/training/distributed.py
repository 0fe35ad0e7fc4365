"""One training job over N processes (``accelerate launch``, ``torchrun``) or one: who writes, on
which device each rank trains, and how the ranks agree.

Rules the runner follows under a launch (every helper is a no-op for one process):

* each rank trains on accelerate's device for it (``cuda:<local process index>``, or the CPU under
  ``accelerate launch --cpu``), never ``cuda:0`` for all;
* only rank 0 checks and writes the output folder (settings, snapshots, drift log, final model);
  the others wait at a barrier, and an error rank 0 finds is raised on every rank
  (:meth:`Procs.on_main`);
* a stop (non-finite loss or weights) is all-reduced, so every rank leaves the loop together
  (:meth:`Procs.any`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..errors import UserError

T = TypeVar("T")


def launched_world() -> int:
    """Processes in this job as the launcher says (``WORLD_SIZE``; 1 when not launched)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True)
class Procs:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # accelerate's device for this rank (None: one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (all-reduce MAX)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], device=self.device or "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only while the others wait; a :class:`UserError` it raises is
        raised on every rank (same message), so no rank goes on alone."""
        out, err = None, None
        if self.main:
            try:
                out = fn()
            except UserError as exc:
                err = (type(exc), exc.message, exc.fix)
        if self.world > 1:
            box = [err]
            torch.distributed.broadcast_object_list(box, src=0)
            err = box[0]
        if err is not None:
            cls, message, fix = err
            raise cls(message, fix)
        return out


def current(cpu: bool) -> Procs:
    """This process under a launch (initialising accelerate's process group, gloo on CPU and nccl
    on GPU), or a single process."""
    if launched_world() <= 1:
        return Procs()
    from accelerate import PartialState  # deferred: accelerate is heavy to import

    state = PartialState(cpu=cpu)
    return Procs(state.process_index, state.num_processes, state.device)


def rank_device(option: str | None, procs: Procs) -> str | None:
    """The device this rank loads the model onto: ``option`` for one process; accelerate's
    device for this rank under a launch (an explicit other device is refused)."""
    if procs.world == 1:
        return option
    want = None if option in (None, "", "auto") else torch.device(option)
    if want is not None and (want.type != procs.device.type
                             or want.index is not None and want != procs.device):
        raise UserError(f"--device {option} under a {procs.world}-process launch: each rank "
                        f"trains on its own device (this one {procs.device})",
                        "drop --device (pass --cpu to accelerate launch for CPU processes)")
    return str(procs.device)
