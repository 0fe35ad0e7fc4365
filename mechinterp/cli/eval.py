"""``mechinterp eval``: benchmark evaluations (MMLU, GSM8K) written to the result store.

Thin wrappers over the ``mmlu`` and ``gsm8k`` probes: ``--model`` is the base, ``--variant`` adds
fine-tunes (then paired comparisons are included), results go to OUT/<probe>/result.json with the
item rows beside it, and ``mechinterp figures OUT`` re-draws them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from ..store.results import Result
from .options import DataDir, Device, Dtype, Limit, Out, Overwrite, Seed, Variant
from .probe_command import run_probe_command

eval_app = typer.Typer(rich_markup_mode=None,
                      help="Benchmarks: MMLU (lm-eval letter format, cloze), GSM8K, and the "
                       "in-domain task (held-out items in the training format).",
                       no_args_is_help=True)

Model = Annotated[str, typer.Option("--model", "-m", help="Model spec: zoo name, folder, .gguf "
                                    "file, or hub ORG/NAME[@REV].")]


def _accuracy_lines(result: Result) -> list[str]:
    """One line per model (and format, for MMLU): accuracy and its 95% interval."""
    data, lines = result.data, []
    for name in data["models"]:
        acc, ci = data["accuracy"][name], data["ci95"][name]
        if isinstance(acc, dict):
            lines += [f"{name:>12} {fmt:<16} {a:.4f}  [{ci[fmt][0]:.4f}, {ci[fmt][1]:.4f}]"
                      for fmt, a in acc.items()]
        else:
            lines.append(f"{name:>12} accuracy {acc:.4f}  [{ci[0]:.4f}, {ci[1]:.4f}]")
    return lines


def _run(probe_name: str, model: str, variant: list[str] | None, data_dir: Path | None, out: Path,
         device: str, dtype: str, limit: int | None, seed: int, options: dict,
         overwrite: bool) -> None:
    run_probe_command(probe_name, options, base=model, variants=variant, out=out,
                      data_dir=data_dir, device=device, dtype=dtype, limit=limit, seed=seed,
                      overwrite=overwrite, summary=_accuracy_lines)


@eval_app.command("mmlu")
def mmlu(
    model: Model = "smollm2-135m-instruct",
    variant: Variant = None,
    format_: Annotated[list[str] | None, typer.Option(
        "--format", "-f", help="letter-0shot, letter-5shot (any 0..5), cloze, cloze-5shot; "
        "repeatable or comma-separated. Default letter-0shot.")] = None,
    subjects: Annotated[str | None, typer.Option(
        help="Comma-separated MMLU subjects (default: all 57).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap prompts in the chat template.")] = False,
    limit: Limit = None,
    seed: Seed = 0,
    data_dir: DataDir = None,
    out: Out = Path("results"),
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
) -> None:
    """MMLU accuracy per format, subject and model, with Wilson intervals and item rows."""
    fmts = [f.strip() for arg in (format_ or ["letter-0shot"]) for f in arg.split(",") if f.strip()]
    if chat:
        fmts = [f if f.endswith("-chat") else f"{f}-chat" for f in fmts]
    options: dict = {"formats": fmts}
    if subjects:
        options["subjects"] = [s.strip() for s in subjects.split(",") if s.strip()]
    _run("mmlu", model, variant, data_dir, out, device, dtype, limit, seed, options, overwrite)


@eval_app.command("gsm8k")
def gsm8k(
    model: Model = "smollm2-135m-instruct",
    variant: Variant = None,
    shots: Annotated[int, typer.Option(help="Few-shot examples from the train split.")] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="Use the chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 8,
    limit: Limit = None,
    seed: Seed = 0,
    data_dir: DataDir = None,
    out: Out = Path("results"),
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
) -> None:
    """GSM8K accuracy by greedy generation, with a Wilson interval and item rows."""
    if shots < 0 or max_new_tokens <= 0 or batch_size <= 0:
        raise UserError("--shots must be >= 0 and --max-new-tokens, --batch-size positive",
                        "check the options")
    _run("gsm8k", model, variant, data_dir, out, device, dtype, limit, seed,
         {"shots": shots, "chat": chat, "max_new_tokens": max_new_tokens,
          "batch_size": batch_size}, overwrite)


@eval_app.command("task")
def task(
    model: Model = "smollm2-135m-instruct",
    variant: Variant = None,
    items: Annotated[str, typer.Option(help="Task spec: arithmetic[:ops=+x,min=0,max=9,...] (its "
                                       "held-out split) or gsm8k (test split).")] = "arithmetic",
    max_new_tokens: Annotated[int, typer.Option(help="Generation length.")] = 48,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 16,
    limit: Limit = None,
    seed: Seed = 0,
    data_dir: DataDir = None,
    out: Out = Path("results"),
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
) -> None:
    """In-domain accuracy: greedy answers to held-out task items in the training prompt format,
    scored like the GRPO reward; with --variant, paired against the base on the same items."""
    _run("task-accuracy", model, variant, data_dir, out, device, dtype, limit, seed,
         {"items": items, "max_new_tokens": max_new_tokens, "batch_size": batch_size}, overwrite)
