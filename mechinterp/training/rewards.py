"""GRPO rewards: answer correctness (numeric match after normalisation) and the think/answer format.

Both follow TRL's reward-function protocol ``f(prompts, completions, **columns) -> list[float]``;
completions are conversational (``[{"role": "assistant", "content": ...}]``) or plain strings.

* ``correctness``: 1.0 when the completion's final answer equals the item's ``answer`` after
  :func:`~mechinterp.data.gsm8k.normalise_number` (``"$1,234.50"`` == ``"1234.5"``), else 0.0. The
  final answer is the last number inside the last ``<answer>...</answer>``; without answer tags it is the
  GSM8K extraction of the whole text (``####`` marker, ``\\boxed{}``, else the last number), as the
  paper's accuracy reward parsed the whole completion.
* ``format``: 1.0 when the completion is exactly ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>``
  (the open-r1 regex the paper used), else 0.0.

Weights (paper: correctness 1.0, format 0.2) are passed to TRL as ``reward_weights``.
"""

from __future__ import annotations

from collections.abc import Callable

from ..data.gsm8k import normalise_number
from ..data.qa import FORMAT_PATTERN, final_answer


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def correctness(prompts, completions, answer, **_) -> list[float]:
    out = []
    for comp, ref in zip(completions, answer, strict=True):
        got = final_answer(completion_text(comp))
        out.append(1.0 if got is not None and got == normalise_number(str(ref)) else 0.0)
    return out


def format_reward(prompts, completions, **_) -> list[float]:
    return [1.0 if FORMAT_PATTERN.match(completion_text(c).strip()) else 0.0 for c in completions]


format_reward.__name__ = "format"

REWARDS: dict[str, Callable] = {"correctness": correctness, "format": format_reward}
