"""GSM8K by batched greedy generation (left padding) and answer extraction.

Plain prompt (lm-eval's ``gsm8k`` task): k train examples (drawn as lm-eval draws them,
:func:`sample_shots`) as ``Question: <q>\\nAnswer: <solution>``
joined by "\\n\\n", then ``Question: <q>\\nAnswer:``; generation stops at lm-eval's ``until`` strings and the output is cut there.
Chat prompt: the examples as user/assistant turns and the question as the last user turn, with the
generation prompt. The answer is extracted with :func:`mechinterp.data.gsm8k.extract_gsm8k_answer`
(the ``####`` marker, else ``\\boxed{}``, else the last number; thousands separators removed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..data.gsm8k import GSM8KItem, extract_gsm8k_answer
from ..errors import UserError
from ..models.loaded import LoadedModel
from ..progress import task

STOP = ("Question:", "</s>", "<|im_end|>", "\n\n\n")


def build_prompt(item: GSM8KItem, shots: Sequence[GSM8KItem], chat: bool, tokenizer) -> str:
    if not chat:
        parts = [f"Question: {s.question}\nAnswer: {s.solution}" for s in shots]
        return "\n\n".join([*parts, f"Question: {item.question}\nAnswer:"])
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template", "run without --chat")
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": s.question},
                     {"role": "assistant", "content": s.solution}]
    messages.append({"role": "user", "content": item.question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def cut_at_stop(text: str) -> str:
    cut = len(text)
    for s in STOP:
        k = text.find(s)
        if k >= 0:
            cut = min(cut, k)
    return text[:cut]


def sample_shots(pool: Sequence[GSM8KItem], n_items: int, k: int, sampler: str = "random",
                 seed: int = 1234) -> list[list[GSM8KItem]]:
    """Few-shot examples for each of ``n_items`` questions, as lm-eval draws them: ``random``
    (its default sampler) draws ``k`` train items per question from one ``random.Random(seed)``
    (lm-eval's ``fewshot_random_seed`` is 1234), in question order; ``first`` gives every
    question the first ``k``."""
    if k == 0:
        return [[] for _ in range(n_items)]
    if k > len(pool):
        raise UserError(f"{k} shots asked, the train split has {len(pool)} items", "use fewer shots")
    if sampler == "first":
        return [list(pool[:k]) for _ in range(n_items)]
    if sampler != "random":
        raise UserError(f"unknown shot sampler {sampler!r}", "use random (lm-eval's) or first")
    rnd = random.Random(seed)
    return [rnd.sample(list(pool), k) for _ in range(n_items)]


@torch.inference_mode()
def generate(model: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 256,
             batch_size: int = 8, add_special_tokens: bool = True,
             desc: str = "generating", stop: Sequence[str] = ()) -> list[str]:
    """Greedy continuations of ``prompts`` (batched by length, left padding), in input order.

    With ``stop`` a sequence stops once it has produced one of those strings (lm-eval's
    ``until``); the text still contains it (cut with :func:`cut_at_stop`). Greedy tokens before
    the stop are the same as without it: a finished row is only padded while the batch runs on."""
    tok = model.tokenizer
    lengths = [len(tok.encode(p, add_special_tokens=add_special_tokens)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out: list[str] = [""] * len(prompts)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with task(desc, len(prompts)) as advance:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=add_special_tokens).to(model.device)
                kw = {"stop_strings": list(stop), "tokenizer": tok} if stop else {}
                gen = model.hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id, temperature=None,
                                        top_p=None, top_k=None, **kw)
                new = gen[:, enc["input_ids"].shape[1]:]
                for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                    out[i] = text
                advance(len(idx))
    finally:
        tok.padding_side = side
    return out


def score_gsm8k(model: LoadedModel, items: Sequence[GSM8KItem], shots: Sequence[GSM8KItem] = (),
                chat: bool = False, max_new_tokens: int = 256, batch_size: int = 8,
                per_item_shots: Sequence[Sequence[GSM8KItem]] | None = None) -> list[dict]:
    """Item rows: index, gold, extracted prediction, correct, output text. ``shots`` go before
    every question; ``per_item_shots`` (from :func:`sample_shots`) give each its own."""
    per = per_item_shots if per_item_shots is not None else [shots] * len(items)
    prompts = [build_prompt(it, sh, chat, model.tokenizer) for it, sh in zip(items, per)]
    outputs = generate(model, prompts, max_new_tokens, batch_size, add_special_tokens=not chat,
                       desc=f"GSM8K ({model.name})", stop=STOP)
    rows = []
    for it, text in zip(items, outputs):
        answer_text = cut_at_stop(text)
        pred = extract_gsm8k_answer(answer_text)
        rows.append({"index": it.index, "gold": it.answer, "pred": pred,
                     "correct": pred is not None and pred == it.answer, "output": answer_text})
    return rows
