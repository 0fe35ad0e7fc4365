"""Run SFT or GRPO on TRL with freezing, snapshots, drift logging, resume and clean stops.

``train(settings, out)`` is the whole job; the CLI (``mechinterp train sft|grpo``) only builds the
settings. The output folder's layout is :mod:`mechinterp.models.run_folder`'s: the final model in
``OUT``, snapshots ``OUT@step-N``, the drift log (``mechinterp figures OUT`` redraws it), the newest
Trainer checkpoint for ``--resume``, and ``train-config.json`` with the resolved settings, the
precision scheme and the number of processes.

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
from typing import Any, NoReturn

import numpy as np
import torch
from transformers.integrations import integration_utils
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..data.arithmetic import is_task
from ..data.base import DataSource
from ..data.items import load_items, pick
from ..data.qa import prompt_messages, render_target
from ..errors import UserError
from ..models.device import pick_device
from ..models.loaded import LoadedModel, load
from ..models.run_folder import CONFIG_FILE, SNAPSHOT_DIR, SUMMARY_FILE, TRAINER_DIR
from ..models.selectors import FreezePlan, FreezeSpecError, plan, preset_spec
from ..paths import checkpoint_step
from ..store.drift_log import DRIFT_LOG
from ..store.provenance import build_provenance
from ..store.results import read_result, save_figures
from . import distributed
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
from .distributed import Procs
from ..evals.answers import TokenisedItems
from .drift import answer_logprobs, build_heldout
from .driftlog import PROBE_NAME, DriftLogger
from .freeze import FrozenState
from .precision import Precision, choose
from .prompts import grpo_rows, sft_rows
from .rewards import correctness, format_reward
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
    """The freeze spec of ``--freeze`` and ``--freeze-preset`` together (None: freeze nothing)."""
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
        from trl import SFTConfig  # deferred: TRL is heavy to import

        cfg = SFTConfig(**(common | dict(max_length=s.max_length) | s.extra))
    else:
        from trl import GRPOConfig  # deferred: TRL is heavy to import

        cfg = GRPOConfig(**(common | dict(
            num_generations=s.num_generations, max_completion_length=s.max_completion_length,
            temperature=s.temperature, beta=s.beta, epsilon=s.epsilon, loss_type=s.loss_type,
            use_vllm=s.use_vllm, vllm_mode=s.vllm_mode, log_completions=False,
            reward_weights=[s.correctness_weight, s.format_weight]) | s.extra))  # --trl overrides
    if getattr(cfg, "mixed_precision", prec.mixed) != prec.mixed:
        raise UserError(f"training would run with mixed precision {cfg.mixed_precision!r} but "
                        f"--dtype {s.dtype} means {prec.mixed!r}",
                        "make --dtype and the launcher's --mixed_precision agree")
    return cfg


def report_targets(report_to: str) -> list[str] | str:
    """TrainingArguments' ``report_to`` for ``--report-to``: none -> [], all -> "all" (every
    integration installed), else that one integration."""
    return [] if report_to == "none" else "all" if report_to == "all" else [report_to]


def _check_report_to(report_to: str) -> None:
    """A named integration must be importable (transformers would fail later, inside training)."""
    if report_to in ("none", "all"):
        return
    if not getattr(integration_utils, f"is_{report_to}_available")():
        raise UserError(f"--report-to {report_to} needs the {report_to} package, which is not "
                        "installed", f"pip install {report_to}, or drop --report-to")


def _datasets(s: TrainSettings, data_dir, tokenizer, world: int = 1, echo=print):
    """The training rows (rationed for the run's steps), the held-out answers KL is measured on
    (None when none are held out) and the data source that recorded what was read."""
    from datasets import Dataset  # deferred: the datasets package is heavy to import

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
    kept = len(heldout.input_ids) if heldout is not None else 0
    if kept < s.n_heldout:
        echo(f"note: {s.n_heldout - kept} of {s.n_heldout} held-out items left no answer tokens "
             f"within --heldout-max-length {s.heldout_max_length}; KL uses {kept}")
    return Dataset.from_list(rows), heldout, source


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


@dataclass
class _Base:
    """The base model as a run trains it: loaded, its precision scheme and its freeze plan."""

    lm: LoadedModel
    prec: Precision
    spec: str | None
    plan: FreezePlan


def train(s: TrainSettings, out: Path, resume: bool = False, data_dir=None, echo=print,
          callbacks: tuple = (), skip_disk_check: bool = False,
          reward_funcs: list | None = None, record: bool = True) -> TrainOutcome:
    """Train as ``s`` says into ``out`` (see the module docstring for the layout).

    Args:
        s: the resolved settings (:func:`~mechinterp.training.settings.resolve_settings`).
        out: the output folder; new and empty, or a run of the same settings with ``resume``.
        resume: continue from the newest complete checkpoint in ``out``.
        data_dir: the data root (else ``MECHINTERP_DATA``, else the hub).
        echo: where progress lines go (rank 0 only under a launch).
        callbacks: extra TrainerCallbacks.
        skip_disk_check: start even when the disk looks too small for the checkpoints.
        reward_funcs: replaces GRPO's correctness and format rewards (one weight per function
            then goes in ``s.extra["reward_weights"]``).
        record: False trains without snapshots, drift or final model (the benchmark's baseline).

    Returns:
        The steps, checkpoints, wall time, freeze summary and last drift record of the run.
    """
    out = Path(out)
    procs = _launch_checks(s, out, resume)
    echo = echo if procs.main else _quiet
    base = _load_base(s, procs, echo)
    lm = base.lm
    train_ds, heldout, source = _datasets(s, data_dir, lm.tokenizer, procs.world, echo)
    procs.on_main(lambda: _prepare_folder(s, out, base, procs, resume, skip_disk_check, echo))
    last = _resume_point(out, resume, echo)
    frozen = FrozenState(lm.hf, base.plan)
    steps = checkpoint_steps(s.max_steps, s.checkpoints)
    with lm.fused_attention():  # SDPA while training (eager again afterwards)
        drift = _drift_logger(s, out, base, heldout, source, procs, last)
        snaps = Snapshots(out, steps, drift, echo=echo, procs=procs)
        stop = StopGuard(procs)
        cbs = [FreezeGuard(frozen), stop, *([snaps] if record else []),
               TrainProgress(s.max_steps, s.algorithm, echo), *callbacks]
        cfg = _trl_config(s, out, lm.device, base.prec)
        trainer = _trainer(s, lm.hf, cfg, train_ds, lm.tokenizer, cbs, reward_funcs)
        snaps.report = integration_logger(trainer)  # drift -> TensorBoard / W&B / trackio too
        t0 = time.perf_counter()
        try:
            _fit(trainer, out, last, procs)
        finally:
            frozen.remove()
    wall = time.perf_counter() - t0
    reason = stop.reason or snaps.reason  # the same on every rank (the stop flags are all-reduced)
    if reason:
        _stop(reason, out, snaps.saved, procs)
    outcome = TrainOutcome(out, trainer.state.global_step, [f"step-{x}" for x in steps], wall,
                           base.plan.summary(), drift.records[-1] if drift.records else {},
                           procs.main)
    if record and procs.main:
        _write_final(out, max(steps), {
            "algorithm": s.algorithm, "preset": s.preset, "steps": outcome.steps,
            "wall_time_s": round(wall, 1), "checkpoints": outcome.checkpoints,
            "freeze": outcome.freeze_summary, "resumed": bool(resume),
            "precision": base.prec.record(), "processes": procs.world})
    procs.barrier()  # every rank leaves together, once rank 0 has written the final model
    return outcome


def _launch_checks(s: TrainSettings, out: Path, resume: bool) -> Procs:
    """This process in the launch, once the checks that need no model have passed."""
    cpu = s.device == "cpu" or not torch.cuda.is_available() or \
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    procs = distributed.current(cpu)
    validate(s, procs.world)  # the GRPO group check needs the real number of processes
    procs.on_main(lambda: _check_out(out, resume))
    _check_report_to(s.report_to)
    if s.use_vllm and importlib.util.find_spec("vllm") is None:
        raise UserError("--use-vllm needs vLLM, which is not installed",
                        "pip install vllm (on a CUDA machine), or drop --use-vllm")
    return procs


def _load_base(s: TrainSettings, procs: Procs, echo) -> _Base:
    """The base on this rank's device in the precision ``s`` asks for, and its freeze plan."""
    device = pick_device(distributed.rank_device(s.device, procs))
    deepspeed = bool(s.extra.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    prec = choose(s.dtype, device, deepspeed)
    torch.manual_seed(s.seed)
    lm = load(s.base, device=device, dtype=prec.param_dtype)  # float32 master weights when mixed
    spec = combined_freeze_spec(s, lm.n_layers)
    fplan = plan(lm.hf, spec, lm.family)
    if fplan.n_trainable == 0:
        raise UserError(f"freeze spec {spec!r} freezes every parameter", "leave something to train")
    if fplan.partial and s.weight_decay > 0 and deepspeed:
        raise UserError("sliced freezing under DeepSpeed needs --weight-decay 0",
                        "DeepSpeed keeps its own master weights, so only the gradient hooks apply")
    echo(fplan.summary())
    echo(f"precision: {prec.record()['master_weights']}"
         + (f"; {procs.world} processes" if procs.world > 1 else ""))
    return _Base(lm, prec, spec, fplan)


def _prepare_folder(s: TrainSettings, out: Path, base: _Base, procs: Procs, resume: bool,
                    skip_disk_check: bool, echo) -> None:
    """Rank 0 (the other ranks wait, and see its errors): check the disk, then clean a resumed
    run's half-written checkpoints or write a new run's settings."""
    if not skip_disk_check:
        _disk_check(out, base.lm.hf, base.plan.n_trainable, s.checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_processes(out, procs.world)
        removed = clean_incomplete(out)
        if removed:
            echo(f"removed incomplete: {', '.join(removed)}")
    else:
        save_settings(s, out / CONFIG_FILE, {"precision": base.prec.record(),
                                              "processes": procs.world})


def _resume_point(out: Path, resume: bool, echo) -> Path | None:
    """The newest complete Trainer checkpoint to resume from (None: start from the base)."""
    if not resume:
        return None
    done = complete_checkpoints(out)
    last = done[-1] if done else None
    echo(f"resuming from {last}" if last else "no complete checkpoint yet: starting over")
    return last


def _drift_provenance(s: TrainSettings, lm: LoadedModel, source: DataSource) -> dict[str, Any]:
    return build_provenance(DRIFT_LOG, "1", settings=s.to_json(),
                            models={"base": lm.resolved.provenance()}, data=source.log.to_json(),
                            seed=s.seed, device=lm.device, dtype=lm.dtype)


def _drift_logger(s: TrainSettings, out: Path, base: _Base, heldout: TokenisedItems | None,
                  source: DataSource, procs: Procs, last: Path | None) -> DriftLogger:
    """The run's drift log, holding the base's answer log-probs for KL (rank 0 writes the log, so
    only it computes them); continued from ``last`` when resuming."""
    lm, fplan = base.lm, base.plan
    meta = {"algorithm": s.algorithm, "base": s.base, "freeze": base.spec or "",
            "n_trainable": fplan.n_trainable, "n_frozen": fplan.n_frozen,
            "max_steps": s.max_steps, "n_heldout": len(heldout.input_ids) if heldout else 0,
            "precision": base.prec.record(), "processes": procs.world}
    prov = _drift_provenance(s, lm, source)
    base_lp = answer_logprobs(lm.hf, heldout) if (
        procs.main and heldout is not None and s.n_heldout) else None
    drift = DriftLogger(out, lm.resolved.path, lm.family, lm.config, heldout, base_lp, meta, prov)
    if last is not None and procs.main:
        drift.resume_from(checkpoint_step(last.name, folder=True))
    return drift


def _fit(trainer, out: Path, last: Path | None, procs: Procs) -> None:
    """Run the Trainer (from ``last`` when resuming); a failed checkpoint write stops with one
    line naming the last good checkpoint."""
    try:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    except Exception as exc:  # a full disk is an OSError, SafetensorError or RuntimeError
        what = save_failure(exc, out)
        if what is None:
            raise
        if procs.main:
            clean_incomplete(out)
        good = complete_checkpoints(out)
        where = f"last good checkpoint: {out}@step-{checkpoint_step(good[-1].name, folder=True)}" \
            if good else "no checkpoint was completed"
        raise UserError(f"training stopped: {what} while saving; {where}",
                        "free space, then rerun with --resume") from None


def _stop(reason: str, out: Path, saved: list[int], procs: Procs) -> NoReturn:
    """Stop every rank on a non-finite loss or weights; rank 0 cleans up and names the last good
    checkpoint (``saved``: the steps this launch snapshotted)."""
    def stopped():
        clean_incomplete(out)
        good = saved or [checkpoint_step(p.name, folder=True) for p in complete_checkpoints(out)]
        where = f"last good checkpoint: {out}@step-{max(good)}" if good else "no checkpoint saved"
        raise UserError(f"training stopped: {reason}; {where}",
                        "lower --lr or check the data, then start a new run")

    procs.on_main(stopped)
    raise UserError(f"training stopped: {reason}", "see rank 0's message")  # not reached


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
        from trl import SFTTrainer  # deferred: TRL is heavy to import

        trainer = SFTTrainer(model=model, args=cfg, train_dataset=train_ds, processing_class=tok,
                             callbacks=cbs)
    else:
        # TRL's GRPO trainer, each group's prompt run once
        from .grpo_shared import SharedPromptGRPOTrainer  # deferred: trl (heavy to import)

        rewards = reward_funcs or [correctness, format_reward]
        trainer = SharedPromptGRPOTrainer(model=model, reward_funcs=rewards, args=cfg,
                              train_dataset=train_ds, processing_class=tok, callbacks=cbs)
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
    folder = out / PROBE_NAME
    if (folder / "result.json").exists():
        save_figures(read_result(folder).figures(), folder)  # in the house style


def summarise(rec: dict[str, Any]) -> str:
    """One line: mean and max relative change (and where), and the KL, of a drift record."""
    rc = rec.get("relative_change") or {}
    if not rc:
        return "no drift recorded"
    flat = [(v, m, layer) for m, vals in rc.items() for layer, v in enumerate(vals) if not math.isnan(v)]
    mean = float(np.mean([v for v, _, _ in flat]))
    top = max(flat)
    kl = rec.get("kl")
    return (f"{rec['checkpoint']}: mean relative change {mean:.3g} (max {top[0]:.3g} at "
            f"{top[1]} layer {top[2]})" + (f", KL from base {kl:.4g}" if kl is not None else ""))
