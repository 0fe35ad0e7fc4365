"""A seeded synthetic arithmetic task that a 135M model can learn on a CPU, by SFT and by GRPO.

Spec grammar: ``arithmetic`` or ``arithmetic:ops=+x,min=0,max=19,heldout=0.25,seed=0``. The universe
is every ``a OP b`` with ``a, b`` in ``[min, max]`` and OP in ``ops`` (``+``, ``-``, ``x`` for
multiplication); a seeded shuffle splits it into disjoint train and held-out problems, so held-out
accuracy measures the skill, not recall of a seen question. Items carry the worked reference
solution (``7 x 8 = 56``) for SFT and the numeric answer for the GRPO reward; both are rendered in
the think/answer format by :mod:`mechinterp.data.qa`.

Calibration (``benchmarks/calibrate_task.py``): the default, ``+`` and ``x`` on operands 0-19 (three
problems in four have a two-digit operand), is solved by the default model at GRPO's sampling
temperature 0.6 in 30% of samples (38 of 128, 95% interval 23-38%; ``+`` 30%, ``x`` 29%), and 17 of
32 groups of 4 differ in reward, which is what gives GRPO a gradient. Two-digit operands on both sides
(10-99) are out of the base's reach within GRPO's 32 completion tokens: 0 of 128 samples at
temperature 1.0, 0 of 48 held-out items greedily; operands 0-29 give 20% (14-28%) and 13 of 32 varied
groups at 0.6. Single-digit problems (0-9) are a table SFT fits in a few steps (loss 0.03 by step
8); with 0-19 there are 600 training problems, more than the demo's 48 SFT examples, so neither run
saturates before its last checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import DataError
from .qa import QAItem

PREFIX = "arithmetic"
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithmeticTask:
    ops: str = "+x"
    min: int = 0
    max: int = 19
    heldout: float = 0.25
    seed: int = 0

    @property
    def spec(self) -> str:
        return (f"{PREFIX}:ops={self.ops},min={self.min},max={self.max},heldout={self.heldout:g},"
                f"seed={self.seed}")

    def problems(self) -> list[tuple[int, str, int]]:
        """Every ``(a, op, b)`` of the task, in a fixed order."""
        r = range(self.min, self.max + 1)
        return [(a, op, b) for op in self.ops for a in r for b in r]

    def split(self, which: str) -> list[tuple[int, str, int]]:
        """The seeded, disjoint ``train`` / ``test`` (held-out) problems."""
        if which not in ("train", "test"):
            raise DataError(f"unknown split {which!r} of the arithmetic task", "use train or test")
        probs = self.problems()
        random.Random(self.seed).shuffle(probs)
        n_held = max(1, round(self.heldout * len(probs)))
        return probs[:n_held] if which == "test" else probs[n_held:]


def is_task(spec: str | None) -> bool:
    return isinstance(spec, str) and (spec == PREFIX or spec.startswith(PREFIX + ":"))


def parse_task(spec: str) -> ArithmeticTask:
    """``arithmetic[:key=value,...]`` -> :class:`ArithmeticTask`; bad keys or values stop with one
    line naming them."""
    if not is_task(spec):
        raise DataError(f"{spec!r} is not an arithmetic task spec",
                        "write arithmetic or arithmetic:ops=+x,min=0,max=19")
    values: dict = {}
    body = spec[len(PREFIX) + 1:] if ":" in spec else ""
    fix = "e.g. arithmetic:ops=+x,min=0,max=19,heldout=0.25,seed=0"
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise DataError(f"arithmetic task option {part!r} is not KEY=VALUE", fix)
        key, raw = (x.strip() for x in part.split("=", 1))
        try:
            if key == "ops":
                values[key] = raw
            elif key in ("min", "max", "seed"):
                values[key] = int(raw)
            elif key == "heldout":
                values[key] = float(raw)
            else:
                raise DataError(f"arithmetic task has no option {key!r}",
                                "options: ops, min, max, heldout, seed")
        except ValueError:
            raise DataError(f"arithmetic task option {key}={raw!r} is not a number", fix) from None
    task = ArithmeticTask(**values)
    if not task.ops or any(op not in OPS for op in task.ops) or len(set(task.ops)) != len(task.ops):
        raise DataError(f"arithmetic ops {task.ops!r} must be distinct symbols of +, -, x",
                        "e.g. ops=+x")
    if task.min > task.max or task.min < 0:
        raise DataError(f"arithmetic range min={task.min} max={task.max} is empty or negative",
                        "use 0 <= min <= max")
    if not 0 < task.heldout < 1:
        raise DataError(f"arithmetic heldout={task.heldout} must be in (0, 1)", "e.g. 0.25")
    if len(task.problems()) < 4:
        raise DataError("the arithmetic task has fewer than 4 problems", "widen min..max or add ops")
    return task


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def solve(a: int, op: str, b: int) -> int:
    return OPS[op](a, b)


def task_items(task: ArithmeticTask, split: str) -> list[QAItem]:
    """The split's problems as :class:`~mechinterp.data.qa.QAItem` (question, worked reasoning,
    answer)."""
    return [QAItem(question(a, op, b), f"{a} {op} {b} = {solve(a, op, b)}", str(solve(a, op, b)))
            for a, op, b in task.split(split)]
