"""Training rows in TRL's conversational format, from question/answer items.

SFT trains on the rendered reference solution as the assistant turn; GRPO samples the assistant
turn and scores it against the final answer (:mod:`mechinterp.data.qa` holds the format).
"""

from __future__ import annotations

from ..data.qa import QAItem, prompt_messages, render_target


def sft_rows(items: list[QAItem]) -> list[dict]:
    """Conversational prompt/completion rows (TRL trains on the completion only)."""
    return [{"prompt": prompt_messages(it.question),
             "completion": [{"role": "assistant", "content": render_target(it)}]} for it in items]


def grpo_rows(items: list[QAItem]) -> list[dict]:
    """Conversational prompts; ``answer`` reaches the reward functions as a keyword column."""
    return [{"prompt": prompt_messages(it.question), "answer": it.answer} for it in items]
