"""The answer token of a fact is the first token after the prompt's tokens in ``prompt + " " +
answer``, not the first token of ``" " + answer`` encoded alone (a lone "▁" for SentencePiece)."""

from __future__ import annotations

import pytest

from mechinterp.analysis.tracing import prepare_fact
from mechinterp.models.tiny_tokenizer import (
    build_tiny_sentencepiece_tokenizer,
    build_tiny_tokenizer,
)

PROMPT, SUBJECT, ANSWER = "The Eiffel Tower is located in the city of", "Eiffel Tower", "Paris"


@pytest.fixture(scope="module")
def sp_tok():
    return build_tiny_sentencepiece_tokenizer()


def test_the_tiny_sentencepiece_tokenizer_behaves_like_llama(sp_tok):
    alone = sp_tok(" " + ANSWER, add_special_tokens=False)["input_ids"]
    assert sp_tok.convert_ids_to_tokens(alone)[0] == "▁"  # what the old rule took
    whole = sp_tok(f"{PROMPT} {ANSWER}")["input_ids"]
    assert whole[0] == sp_tok.bos_token_id
    assert "▁" not in sp_tok.convert_ids_to_tokens(whole)  # the model never reads a lone "▁"


def _first_after_prompt(tok, prompt, answer):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    whole = tok(f"{prompt} {answer}", add_special_tokens=False)["input_ids"]
    assert whole[:len(p)] == p
    return whole[len(p)]


def test_answer_token_is_the_first_piece_after_the_prompt(sp_tok):
    fact = prepare_fact(sp_tok, PROMPT, SUBJECT, ANSWER, "eiffel")
    piece = sp_tok.convert_ids_to_tokens([fact.answer_id])[0]
    assert piece != "▁" and len(piece) > 1 and "▁Paris".startswith(piece)
    ids = sp_tok(f"{PROMPT} {ANSWER}")["input_ids"]
    assert fact.input_ids == ids[:len(fact.input_ids)]  # prompt as the model reads it (BOS too)
    assert fact.answer_id == ids[len(fact.input_ids)]
    assert sp_tok.decode(fact.input_ids[fact.subject[0]:fact.subject[1]]).strip() == SUBJECT


def test_answer_token_id_strips_and_refuses_a_moving_boundary(sp_tok):
    from mechinterp.analysis.tracing import answer_token_id
    from mechinterp.errors import UserError

    want = _first_after_prompt(sp_tok, PROMPT, ANSWER)
    assert answer_token_id(sp_tok, PROMPT, "  Paris \n") == want
    with pytest.raises(UserError, match="empty answer"):
        answer_token_id(sp_tok, PROMPT, "  ")
    tok = build_tiny_tokenizer()
    with pytest.raises(UserError, match="tokens change"):  # " " merges with what follows
        answer_token_id(tok, "The capital of France is ", "Paris")


def test_byte_level_bpe_answer_token_is_unchanged():
    tok = build_tiny_tokenizer()
    fact = prepare_fact(tok, PROMPT, SUBJECT, ANSWER, "eiffel")
    assert fact.answer_id == tok(" " + ANSWER, add_special_tokens=False)["input_ids"][0]
    assert tok.decode([fact.answer_id]).startswith(" P")


@pytest.mark.parametrize("mmlu_answer", ["letter", "text"])
def test_mlp_patching_prompts_use_the_first_token_after_the_prompt(sp_tok, data_source,
                                                                   mmlu_answer):
    from mechinterp.data import load_knowns, load_mmlu
    from mechinterp.data.subset import seeded_subset
    from probes.mlp_patching import Config, mmlu_prompt, prompts_for

    cfg = Config(prompt_sets=["knowns", "mmlu"], limit=8, mmlu_answer=mmlu_answer)
    sets = prompts_for(data_source, cfg, sp_tok)  # limit is the total: 4 items of each set
    want = {"knowns": [(f.prompt, f.attribute)
                       for f in seeded_subset(load_knowns(data_source), 4, cfg.seed)],
            "mmlu": [mmlu_prompt(it, mmlu_answer)
                     for it in seeded_subset(load_mmlu(data_source, "test"), 4, cfg.seed)]}
    lone = sp_tok.convert_tokens_to_ids("▁")
    for name, items in sets.items():
        assert [p for p, _ in items] == [p for p, _ in want[name]]
        for (prompt, ans), (_, answer) in zip(items, want[name]):
            assert ans == _first_after_prompt(sp_tok, prompt, answer.strip()), (name, prompt)
        # the old rule gave the lone "▁" for every item; here it is only where the tiny vocabulary
        # really continues with "▁" + single letters
        assert sum(ans != lone for _, ans in items) >= 2, name
