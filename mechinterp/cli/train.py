"""``mechinterp train sft|grpo``: fine-tune a model with TRL, freezing, snapshots and drift logging.

Thin: options become :class:`~mechinterp.training.settings.TrainSettings` (paper defaults <
``--preset`` < explicit options) and :func:`~mechinterp.training.runner.train` does the work.
Under ``accelerate launch`` run this module or the package: ``accelerate launch --config_file
configs/accelerate/zero2.yaml -m mechinterp.cli.train grpo ...`` or ``accelerate launch
--num_processes 2 -m mechinterp train sft ...`` (see docs/training.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .entry import run_app
from .options import Base, DataDir, Device, Dtype, key_values

train_app = typer.Typer(
    rich_markup_mode=None,  # plain help: rich markup would eat "[paper: 571]" and "[@REV]"
    help="Fine-tune with TRL (SFT or GRPO) on GSM8K-style data in the paper's think/answer format; "
    "freeze parts of the model; save checkpoints that load as OUT@step-N; log weight change and KL "
    "from the base. Defaults are the paper's (GPU); --preset cpu-smoke finishes in minutes on a CPU.",
    no_args_is_help=True,
)

Opt = typer.Option
Out = Annotated[Path, Opt("--out", "-o", help="Run folder: final model (spec OUT), checkpoints "
                          "(OUT@step-N), drift log.")]
Data = Annotated[str | None, Opt(help="'gsm8k' (train split; test split held out for KL) or a "
                                    "JSONL file with question/answer fields [gsm8k].")]
Preset = Annotated[str | None, Opt(help="Settings preset: cpu-demo (the study on the arithmetic task, matched SFT/GRPO, minutes on a CPU) or cpu-smoke (GSM8K, a few steps). "
                                      "Explicit options override it.")]
Seed = Annotated[int | None, Opt(help="Seed (data order, sampling, init of anything random).")]
Steps = Annotated[int | None, Opt("--max-steps", help="Optimizer steps [paper: 571].")]
Lr = Annotated[float | None, Opt("--lr", help="Learning rate [paper: 1e-6].")]
Sched = Annotated[str | None, Opt("--lr-scheduler", help="Scheduler "
                                     "[paper: constant_with_warmup].")]
Warm = Annotated[float | None, Opt(help="Warm-up fraction of steps [paper: 0.1].")]
Wd = Annotated[float | None, Opt(help="AdamW weight decay [0].")]
Clip = Annotated[float | None, Opt(help="Gradient clipping norm [paper: 0.2].")]
Batch = Annotated[int | None, Opt("--batch-size", help="Per-device batch (GRPO: completions, a "
                                     "multiple of --num-generations) [SFT 8, GRPO 28].")]
Accum = Annotated[int | None, Opt("--grad-accum", help="Gradient accumulation steps [1].")]
LogSteps = Annotated[int | None, Opt(help="Log loss/reward every N steps [1].")]
Freeze = Annotated[str | None, Opt(help="Freeze spec, e.g. 'mlp@19-25', 'only:attn.q,attn.k', "
                                      "'attn.heads@12:0,3', 'mlp.neurons@10:FILE', 're:REGEX' "
                                      "(docs/training.md).")]
FreezePreset = Annotated[str | None, Opt(help="paper-mid-mlp (the mid-layer MLPs: the middle third "
                                            "of the depth, the span the claims test) or "
                                            "paper-qk-only.")]
Ckpts = Annotated[int | None, Opt("--checkpoints", help="Checkpoints saved evenly through the "
                                     "run, the last at the end [paper: 20].")]
Held = Annotated[int | None, Opt("--heldout", help="Held-out items for KL from the base "
                                    "(0: no KL) [16].")]
HeldLen = Annotated[int | None, Opt(help="Token limit of a held-out item [512].")]
Resume = Annotated[bool, Opt("--resume", help="Continue the run in --out from its last complete "
                             "checkpoint.")]
SkipDisk = Annotated[bool, Opt("--skip-disk-check", help="Do not check free disk space first.")]
GradCkpt = Annotated[bool | None, Opt("--gradient-checkpointing/--no-gradient-checkpointing",
                                      help="Recompute activations in the backward pass (less "
                                      "memory, slower) [on, as TRL; cpu-demo: off].")]
ReportTo = Annotated[str | None, Opt("--report-to", help="Also log loss, reward and the drift "
                                       "log (KL, weight change) to none, tensorboard (OUT/"
                                       "trainer-state/runs), wandb, trackio or all (every one "
                                       "installed); may change on --resume [none].")]
PrecisionOpt = Annotated[str | None, Opt(
    "--precision", help="Where the update accumulates: mixed-bf16 (float32 master weights, bf16 "
    "autocast; as --dtype bfloat16), pure-bf16 (bf16 weights and AdamW on them, as a naive GPU "
    "run: updates below half a bf16 step round away), float32 [auto: mixed-bf16 on a GPU, "
    "float32 on a CPU].")]
Extra = Annotated[list[str] | None, Opt("--trl", help="Extra TRL config field KEY=VALUE "
                                           "(JSON value), repeatable, e.g. "
                                           "adam_beta2=0.95.")]


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _extra(items: list[str] | None) -> dict[str, Any] | None:
    """``--trl KEY=VALUE`` items as TRL config fields (JSON values, else the text)."""
    if not items:
        return None
    return {k: _json_or_text(v) for k, v in key_values(items, "--trl", "adam_beta2=0.95").items()}


def _run(algorithm: str, out: Path, preset: str | None, resume: bool, data_dir: Path | None,
         skip_disk_check: bool, overrides: dict[str, Any]) -> None:
    # deferred: the training runner imports transformers' Trainer (slow; only train needs it)
    from ..training.runner import resume_settings, summarise, train
    from ..training.settings import resolve_settings, validate

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if resume:
        report_to = overrides.pop("report_to", None)  # where it logs is not part of the run
        settings = resume_settings(out, {**overrides, "algorithm": algorithm,
                                         **({"preset": preset} if preset else {})})
        if report_to is not None:
            settings.report_to = report_to
            validate(settings)
    else:
        settings = resolve_settings(algorithm, preset, overrides)
    res = train(settings, out, resume=resume, data_dir=data_dir,
                echo=lambda s: typer.echo(s, err=True), skip_disk_check=skip_disk_check)
    if not res.main:  # under a multi-process launch rank 0 reports
        return
    typer.echo(f"{algorithm}: {res.steps} steps in {res.wall_time_s:.1f} s; final model {out}; "
               f"checkpoints {', '.join(f'{out}@{c}' for c in res.checkpoints)}")
    typer.echo(summarise(res.final))


#: settings field <- CLI parameter, for the options sft and grpo share
_COMMON = dict(base="base", data="data", seed="seed", device="device", dtype="dtype",
               max_steps="max_steps", learning_rate="lr", lr_scheduler_type="lr_scheduler",
               warmup_ratio="warmup_ratio", weight_decay="weight_decay",
               max_grad_norm="max_grad_norm", per_device_train_batch_size="batch_size",
               gradient_accumulation_steps="grad_accum", logging_steps="logging_steps",
               freeze="freeze", freeze_preset="freeze_preset", checkpoints="checkpoints",
               n_heldout="heldout", heldout_max_length="heldout_max_length",
               gradient_checkpointing="gradient_checkpointing", report_to="report_to")


def _common(params: dict) -> dict:
    """Settings from the options both commands share (``params`` is the command's locals())."""
    # deferred: torch (training.precision imports it; `train --help` need not)
    from ..training.precision import from_options

    return {k: params[v] for k, v in _COMMON.items()} | {
        "extra": _extra(params["trl"]), "dtype": from_options(params["dtype"], params["precision"])}


@train_app.command("sft")
def sft(
    out: Out, base: Base = None, data: Data = None, data_dir: DataDir = None,
    preset: Preset = None, seed: Seed = None, device: Device = None, dtype: Dtype = None,
    precision: PrecisionOpt = None,
    max_steps: Steps = None, lr: Lr = None, lr_scheduler: Sched = None, warmup_ratio: Warm = None,
    weight_decay: Wd = None, max_grad_norm: Clip = None, batch_size: Batch = None,
    grad_accum: Accum = None, logging_steps: LogSteps = None,
    max_length: Annotated[int | None, Opt(help="Token limit of prompt + target [paper: 4096].")] = None,
    freeze: Freeze = None, freeze_preset: FreezePreset = None, checkpoints: Ckpts = None,
    heldout: Held = None, heldout_max_length: HeldLen = None, trl: Extra = None,
    gradient_checkpointing: GradCkpt = None, report_to: ReportTo = None,
    resume: Resume = False, skip_disk_check: SkipDisk = False,
) -> None:
    """Supervised fine-tuning on reference solutions (TRL SFTTrainer, loss on the answer only)."""
    _run("sft", out, preset, resume, data_dir, skip_disk_check,
         _common(locals()) | dict(max_length=max_length))


@train_app.command("grpo")
def grpo(
    out: Out, base: Base = None, data: Data = None, data_dir: DataDir = None,
    preset: Preset = None, seed: Seed = None, device: Device = None, dtype: Dtype = None,
    precision: PrecisionOpt = None,
    max_steps: Steps = None, lr: Lr = None, lr_scheduler: Sched = None, warmup_ratio: Warm = None,
    weight_decay: Wd = None, max_grad_norm: Clip = None, batch_size: Batch = None,
    grad_accum: Accum = None, logging_steps: LogSteps = None,
    num_generations: Annotated[int | None, Opt(help="Completions per prompt [paper: 28].")] = None,
    max_completion_length: Annotated[int | None, Opt(
        help="Completion token limit [paper: 1500].")] = None,
    temperature: Annotated[float | None, Opt(help="Sampling temperature [paper: 0.6].")] = None,
    beta: Annotated[float | None, Opt(help="KL coefficient [paper: 0, no KL term].")] = None,
    epsilon: Annotated[float | None, Opt(help="Clip epsilon [paper: 0.2].")] = None,
    loss_type: Annotated[str | None, Opt(help="grpo, dr_grpo, dapo, bnpo, cispo, sapo "
                                            "[paper: dr_grpo].")] = None,
    correctness_weight: Annotated[float | None, Opt(help="Answer reward weight [paper: 1.0].")] = None,
    format_weight: Annotated[float | None, Opt(help="Format reward weight [paper: 0.2].")] = None,
    use_vllm: Annotated[bool, Opt("--use-vllm", help="Generate with vLLM (needs vllm).")] = False,
    vllm_mode: Annotated[str | None, Opt(help="server (trl vllm-serve) or colocate.")] = None,
    freeze: Freeze = None, freeze_preset: FreezePreset = None, checkpoints: Ckpts = None,
    heldout: Held = None, heldout_max_length: HeldLen = None, trl: Extra = None,
    gradient_checkpointing: GradCkpt = None, report_to: ReportTo = None,
    resume: Resume = False, skip_disk_check: SkipDisk = False,
) -> None:
    """GRPO on questions with correctness + format rewards (TRL GRPOTrainer)."""
    _run("grpo", out, preset, resume, data_dir, skip_disk_check, _common(locals()) | dict(
        num_generations=num_generations, max_completion_length=max_completion_length,
        temperature=temperature, beta=beta, epsilon=epsilon, loss_type=loss_type,
        correctness_weight=correctness_weight, format_weight=format_weight,
        use_vllm=use_vllm or None, vllm_mode=vllm_mode))


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m mechinterp.cli.train`` (e.g. under ``accelerate launch``).

    Args:
        argv: ``sft|grpo`` and its options (None: ``sys.argv[1:]``).

    Returns:
        The exit code (2 for a user error).
    """
    return run_app(train_app, sys.argv[1:] if argv is None else argv, "mechinterp train")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
