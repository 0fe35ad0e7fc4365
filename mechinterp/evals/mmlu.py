"""MMLU scored as lm-evaluation-harness scores it (letter format) plus a cloze companion.

Letter format (lm-eval task ``mmlu_<subject>``): the description "The following are multiple choice
questions (with answers) about <subject with spaces>.\\n\\n", then k dev-split examples (the first k,
lm-eval's ``first_n`` sampler) each rendered as ``<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:``
+ " " + gold letter + "\\n\\n", then the test question rendered the same way without its answer. The
prediction is the letter among " A".." D" with the highest log-likelihood (one forward pass per item).

Cloze format (lm-eval ``mmlu_<subject>_continuation``): description "The following are questions
(with answers) about <subject>.\\n\\n", ``Question: <question>\\nAnswer:`` and the answer *texts*
" <choice>" as continuations; ``cloze`` is the raw argmax, ``cloze-norm`` lm-eval's ``acc_norm``
(log-likelihood divided by the answer's length in characters).

With ``chat=True`` the description becomes the system message and the rest one user message
(lm-eval's ``--apply_chat_template`` without multi-turn few-shot); the target delimiter is then "".
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.mmlu import LETTERS, MMLUItem
from ..data.subset import note_limit
from ..errors import UserError
from ..models.loaded import LoadedModel
from .loglik import Request, score
from .stats import accuracy_summary

_FORMAT = re.compile(r"^(letter|cloze)(?:-(\d+)shot)?(-chat)?$")


@dataclass(frozen=True)
class MMLUFormat:
    kind: str = "letter"  # letter | cloze
    shots: int = 0
    chat: bool = False

    @property
    def label(self) -> str:
        shots = f"-{self.shots}shot" if self.kind == "letter" or self.shots else ""
        return f"{self.kind}{shots}{'-chat' if self.chat else ''}"

    @classmethod
    def parse(cls, text: str) -> MMLUFormat:
        m = _FORMAT.match(text.strip())
        if not m:
            raise UserError(f"unknown MMLU format {text!r}",
                            "use letter-0shot, letter-5shot, cloze, cloze-5shot (append -chat for "
                            "the chat template)")
        shots = int(m.group(2) or 0)
        if shots > 5:
            raise UserError(f"MMLU format {text!r} asks for {shots} shots",
                            "the dev split has 5 examples per subject: use 0..5")
        return cls(m.group(1), shots, bool(m.group(3)))


def _pretty(subject: str) -> str:
    return subject.replace("_", " ")


def description(fmt: MMLUFormat, subject: str) -> str:
    what = "multiple choice questions" if fmt.kind == "letter" else "questions"
    return f"The following are {what} (with answers) about {_pretty(subject)}.\n\n"


def question_text(fmt: MMLUFormat, item: MMLUItem) -> str:
    if fmt.kind == "cloze":
        return f"Question: {item.question.strip()}\nAnswer:"
    opts = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, item.choices))
    return f"{item.question.strip()}{opts}\nAnswer:"


def answer_texts(fmt: MMLUFormat, item: MMLUItem) -> tuple[str, ...]:
    return tuple(LETTERS) if fmt.kind == "letter" else tuple(item.choices)


def build_request(fmt: MMLUFormat, item: MMLUItem, shots: Sequence[MMLUItem],
                  tokenizer=None) -> Request:
    """The lm-eval context for ``item`` and its four continuations."""
    body = "".join(f"{question_text(fmt, s)} {answer_texts(fmt, s)[s.answer]}\n\n" for s in shots)
    body += question_text(fmt, item)
    desc = description(fmt, item.subject)
    if fmt.chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template", "drop -chat from the format")
        context = tokenizer.apply_chat_template(
            [{"role": "system", "content": desc}, {"role": "user", "content": body}],
            tokenize=False, add_generation_prompt=True)
        delim = ""
    else:
        context, delim = desc + body, " "
    return Request(context, tuple(delim + a for a in answer_texts(fmt, item)))


def stratified_sample(items: Sequence[MMLUItem], limit: int | None, seed: int = 0) -> list[MMLUItem]:
    """A fixed sample of ``limit`` items, allocated to subjects in proportion to their size
    (largest remainder, at least one per subject when ``limit`` allows), seeded within subjects;
    returned in the original order."""
    if limit is None or limit >= len(items):
        note_limit(limit, len(items))
        return list(items)
    if limit <= 0:
        raise UserError(f"limit {limit} must be positive", "omit it to use every item")
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_subject[it.subject].append(i)
    subjects = sorted(by_subject)
    sizes = np.array([len(by_subject[s]) for s in subjects], dtype=float)
    quota = sizes * limit / sizes.sum()
    take = np.floor(quota).astype(int)
    if limit >= len(subjects):
        take = np.maximum(take, 1)
    rest = limit - take.sum()
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    k = 0
    while rest != 0:
        s = order[k % len(order)]
        if rest > 0 and take[s] < sizes[s]:
            take[s] += 1
            rest -= 1
        elif rest < 0 and take[s] > 1:
            take[s] -= 1
            rest += 1
        k += 1
    chosen: list[int] = []
    for s, n in zip(subjects, take):
        rng = np.random.default_rng([seed, sum(map(ord, s)), len(s)])
        idx = by_subject[s]
        chosen += [idx[j] for j in sorted(rng.permutation(len(idx))[:n])]
    return [items[i] for i in sorted(chosen)]


def score_mmlu(model: LoadedModel, items: Sequence[MMLUItem], dev: Sequence[MMLUItem],
               fmt: MMLUFormat, token_budget: int = 512,
               workers: int | None = None) -> list[dict]:
    """Item rows: subject, index, gold, prediction(s), log-likelihood of each choice
    (``token_budget`` and ``workers`` as in :func:`.loglik.score`)."""
    shots_by_subject: dict[str, list[MMLUItem]] = defaultdict(list)
    for d in dev:
        shots_by_subject[d.subject].append(d)
    for s in {it.subject for it in items}:
        if len(shots_by_subject[s]) < fmt.shots:
            raise UserError(f"the dev split has {len(shots_by_subject[s])} items for {s}, "
                            f"{fmt.shots} shots asked", "use fewer shots")
    requests = [build_request(fmt, it, shots_by_subject[it.subject][:fmt.shots], model.tokenizer)
                for it in items]
    lls, _ = score(model, requests, token_budget=token_budget, add_special_tokens=not fmt.chat,
                   workers=workers, desc=f"MMLU {fmt.label} ({model.name})")
    rows = []
    for it, ll in zip(items, lls):
        row = {"subject": it.subject, "index": it.index, "gold": it.answer,
               "pred": int(np.argmax(ll)), "loglik": [round(v, 6) for v in ll]}
        if fmt.kind == "cloze":
            norm = np.array(ll) / np.array([float(len(c)) for c in it.choices])
            row["pred_norm"] = int(np.argmax(norm))
        rows.append(row)
    return rows


def summarise(rows: Sequence[dict], pred_key: str = "pred") -> tuple[dict, dict[str, dict]]:
    """Overall and per-subject accuracy with Wilson 95% intervals."""
    correct = [r[pred_key] == r["gold"] for r in rows]
    per: dict[str, list[bool]] = defaultdict(list)
    for r, c in zip(rows, correct):
        per[r["subject"]].append(c)
    return accuracy_summary(correct), {s: accuracy_summary(v) for s, v in sorted(per.items())}


def rows_to_jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)


def rows_from_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
