"""Evaluation data: MMLU, ROME's known facts and GSM8K, from a local data root or the hub.

The data root comes from ``--data-dir``, else ``MECHINTERP_DATA``; the hub (``cais/mmlu``,
``openai/gsm8k``) is tried only when neither is set. Every loader records the files it read in a
:class:`DataLog` so results can carry their hashes.
"""

from .base import DataLog, DataSource
from .gsm8k import GSM8KItem, extract_gsm8k_answer, load_gsm8k
from .knowns import KnownFact, load_knowns
from .mmlu import MMLU_SUBJECTS, MMLUItem, load_mmlu

__all__ = ["DataLog", "DataSource", "GSM8KItem", "KnownFact", "MMLUItem", "MMLU_SUBJECTS",
           "extract_gsm8k_answer", "load_gsm8k", "load_knowns", "load_mmlu"]
