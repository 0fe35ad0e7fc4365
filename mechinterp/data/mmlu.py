"""MMLU in the original CSV layout (``mmlu/{test,dev}/<subject>_<split>.csv``) or from ``cais/mmlu``."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .base import DataSource, read_text

LETTERS = ("A", "B", "C", "D")

MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology "
    "college_chemistry college_computer_science college_mathematics college_medicine "
    "college_physics computer_security conceptual_physics econometrics electrical_engineering "
    "elementary_mathematics formal_logic global_facts high_school_biology high_school_chemistry "
    "high_school_computer_science high_school_european_history high_school_geography "
    "high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality "
    "international_law jurisprudence logical_fallacies machine_learning management marketing "
    "medical_genetics miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory "
    "professional_accounting professional_law professional_medicine professional_psychology "
    "public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()


@dataclass(frozen=True)
class MMLUItem:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices (0..3)
    split: str = "test"
    index: int = 0  # row within its subject file

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def _check_subjects(subjects: list[str] | None) -> list[str]:
    if subjects is None:
        return list(MMLU_SUBJECTS)
    bad = [s for s in subjects if s not in MMLU_SUBJECTS]
    if bad:
        raise DataError(f"unknown MMLU subject {bad[0]!r}",
                        "see mechinterp.data.MMLU_SUBJECTS for the 57 names")
    return list(subjects)


def read_mmlu_csv(path: Path, subject: str, split: str) -> list[MMLUItem]:
    """Parse one subject file; a malformed row stops with its file and line number, a file with
    no questions stops too (an accuracy over zero items is no result)."""
    items = []
    with io.StringIO(read_text(path), newline="") as fh:
        reader = csv.reader(fh)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DataError(f"{path}:{line}: unreadable CSV row ({exc})",
                                "fix or re-download the file") from None
            if not row:
                continue
            if len(row) != 6:
                raise DataError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer), "
                                f"got {len(row)}", "fix or re-download the file")
            answer = row[5].strip()
            if answer not in LETTERS:
                raise DataError(f"{path}:{line}: answer {answer!r} is not one of A, B, C, D",
                                "fix or re-download the file")
            items.append(MMLUItem(subject, row[0], tuple(row[1:5]), LETTERS.index(answer),
                                  split, len(items)))
    if not items:
        raise DataError(f"MMLU file {path} holds no questions",
                        "re-download it, or leave its subject out of --subjects")
    return items


def load_mmlu(source: DataSource, split: str = "test",
              subjects: list[str] | None = None) -> list[MMLUItem]:
    """All items of ``split`` for ``subjects`` (default: all 57), in subject order."""
    if split not in ("test", "dev", "validation"):
        raise DataError(f"unknown MMLU split {split!r}", "use test, dev or validation")
    subjects = _check_subjects(subjects)
    folder = source.folder("mmlu")
    items: list[MMLUItem] = []
    if folder is not None:
        for subject in subjects:
            path = folder / split / f"{subject}_{split}.csv"
            if not path.is_file():
                raise DataError(f"MMLU file {path} is missing",
                                "the data root must hold mmlu/{test,dev}/<subject>_<split>.csv")
            source.log.record_file(path)
            items.extend(read_mmlu_csv(path, subject, split))
        return items
    hub_split = {"dev": "dev", "test": "test", "validation": "validation"}[split]
    for subject in subjects:
        ds = source.hub_dataset("cais/mmlu", subject, hub_split)
        for i, row in enumerate(ds):
            items.append(MMLUItem(subject, row["question"], tuple(row["choices"]),
                                  int(row["answer"]), split, i))
    return items
