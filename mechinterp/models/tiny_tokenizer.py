"""A small byte-level BPE tokenizer trained on the spot, so tiny test models need no download.

Byte-level means every string encodes (no unknown tokens); the merges are learned from a fixed text
with a fixed vocabulary size, so the result is the same on every machine.
"""

from __future__ import annotations

_CORPUS = """\
The capital of France is Paris. The Eiffel Tower is located in the city of Paris.
The following are multiple choice questions (with answers) about high school mathematics.
Question: What is 2 + 3? Answer: 5. Natalia sold clips to 48 of her friends in April.
Michael Jordan plays the sport of basketball. Tokyo is the capital of Japan.
<think> Let me work this out step by step. </think> <answer> 42 </answer>
A. B. C. D. Answer: the answer is #### 18
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 512):
    # deferred: tokenizers and transformers are heavy, and only a tiny model's build needs them
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_sentencepiece_tokenizer(vocab_size: int = 400):
    """A Llama-2/Mistral-style tokenizer (SentencePiece conventions, as their ``tokenizer.json``
    files encode them): a ``"▁"`` dummy prefix is prepended to every text and spaces become
    ``"▁"`` before BPE, pieces start at each ``"▁"``, BOS ``<s>`` is added. So ``" Paris"`` alone
    encodes as ``["▁", "▁Par", "is"]``, while ``"... is Paris"`` ends in ``"▁Par", "is"``.
    """
    # deferred: tokenizers and transformers are heavy, and only a tiny model's build needs them
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False)
    letters = " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
    tok.train_from_iterator([_CORPUS] * 4 + [letters] * 8, trainer=trainer)  # "▁X" for each X
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")
