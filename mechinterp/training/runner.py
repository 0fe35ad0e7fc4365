"""Run SFT or GRPO on TRL with freezing, snapshots, drift logging, resume and clean stops.

``train(settings, out)`` is the whole job; the CLI (``mechinterp train sft|grpo``) only builds the
settings. The output folder ends up as::

    OUT/config.json, model.safetensors, tokenizer   final model: the spec OUT
    OUT/checkpoints/step-N/                          snapshots: the specs OUT@step-N
    OUT/training-drift/result.json (+ figures)       drift log (mechinterp figures OUT)
    OUT/trainer-state/checkpoint-N/                  newest Trainer checkpoint, for --resume
    OUT/train-config.json                            the resolved settings, the precision scheme
                                                     and the number of processes

Under ``accelerate launch`` (N processes) every rank trains on its own device and only rank 0
checks and writes the folder (:mod:`.distributed`); items are rationed for the global batch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models.run_folder import CONFIG_FILE, SNAPSHOT_DIR, SUMMARY_FILE, TRAINER_DIR
from ..models.specs import checkpoint_step
from .callbacks import (
    FreezeGuard,
    Snapshots,
    StopGuard,
    TrainProgress,
    clean_incomplete,
    complete_checkpoints,
    integration_logger,
    link_or_copy,
    save_failure,
)
from .precision import Precision
from .settings import TrainSettings, checkpoint_steps, load_settings, save_settings, validate


@dataclass
class TrainOutcome:
    out: Path
    steps: int
    checkpoints: list[str]
    wall_time_s: float
    freeze_summary: str
    final: dict[str, Any] = field(default_factory=dict)  # the last drift record
    main: bool = True  # rank 0 (or the only process): the one that reports


def combined_freeze_spec(s: TrainSettings, n_layer: int) -> str | None:
    from ..models.selectors import FreezeSpecError, preset_spec

    parts = [p for p in (s.freeze, preset_spec(s.freeze_preset, n_layer) if s.freeze_preset else None)
             if p and p.strip()]
    if len(parts) > 1 and any(p.strip().startswith("only:") for p in parts):
        raise FreezeSpecError("an 'only:' freeze spec cannot be combined with another spec",
                              "use either --freeze or --freeze-preset")
    return ",".join(parts) if parts else None


def resume_settings(out: Path, overrides: dict[str, Any]) -> TrainSettings:
    """The saved settings of ``out``; explicit options must agree with them."""
    path = Path(out) / CONFIG_FILE
    if not path.exists():
        raise UserError(f"--resume: {out} holds no run ({CONFIG_FILE} missing)",
                        "start it without --resume")
    saved = load_settings(path)
    clash = {k: (getattr(saved, k), v) for k, v in overrides.items()
             if v is not None and getattr(saved, k) != v}
    if clash:
        what = ", ".join(f"{k} (run: {a!r}, given: {b!r})" for k, (a, b) in clash.items())
        raise UserError(f"--resume: options differ from the run in {out}: {what}",
                        "resume with the same options (or none), or start a new --out")
    return saved


def _check_out(out: Path, resume: bool) -> None:
    if resume:
        return
    if (out / CONFIG_FILE).exists():
        raise UserError(f"{out} already holds a training run",
                        "pass --resume to continue it, or choose a new --out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty", "choose a new --out folder")


def _disk_check(out: Path, model: torch.nn.Module, n_trainable: int, k: int) -> None:
    per_param = next(model.parameters()).element_size()
    model_bytes = sum(p.numel() for p in model.parameters()) * per_param
    # K snapshots + final + two Trainer checkpoints (model + two fp32 Adam moments) at rotation
    need = (k + 1) * model_bytes + 2 * (model_bytes + 8 * n_trainable)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"{out} has {free / 1e9:.1f} GB free but this run needs about "
                        f"{need / 1e9:.1f} GB ({k} checkpoints)", "free disk space, lower "
                        "--checkpoints, or pass --skip-disk-check")


def _trl_config(s: TrainSettings, out: Path, device: torch.device, prec: Precision):
    on_gpu = device.type == "cuda"
    common = dict(
        output_dir=str(out / TRAINER_DIR), max_steps=s.max_steps, learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler_type, warmup_steps=s.warmup_ratio,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        per_device_train_batch_size=s.per_device_train_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, logging_steps=s.logging_steps,
        save_strategy="no", report_to=report_targets(s.report_to), run_name=out.name, seed=s.seed, data_seed=s.seed, disable_tqdm=True,
        logging_nan_inf_filter=False, use_cpu=not on_gpu,
        bf16=prec.mixed == "bf16", fp16=prec.mixed == "fp16",  # autocast over float32 weights
        dataloader_num_workers=0, gradient_checkpointing=s.gradient_checkpointing,
    )
    if s.algorithm == "sft":
        from trl import SFTConfig

        return SFTConfig(**(common | dict(max_length=s.max_length) | s.extra))
    from trl import GRPOConfig

    return GRPOConfig(**(common | dict(
        num_generations=s.num_generations, max_completion_length=s.max_completion_length,
        temperature=s.temperature, beta=s.beta, epsilon=s.epsilon, loss_type=s.loss_type,
        use_vllm=s.use_vllm, vllm_mode=s.vllm_mode, log_completions=False,
        reward_weights=[s.correctness_weight, s.format_weight]) | s.extra))  # --trl overrides


def report_targets(report_to: str) -> list[str] | str:
    """TrainingArguments' ``report_to`` for ``--report-to``: none -> [], all -> "all" (every
    integration installed), else that one integration."""
    return [] if report_to == "none" else "all" if report_to == "all" else [report_to]


def _check_report_to(report_to: str) -> None:
    """A named integration must be importable (transformers would fail later, inside training)."""
    if report_to in ("none", "all"):
        return
    from transformers.integrations import integration_utils as iu

    if not getattr(iu, f"is_{report_to}_available")():
        raise UserError(f"--report-to {report_to} needs the {report_to} package, which is not "
                        "installed", f"pip install {report_to}, or drop --report-to")


def _datasets(s: TrainSettings, data_dir, tokenizer, world: int = 1):
    from datasets import Dataset

    from ..data import DataSource
    from ..data.arithmetic import is_task
    from ..data.items import load_items, pick
    from ..data.qa import prompt_messages, render_target
    from .drift import build_heldout
    from .prompts import grpo_rows, sft_rows

    source = DataSource.from_option(data_dir)
    items = pick(load_items(s.data, source, "train"), None, s.seed)
    if s.data in (None, "gsm8k") or is_task(s.data):  # a held-out split of its own
        held = pick(load_items(s.data or "gsm8k", source, "test"), s.n_heldout, s.seed)
    else:  # a JSONL file: hold its first n (shuffled) items out of training
        held, items = items[: s.n_heldout], items[s.n_heldout:]
        if not items:
            raise UserError(f"{s.data} has no items left for training after {s.n_heldout} held out",
                            "lower --heldout or add rows")
    # items per optimizer step over all processes (GRPO: prompts, each sampled num_generations
    # times); the samplers shard the global batch over the ranks, so one pass covers the run
    per_step = s.per_device_train_batch_size * s.gradient_accumulation_steps * world
    if s.algorithm == "grpo":
        per_step //= s.num_generations
    items = items[: max(1, per_step * s.max_steps)]
    rows = sft_rows(items) if s.algorithm == "sft" else grpo_rows(items)
    if s.algorithm == "sft":
        _check_prompts_fit(tokenizer, rows, s.max_length)
    heldout = build_heldout(tokenizer, [prompt_messages(i.question) for i in held],
                            [render_target(i) for i in held], s.heldout_max_length) if held else None
    return Dataset.from_list(rows), heldout, source, items


def _check_prompts_fit(tokenizer, rows: list[dict], max_length: int) -> None:
    """TRL truncates each row to ``max_length`` and drops rows left with no completion token; if
    that is every row, say so before training instead of failing inside the data loader."""
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             for r in rows]
    shortest = min(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    if shortest >= max_length:
        raise UserError(f"every SFT prompt is at least {shortest} tokens, so --max-length "
                        f"{max_length} leaves no answer token to train on",
                        f"raise --max-length above {shortest} (answers need room too)")


def train(s: TrainSettings, out: Path, resume: bool = False, data_dir=None, echo=print,
          callbacks: tuple = (), skip_disk_check: bool = False,
          reward_funcs: list | None = None, record: bool = True) -> TrainOutcome:
    """Train as ``s`` says into ``out`` (see the module docstring for the layout).

    ``callbacks`` are extra TrainerCallbacks; ``reward_funcs`` replaces GRPO's correctness and
    format rewards (one weight per function then goes in ``s.extra["reward_weights"]``).
    ``record=False`` trains without snapshots, drift or final model (the benchmark's baseline).
    """
    from ..core.probe import package_versions
    from ..models import load
    from ..models.device import pick_device
    from ..models.selectors import plan
    from . import distributed
    from .drift import answer_logprobs
    from .driftlog import DriftLogger
    from .freeze import FrozenState
    from .precision import choose

    out = Path(out)
    cpu = s.device == "cpu" or not torch.cuda.is_available() or \
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    procs = distributed.current(cpu)
    if not procs.main:
        echo = _quiet
    validate(s, procs.world)  # the GRPO group check needs the real number of processes
    procs.on_main(lambda: _check_out(out, resume))
    _check_report_to(s.report_to)
    if s.use_vllm and importlib.util.find_spec("vllm") is None:
        raise UserError("--use-vllm needs vLLM, which is not installed",
                        "pip install vllm (on a CUDA machine), or drop --use-vllm")
    device = pick_device(distributed.rank_device(s.device, procs))
    deepspeed = bool(s.extra.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    prec = choose(s.dtype, device, deepspeed)
    torch.manual_seed(s.seed)
    lm = load(s.base, device=device, dtype=prec.param_dtype)  # float32 master weights when mixed
    model, tok = lm.hf, lm.tokenizer
    spec = combined_freeze_spec(s, lm.n_layers)
    fplan = plan(model, spec, lm.family)
    if fplan.n_trainable == 0:
        raise UserError(f"freeze spec {spec!r} freezes every parameter", "leave something to train")
    if fplan.partial and s.weight_decay > 0 and deepspeed:
        raise UserError("sliced freezing under DeepSpeed needs --weight-decay 0",
                        "DeepSpeed keeps its own master weights, so only the gradient hooks apply")
    echo(fplan.summary())
    echo(f"precision: {prec.record()['master_weights']}"
         + (f"; {procs.world} processes" if procs.world > 1 else ""))
    train_ds, heldout, source, items = _datasets(s, data_dir, tok, procs.world)
    kept = len(heldout.input_ids) if heldout is not None else 0
    if kept < s.n_heldout:
        echo(f"note: {s.n_heldout - kept} of {s.n_heldout} held-out items left no answer tokens "
             f"within --heldout-max-length {s.heldout_max_length}; KL uses {kept}")

    def prepare_folder():  # rank 0 only; the other ranks wait, and see its errors
        if not skip_disk_check:
            _disk_check(out, model, fplan.n_trainable, s.checkpoints)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _check_processes(out, procs.world)
            removed = clean_incomplete(out)
            if removed:
                echo(f"removed incomplete: {', '.join(removed)}")
        else:
            save_settings(s, out / CONFIG_FILE, {"precision": prec.record(),
                                                  "processes": procs.world})

    procs.on_main(prepare_folder)
    last = None
    if resume:
        done = complete_checkpoints(out)
        last = done[-1] if done else None
        echo(f"resuming from {last}" if last else "no complete checkpoint yet: starting over")

    frozen = FrozenState(model, fplan)
    steps = checkpoint_steps(s.max_steps, s.checkpoints)
    meta = {"algorithm": s.algorithm, "base": s.base, "freeze": spec or "",
            "n_trainable": fplan.n_trainable, "n_frozen": fplan.n_frozen,
            "max_steps": s.max_steps, "n_heldout": len(heldout.input_ids) if heldout else 0,
            "precision": prec.record(), "processes": procs.world}
    prov = {"probe": "training-drift", "probe_version": "1", "settings": s.to_json(),
            "models": {"base": lm.resolved.provenance()}, "data": source.log.to_json(),
            "seed": s.seed, "packages": package_versions(), "device": str(lm.device),
            "dtype": str(lm.dtype)}
    with lm.fused_attention():  # SDPA while training (eager again afterwards)
        # KL's base log-probs: rank 0 writes the drift log, so only it needs them
        base_lp = answer_logprobs(model, heldout) if (
            procs.main and heldout is not None and s.n_heldout) else None
        drift = DriftLogger(out, lm.resolved.path, lm.family, lm.config, heldout, base_lp, meta,
                            prov)
        if last is not None and procs.main:
            drift.resume_from(checkpoint_step(last.name, folder=True))
        snaps = Snapshots(out, steps, drift, echo=echo, procs=procs)
        stop = StopGuard(procs)
        cbs = [FreezeGuard(frozen), stop, *([snaps] if record else []),
               TrainProgress(s.max_steps, s.algorithm, echo), *callbacks]
        cfg = _trl_config(s, out, lm.device, prec)
        if getattr(cfg, "mixed_precision", prec.mixed) != prec.mixed:
            raise UserError(f"training would run with mixed precision {cfg.mixed_precision!r} but "
                            f"--dtype {s.dtype} means {prec.mixed!r}",
                            "make --dtype and the launcher's --mixed_precision agree")
        trainer = _trainer(s, model, cfg, train_ds, tok, cbs, reward_funcs)
        snaps.report = integration_logger(trainer)  # drift -> TensorBoard / W&B / trackio too
        t0 = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(last) if last else None)
        except Exception as exc:  # a full disk is an OSError, SafetensorError or RuntimeError
            what = save_failure(exc, out)
            if what is None:
                raise
            if procs.main:
                clean_incomplete(out)
            good = complete_checkpoints(out)
            where = f"last good checkpoint: {out}@step-{checkpoint_step(good[-1].name, folder=True)}" if good \
                else "no checkpoint was completed"
            raise UserError(f"training stopped: {what} while saving; {where}",
                            "free space, then rerun with --resume") from None
        finally:
            frozen.remove()
    wall = time.perf_counter() - t0
    reason = stop.reason or snaps.reason  # the same on every rank (the stop flags are all-reduced)
    if reason:
        def stopped():
            clean_incomplete(out)
            good = snaps.saved or [checkpoint_step(p.name, folder=True)
                                     for p in complete_checkpoints(out)]
            where = f"last good checkpoint: {out}@step-{max(good)}" if good else "no checkpoint saved"
            raise UserError(f"training stopped: {reason}; {where}",
                            "lower --lr or check the data, then start a new run")

        procs.on_main(stopped)
        raise UserError(f"training stopped: {reason}", "see rank 0's message")  # not reached
    rec = drift.records[-1] if drift.records else {}
    outcome = TrainOutcome(out, trainer.state.global_step, [f"step-{x}" for x in steps], wall,
                           fplan.summary(), rec, procs.main)
    if not record or not procs.main:
        procs.barrier()  # leave together with rank 0, once it has written the final model
        return outcome
    _write_final(out, max(steps), {
        "algorithm": s.algorithm, "preset": s.preset, "steps": outcome.steps,
        "wall_time_s": round(wall, 1), "checkpoints": outcome.checkpoints,
        "freeze": fplan.summary(), "resumed": bool(resume), "precision": prec.record(),
        "processes": procs.world})
    procs.barrier()
    return outcome


def _quiet(*_: Any) -> None:
    """``echo`` on ranks other than 0: one report per job."""


def _check_processes(out: Path, world: int) -> None:
    """--resume continues the data position of a run, which depends on how many processes share
    each step: they must match the run's."""
    saved = json.loads((out / CONFIG_FILE).read_text()).get("processes", 1)
    if saved != world:
        raise UserError(f"--resume: {out} was trained by {saved} process(es), this launch has "
                        f"{world}", f"resume with {saved} process(es)")


def _trainer(s: TrainSettings, model, cfg, train_ds, tok, cbs: list, reward_funcs):
    if s.algorithm == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=cfg, train_dataset=train_ds, processing_class=tok,
                             callbacks=cbs)
    else:
        from .grpo_shared import SharedPromptGRPOTrainer  # TRL's, each group's prompt run once
        from .rewards import correctness, format_reward

        rewards = reward_funcs or [correctness, format_reward]
        trainer = SharedPromptGRPOTrainer(model=model, reward_funcs=rewards, args=cfg,
                              train_dataset=train_ds, processing_class=tok, callbacks=cbs)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def _write_final(out: Path, final_step: int, summary: dict[str, Any]) -> None:
    """The final model in ``out`` (hard links to the last snapshot's files), the drift figures,
    and last the summary that marks the run finished."""
    src = out / SNAPSHOT_DIR / f"step-{final_step}"
    for f in sorted(src.iterdir()):
        if f.is_file():
            (out / f.name).unlink(missing_ok=True)
            link_or_copy(f, out / f.name)
    _draw(out)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")


def _draw(out: Path) -> None:
    from ..store.results import read_result, save_figures
    from .driftlog import PROBE_NAME

    folder = out / PROBE_NAME
    if (folder / "result.json").exists():
        save_figures(read_result(folder).figures(), folder)  # in the house style


def summarise(rec: dict[str, Any]) -> str:
    """One line: mean and max relative change (and where), and the KL, of a drift record."""
    import numpy as np

    rc = rec.get("relative_change") or {}
    if not rc:
        return "no drift recorded"
    flat = [(v, m, layer) for m, vals in rc.items() for layer, v in enumerate(vals) if not math.isnan(v)]
    mean = float(np.mean([v for v, _, _ in flat]))
    top = max(flat)
    kl = rec.get("kl")
    return (f"{rec['checkpoint']}: mean relative change {mean:.3g} (max {top[0]:.3g} at "
            f"{top[1]} layer {top[2]})" + (f", KL from base {kl:.4g}" if kl is not None else ""))
