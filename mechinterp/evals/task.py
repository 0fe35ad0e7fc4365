"""In-domain accuracy: greedy answers to held-out task items in the training prompt format.

The prompt is exactly what SFT and GRPO trained on (the think/answer system prompt and the question
through the chat template, with the generation prompt); the answer is read with the GRPO reward's
own extraction (:func:`mechinterp.data.qa.final_answer`: the last number of the last
``<answer>`` tag, else of the whole text), so a trained model is scored as it was rewarded.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models.loaded import LoadedModel
from ..data.qa import FORMAT_PATTERN, QAItem, final_answer, prompt_messages
from .gsm8k import generate


def task_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(prompt_messages(question), tokenize=False,
                                         add_generation_prompt=True)


def score_task(model: LoadedModel, items: Sequence[QAItem], max_new_tokens: int = 48,
               batch_size: int = 16) -> list[dict]:
    """One row per item: index, question, gold answer, completion, pred, correct, format_ok."""
    prompts = [task_prompt(model.tokenizer, it.question) for it in items]
    outputs = generate(model, prompts, max_new_tokens, batch_size, add_special_tokens=False,
                       desc=f"task ({model.name})")
    rows = []
    for i, (it, text) in enumerate(zip(items, outputs)):
        pred = final_answer(text)
        rows.append({"index": i, "question": it.question, "gold": it.answer, "completion": text,
                     "pred": pred, "correct": pred is not None and pred == it.answer,
                     "format_ok": bool(FORMAT_PATTERN.match(text.strip()))})
    return rows
