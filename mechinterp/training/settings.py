"""Run settings: the paper's values as defaults (for GPU runs) and CPU presets that finish in minutes.

Precedence: ``PAPER[algorithm]`` < ``PRESETS[preset][algorithm]`` < options given explicitly. The
resolved settings are written to ``OUT/train-config.json`` so ``--resume`` continues the same run.

Paper values (arXiv 2507.10616 via its open-r1 fork; ``docs/training.md`` lists them): GRPO lr 1e-6,
constant schedule with 10% warm-up, AdamW, grad clip 0.2, 571 steps, 28 generations per prompt,
temperature 0.6, completions up to 1500 tokens, KL beta 0, clip epsilon 0.2, loss ``dr_grpo``,
rewards correctness 1.0 + format 0.2; SFT lr 1e-6 for 571 steps (the run matched to GRPO), sequences
up to 4096 tokens; 20 checkpoints per run. Values the paper does not state (batch sizes, SFT
schedule) are ours and marked so in ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

ALGORITHMS = ("sft", "grpo")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
#: ``--report-to``: TRL's (transformers') logging integrations; ``all`` = every one installed
REPORT_TO = ("none", "tensorboard", "wandb", "trackio", "all")


@dataclass
class TrainSettings:
    algorithm: str = "sft"
    base: str = "smollm2-135m-instruct"
    data: str = "gsm8k"  # "gsm8k" (train split) or a JSONL file with question/answer
    preset: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    # optimisation
    max_steps: int = 571
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 0.2
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 4096  # SFT: prompt + target tokens
    logging_steps: int = 1
    report_to: str = "none"  # where loss, reward and the drift log also go (REPORT_TO)
    gradient_checkpointing: bool = True  # TRL's default; recomputes activations (slower, less memory)
    # freezing
    freeze: str | None = None
    freeze_preset: str | None = None
    # checkpoints and drift
    checkpoints: int = 20
    n_heldout: int = 16
    heldout_max_length: int = 512
    # GRPO
    num_generations: int = 28
    max_completion_length: int = 1500
    temperature: float = 0.6
    beta: float = 0.0
    epsilon: float = 0.2
    loss_type: str = "dr_grpo"
    correctness_weight: float = 1.0
    format_weight: float = 0.2
    use_vllm: bool = False
    vllm_mode: str = "server"
    extra: dict[str, Any] = field(default_factory=dict)  # more TRL config fields, verbatim

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PAPER: dict[str, dict[str, Any]] = {
    "sft": {},
    "grpo": {"per_device_train_batch_size": 28},  # one full group of 28 per device step
}

#: The study on a CPU: SFT and GRPO on the same synthetic arithmetic prompts (2 per step), the same
#: steps and the same learning rate (the paper's fair comparison), constant schedule with no
#: warm-up (short runs lose nothing to it), 12 steps with 6 checkpoints evenly spaced (every 2
#: steps; with 3 seeds per run kind the default demo takes about half an hour on 2 CPU cores); GRPO
#: samples 4 completions a prompt at the paper's temperature 0.6. The task (``+`` and ``x`` on
#: operands 0-19, spelled out so that a run of another task is never reused as this one) is
#: calibrated so that the base solves about 30% of the samples at that temperature and about half
#: the groups of 4 differ in reward (``benchmarks/calibrate_task.py``; see
#: :mod:`mechinterp.data.arithmetic`), so neither run saturates before its last checkpoint. The drift
#: log's KL at each checkpoint reads 8 held-out items (a forward pass over 32 cost 7 s of the 13 s
#: that every checkpoint added to a run); ``compare``'s kl-drift measures KL for the claims.
CPU_DEMO_TASK = "arithmetic:ops=+x,min=0,max=19,heldout=0.25,seed=0"
CPU_DEMO_COMMON = dict(data=CPU_DEMO_TASK, max_steps=12, learning_rate=2e-5,
                       lr_scheduler_type="constant", warmup_ratio=0.0, max_grad_norm=1.0,
                       checkpoints=6, n_heldout=8, heldout_max_length=256,
                       gradient_checkpointing=False)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu-demo": {
        "sft": dict(CPU_DEMO_COMMON, per_device_train_batch_size=2, max_length=256),
        "grpo": dict(CPU_DEMO_COMMON, per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=32, temperature=0.6),
    },
    # minutes on 2 CPU cores with SmolLM2-135M; moves the weights visibly (lr far above the paper's)
    "cpu-smoke": {
        "sft": dict(max_steps=12, learning_rate=2e-5, per_device_train_batch_size=2,
                    max_length=320, checkpoints=3, n_heldout=4, heldout_max_length=320,
                    max_grad_norm=1.0),
        "grpo": dict(max_steps=6, learning_rate=1e-5, per_device_train_batch_size=4,
                     num_generations=4, max_completion_length=48, temperature=0.9,
                     checkpoints=3, n_heldout=4, heldout_max_length=320, max_grad_norm=1.0),
    },
}

FIELDS = {f.name for f in dataclasses.fields(TrainSettings)}


def resolve_settings(algorithm: str, preset: str | None, overrides: dict[str, Any]) -> TrainSettings:
    """Paper defaults, then the preset, then explicit options (``None`` values are ignored)."""
    if algorithm not in ALGORITHMS:
        raise UserError(f"unknown algorithm {algorithm!r}", f"use one of {', '.join(ALGORITHMS)}")
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}", f"known presets: {', '.join(PRESETS)}")
    values: dict[str, Any] = {"algorithm": algorithm, "preset": preset}
    values |= PAPER[algorithm]
    if preset is not None:
        values |= PRESETS[preset][algorithm]
    unknown = set(overrides) - FIELDS
    if unknown:
        raise UserError(f"unknown training option(s) {', '.join(sorted(unknown))}",
                        "see mechinterp train --help")
    given = {k: v for k, v in overrides.items() if v is not None}
    values |= given
    if "checkpoints" not in given and values.get("max_steps") is not None:
        # a default (paper: 20, or the preset's) fits itself to a shorter run: --max-steps 3
        # saves 3 checkpoints; only a --checkpoints the user asked for is refused when too many
        values["checkpoints"] = max(1, min(values.get("checkpoints", TrainSettings.checkpoints),
                                          values["max_steps"]))
    s = TrainSettings(**values)
    validate(s)
    return s


def validate(s: TrainSettings, world: int | None = None) -> None:
    """Check ``s``; ``world`` is the number of processes (default: the launcher's ``WORLD_SIZE``)."""
    from .distributed import launched_world  # deferred: it imports torch, which settings avoid

    world = launched_world() if world is None else world

    def need(ok: bool, msg: str, fix: str) -> None:
        if not ok:
            raise UserError(msg, fix)

    need(s.max_steps > 0, f"--max-steps {s.max_steps} must be positive", "e.g. --max-steps 20")
    need(s.learning_rate > 0, f"--lr {s.learning_rate} must be positive", "e.g. --lr 1e-6")
    need(1 <= s.checkpoints <= s.max_steps,
         f"--checkpoints {s.checkpoints} must be between 1 and --max-steps {s.max_steps}",
         "one checkpoint is saved at the end of training at least")
    need(s.per_device_train_batch_size > 0 and s.gradient_accumulation_steps > 0,
         "batch size and gradient accumulation must be positive", "e.g. --batch-size 4")
    need(s.n_heldout >= 0, "--heldout must be >= 0", "0 turns KL logging off")
    need(0 <= s.warmup_ratio < 1, f"--warmup-ratio {s.warmup_ratio} must be in [0, 1)", "e.g. 0.1")
    need(s.weight_decay >= 0, "--weight-decay must be >= 0", "e.g. 0.0")
    need(s.report_to in REPORT_TO, f"unknown --report-to {s.report_to!r}",
         f"use one of {', '.join(REPORT_TO)}")
    if s.algorithm == "grpo":
        need(s.num_generations >= 2, f"--num-generations {s.num_generations} must be >= 2",
             "GRPO compares completions within a group")
        # TRL's rule: the global batch (processes x per-device batch x accumulation) holds whole
        # groups; one group may span devices
        glob = s.per_device_train_batch_size * world * s.gradient_accumulation_steps
        need(glob % s.num_generations == 0,
             f"global batch {glob} (batch size {s.per_device_train_batch_size} x {world} "
             f"process(es) x grad-accum {s.gradient_accumulation_steps}) is not a multiple of "
             f"--num-generations {s.num_generations}",
             "make batch size x processes x grad-accum a multiple of --num-generations")
        need(s.max_completion_length > 0, "--max-completion-length must be positive", "e.g. 256")
        need(s.temperature > 0, "--temperature must be positive", "e.g. 0.6")
        need(s.beta >= 0, "--beta must be >= 0", "0 = no KL term (the paper)")
        need(s.loss_type in LOSS_TYPES, f"unknown --loss-type {s.loss_type!r}",
             f"use one of {', '.join(LOSS_TYPES)}")
        need(s.correctness_weight >= 0 and s.format_weight >= 0
             and s.correctness_weight + s.format_weight > 0,
             "reward weights must be >= 0 and not both 0", "e.g. --correctness-weight 1 "
             "--format-weight 0.2")
        need(s.vllm_mode in ("server", "colocate"), f"unknown --vllm-mode {s.vllm_mode!r}",
             "use server or colocate")


def checkpoint_steps(max_steps: int, k: int) -> list[int]:
    """``k`` steps spread evenly through ``max_steps``, the last one at the end: round(i*N/k)."""
    return sorted({max(1, round(i * max_steps / k)) for i in range(1, k + 1)})


# How a run was executed, written beside its settings in train-config.json: facts of the machine
# and launch (the precision scheme chosen for the device, the number of processes), not settings.
# Loading ignores them and a finished run is recognised by its settings alone.
RUN_FACTS = ("precision", "processes")


def save_settings(s: TrainSettings, path: Path, extra: dict[str, Any] | None = None) -> None:
    """The settings, plus ``extra`` facts of the run (:data:`RUN_FACTS`), which loading ignores."""
    unknown = set(extra or {}) - set(RUN_FACTS)
    assert not unknown, f"name {unknown} in RUN_FACTS"  # one list of what is not a setting
    path.write_text(json.dumps(s.to_json() | (extra or {}), indent=1) + "\n")


def settings_differ(saved: dict[str, Any], s: TrainSettings) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, given)}`` for every setting of a stored ``train-config.json`` that differs
    from ``s`` (as JSON, so a tuple equals its list); the :data:`RUN_FACTS` are no settings."""
    given = json.loads(json.dumps(s.to_json()))
    keys = (set(saved) | set(given)) - set(RUN_FACTS)
    return {k: (saved.get(k), given.get(k)) for k in sorted(keys) if saved.get(k) != given.get(k)}


def load_settings(path: Path) -> TrainSettings:
    try:
        raw = json.loads(path.read_text())
        return TrainSettings(**{k: v for k, v in raw.items() if k in FIELDS})
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read {path} ({exc})", "start a new run with another --out") from None
