"""A base model and named variants that are checked to be comparable.

Variants are named by the user (``sft``, ``grpo``...). A variant may be a *run*: several
checkpoints of one training run, written ``sft=DIR@step-40,DIR@step-80`` (or ``sft=DIR@all`` for
every ``step-N``/``checkpoint-N`` folder of a training output, in step order); each checkpoint becomes
a variant named ``sft@step-40`` and ``runs["sft"]`` keeps their order for trajectories.

Comparability (same architecture, parameter names and shapes, tokenizer vocabulary) is checked when
the set is built, from safetensors headers and tokenizers only - no weights are read - so a
mismatch stops before any expensive work. Models load lazily and can be released.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import warnings
from collections.abc import Iterable, Iterator

import torch

from ..errors import IncompatibleModels, SpecError
from .device import check_device_map, parse_max_memory, pick_device
from .loaded import LoadedModel, load, load_tokenizer
from .origin import origin_label
from .safetensors_io import tensor_index
from .specs import (
    ResolvedSpec,
    expand_checkpoints,
    quantisation_origin,
    resolve,
    split_revision,
)

BASE = "base"
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def parse_variant_args(args: Iterable[str]) -> dict[str, list[str]]:
    """``["sft=A", "grpo=B@step-1,B@step-2"]`` -> ``{"sft": ["A"], "grpo": [...]}``."""
    runs: dict[str, list[str]] = {}
    for arg in args:
        if "=" not in arg:
            raise SpecError(f"variant {arg!r} has no name", "write --variant NAME=SPEC, e.g. sft=./out")
        name, specs = arg.split("=", 1)
        name = check_variant_name(name.strip())
        if name in runs:
            raise SpecError(f"variant {name!r} given twice", "give each variant one --variant")
        items = [s.strip() for s in specs.split(",") if s.strip()]
        if not items:
            raise SpecError(f"variant {name!r} has an empty spec", "write --variant NAME=SPEC")
        runs[name] = items
    return runs


def check_variant_name(name: str) -> str:
    """A variant name must be a plain word and not the base's: the CLI and the Python API share
    this check (``ModelSet(base, {"base": x})`` would silently replace the base)."""
    if not isinstance(name, str) or not _NAME.match(name) or name == BASE:
        raise SpecError(f"bad variant name {name!r}",
                        "use letters, digits, '-', '_' or '.', and not 'base'")
    return name


def _checkpoint_label(spec: str, index: int) -> str:
    _, rev = split_revision(spec)
    return rev if rev else f"ckpt-{index}"


class ModelSet:
    """One base plus named variants, lazily loaded, checked comparable on construction.

    ``ms["sft"]`` loads a model (a :class:`~mechinterp.models.loaded.LoadedModel`) on first
    access; ``ms.base`` is the base, ``ms.variants`` the variant names (a run's checkpoints each
    one, ``sft@step-40``), ``ms.runs`` each run's checkpoints in order.

    Args:
        base: the base model's spec (a zoo name, folder, ``.gguf`` file or hub id; see
            :func:`~mechinterp.models.specs.resolve`).
        variants: ``{name: spec}``, or ``{name: [spec, ...]}`` for the checkpoints of one run
            (``DIR@all`` expands to every checkpoint of a training output).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when present.
        dtype: the weights' dtype (``"float32"``, ``"bfloat16"``...); None picks bf16 on CUDA,
            float32 on the CPU.
        check: check on construction, from headers only, that every model has the base's
            architecture, parameter names and shapes and tokenizer vocabulary.
        device_map: accelerate's placement (``"auto"``...) for models larger than one device.
        max_memory: per-device limits for ``device_map`` (``{0: "70GiB", "cpu": "200GiB"}``).
        offload_folder: where ``device_map`` offloads to disk (default: a temporary folder).

    Raises:
        SpecError: a spec that does not resolve or a bad variant name.
        IncompatibleModels: ``check`` found a variant that differs from the base.
    """

    def __init__(self, base: str, variants: dict[str, str | list[str]] | None = None,
                 device: str | None = None, dtype=None, check: bool = True,
                 device_map=None, max_memory: dict | str | None = None,
                 offload_folder: str | None = None):
        if device not in (None, "", "auto"):
            pick_device(device)  # --device cuda without CUDA: refused before any probe runs
        self.device, self.dtype = device, dtype
        # accelerate's big-model placement for every model of the set (see loaded.load): a
        # model larger than one device spreads over the GPUs (then CPU, then disk); probes hold
        # the base and one variant at a time and release each variant when done with it
        self.placement = {k: v for k, v in (("device_map", check_device_map(device_map)),
                                            ("max_memory", parse_max_memory(max_memory)),
                                            ("offload_folder", offload_folder)) if v is not None}
        self.specs: dict[str, ResolvedSpec] = {BASE: resolve(base)}
        self.runs: dict[str, list[str]] = {}
        for run, spec_list in (variants or {}).items():
            check_variant_name(run)
            spec_list = [spec_list] if isinstance(spec_list, str) else list(spec_list)
            spec_list = [s for item in spec_list for s in expand_checkpoints(item)]  # DIR@all
            if len(spec_list) == 1:
                names = [run]
            else:
                names = [f"{run}@{_checkpoint_label(s, i)}" for i, s in enumerate(spec_list)]
                if len(set(names)) != len(names):
                    raise SpecError(f"run {run!r} names the same checkpoint twice",
                                    "list each checkpoint once")
            self.runs[run] = names
            for n, s in zip(names, spec_list):
                self.specs[n] = resolve(s)
        self._loaded: dict[str, LoadedModel] = {}
        self._scopes: list[set[str]] = []
        if check:
            self.check_compatible()

    @classmethod
    def from_args(cls, base: str, variant_args: Iterable[str] = (), **kw) -> ModelSet:
        return cls(base, parse_variant_args(variant_args), **kw)

    # ----- names -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def variants(self) -> list[str]:
        return [n for n in self.specs if n != BASE]

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    # ----- loading -----------------------------------------------------------------------------
    @property
    def base(self) -> LoadedModel:
        return self[BASE]

    def __getitem__(self, name: str) -> LoadedModel:
        if name not in self.specs:
            raise SpecError(f"no model named {name!r} in this set", f"have: {', '.join(self.specs)}")
        if name not in self._loaded:
            self._loaded[name] = load(self.specs[name], self.device, self.dtype, name=name,
                                      **self.placement)
        return self._loaded[name]

    def release(self, name: str) -> None:
        """Free a loaded model's memory now (it reloads on next access).

        The weights themselves are freed (:meth:`LoadedModel.free`), not just this set's
        reference, so peak memory is the base plus one variant even when the caller still holds
        the released object."""
        model = self._loaded.pop(name, None)
        if model is None:
            return
        if self._scopes and name in self._scopes[-1]:
            return  # loaded before this probe ran: the caller's object, not the probe's to free
        model.free()
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def run_scope(self):
        """While a probe runs (the runner enters this), :meth:`release` frees only models the
        probe loaded itself: one a notebook loaded before (``m = models["sft"]``) stays usable."""
        self._scopes.append(set(self._loaded))
        try:
            yield self
        finally:
            self._scopes.pop()

    def provenance(self) -> dict:
        return {name: spec.provenance() for name, spec in self.specs.items()}

    # ----- checks ------------------------------------------------------------------------------
    def check_compatible(self) -> None:
        """Stop with one line naming the first difference between the base and a variant."""
        base = self.specs[BASE]
        b_cfg = _arch(base)
        b_shapes = {k: v[1] for k, v in tensor_index(base.path).items()}
        b_vocab = None
        b_origin = quantisation_origin(base.path)
        for name in self.variants:
            spec = self.specs[name]
            if spec.path == base.path:
                continue
            v_origin = quantisation_origin(spec.path)
            if _origin_key(v_origin) != _origin_key(b_origin):
                warnings.warn(
                    f"variant {name!r} has {origin_label(v_origin)}, the base has "
                    f"{origin_label(b_origin)}: weight change and KL include the quantisation "
                    "difference, not only fine-tuning (compare a fine-tune with the weights it "
                    "started from)", stacklevel=3)
            v_cfg = _arch(spec)
            if v_cfg != b_cfg:
                raise IncompatibleModels(
                    f"variant {name!r} ({spec.spec}) is {v_cfg[0]} {v_cfg[1]}, base is {b_cfg[0]} "
                    f"{b_cfg[1]}", "compare checkpoints of the same architecture")
            v_shapes = {k: v[1] for k, v in tensor_index(spec.path).items()}
            for key in sorted(set(b_shapes) | set(v_shapes)):
                if key not in v_shapes or key not in b_shapes:
                    where = "variant" if key not in v_shapes else "base"
                    raise IncompatibleModels(f"parameter {key} is missing from the {where} "
                                             f"({name!r}: {spec.spec})",
                                             "compare checkpoints of the same architecture")
                if v_shapes[key] != b_shapes[key]:
                    raise IncompatibleModels(
                        f"parameter {key} has shape {v_shapes[key]} in variant {name!r} but "
                        f"{b_shapes[key]} in the base", "compare checkpoints of the same model size")
            if b_vocab is None:
                b_vocab = load_tokenizer(base.path).get_vocab()
            v_vocab = load_tokenizer(spec.path).get_vocab()
            if v_vocab != b_vocab:
                diff = sorted(set(v_vocab.items()) ^ set(b_vocab.items()))[:1]
                raise IncompatibleModels(
                    f"tokenizer vocabulary of variant {name!r} differs from the base "
                    f"({len(v_vocab)} vs {len(b_vocab)} entries; first difference {diff})",
                    "fine-tunes must keep the base tokenizer")


def _origin_key(origin: dict | None) -> tuple | None:
    return None if origin is None else (origin.get("file_type"), origin.get("gguf_sha256"))


def _arch(spec: ResolvedSpec) -> tuple[str, str]:
    cfg = json.loads((spec.path / "config.json").read_text())
    return (cfg.get("model_type", "?"), ",".join(cfg.get("architectures") or []))
