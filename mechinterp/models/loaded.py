"""A loaded model and its three views over one copy of the weights.

``hf`` is the Hugging Face module; ``bridge`` a TransformerLens ``TransformerBridge`` and ``lm`` an
nnsight ``TransformersModel``, both built lazily over ``hf``'s parameter tensors (no copy of the
weights: the parity test checks storage pointers). The bridge gets a shadow module tree because it
rewires the modules it wraps; ``hf`` itself is never restructured. One exception to the sharing:
for fused-QKV families (GPT-2) TransformerLens splits ``c_attn`` into separate k/v copies, so after
editing those weights in place call :meth:`LoadedModel.refresh_views`. Attention runs in eager mode so that all three compute the same thing and the
bridge can expose attention patterns.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CorruptCheckpoint, UserError
from ..paths import cache_dir
from .device import check_device_map, input_device, parse_max_memory, pick_device, pick_dtype
from .naming import BRIDGE_HOOKS, Family, ParamSlice, check_family, family_for, n_layers
from .safetensors_io import tensor_index
from .specs import ResolvedSpec, resolve


@dataclass(eq=False)
class LoadedModel:
    """A model loaded from a spec, with three views over one copy of its weights.

    Attributes:
        resolved: the spec and the local folder it resolved to.
        hf: the Hugging Face module (eager attention, eval mode).
        tokenizer: its tokenizer (a pad token set when it had none).
        family: the component map (which parameter is ``q``, ``mlp_out``... in each layer).
        device: where inputs go (the first layer's device under a device map).
        dtype: the weights' dtype.
        name: the name the model has in its :class:`~mechinterp.models.modelset.ModelSet`.
        placement: ``{module: device}`` when loaded with a device map, else None.

    ``bridge`` (TransformerLens) and ``lm`` (nnsight) are built on first access;
    :meth:`weight`, :meth:`module` and :meth:`hook_name` address a layer's components by the
    names every family shares.
    """

    resolved: ResolvedSpec
    hf: torch.nn.Module
    tokenizer: object
    family: Family
    device: torch.device
    dtype: torch.dtype
    name: str = "model"
    #: where accelerate placed each module (``{module: device}``, "disk"/"cpu" = offloaded)
    #: when loaded with a device map; None for a model on one device
    placement: dict | None = None
    _views: dict = field(default_factory=dict, repr=False)
    _offload_dir: str | None = field(default=None, repr=False)  # ours to delete on free()

    # ----- facts -------------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return n_layers(self.config)

    @property
    def matrices(self) -> tuple[str, ...]:
        return self.family.matrices

    def param_slice(self, layer: int, matrix: str) -> ParamSlice:
        return self.family.param(layer, matrix, self.config)

    def weight(self, layer: int, matrix: str) -> torch.Tensor:
        """The live weight of ``matrix`` in ``layer`` (a view: editing it edits the model)."""
        ref = self.param_slice(layer, matrix)
        param = self.hf.get_parameter(ref.name)
        if param.device.type == "meta":
            raise UserError(f"{self.name}: {ref.name} is offloaded (device map "
                            f"{self.placement and set(self.placement.values())}), it cannot be "
                            "read or edited in place",
                            "give the GPUs more room (--max-memory) so that no layer is offloaded")
        return ref.take(param)

    def module(self, layer: int, site: str) -> torch.nn.Module:
        """The HF module whose output is ``site`` (``attn_out``, ``mlp_out``, ``resid_post``)."""
        return self.hf.get_submodule(self.family.module(layer, site))

    @staticmethod
    def hook_name(site: str, layer: int) -> str:
        """TransformerBridge hook name of a site, e.g. ``hook_name("mlp_out", 5)``."""
        return BRIDGE_HOOKS[site].format(layer=layer)

    @contextlib.contextmanager
    def fused_attention(self):
        """Inside the block ``hf`` runs PyTorch's fused attention (SDPA) instead of eager; for work
        that reads no attention pattern (scoring, generation). Eager again afterwards, also on error.
        A model whose family cannot switch stays eager."""
        before = self.hf.config._attn_implementation
        try:
            self.hf.set_attn_implementation("sdpa")
        except (ValueError, ImportError, NotImplementedError):
            pass
        try:
            yield self
        finally:
            if self.hf.config._attn_implementation != before:
                self.hf.set_attn_implementation(before)

    # ----- views -------------------------------------------------------------------------------
    @property
    def bridge(self):
        """TransformerLens view (``TransformerBridge``) sharing ``hf``'s parameters."""
        if "bridge" not in self._views:
            # deferred: TransformerLens is heavy to import
            from transformer_lens.model_bridge import TransformerBridge

            logging.getLogger("transformer_lens").setLevel(logging.ERROR)
            self._views["bridge"] = TransformerBridge.boot_transformers(
                str(self.resolved.path), hf_model=_shadow(self.hf), tokenizer=self.tokenizer,
                device=self.device, dtype=self.dtype,
            )
        return self._views["bridge"]

    @property
    def lm(self):
        """nnsight view (``TransformersModel``, the successor of ``LanguageModel``) wrapping ``hf``."""
        if "lm" not in self._views:
            from nnsight import TransformersModel  # deferred: nnsight is heavy to import

            if self.placement and next(iter(self.placement.values())) == "disk":
                # the transformers pipeline nnsight builds takes the first device of the map
                # as its own, and nnsight's meta-tensor scan cannot pass the offload hooks
                raise UserError(f"{self.name}: the nnsight view cannot wrap a model whose input "
                                "embedding is offloaded to disk",
                                "give the GPUs or the CPU room for it (--max-memory)")
            # its own tokenizer: nnsight switches the one it is given to left padding
            self._views["lm"] = TransformersModel(self.hf, task="text-generation",
                                                  tokenizer=copy.deepcopy(self.tokenizer))
        return self._views["lm"]

    def free(self) -> None:
        """Give the weights' memory back now, even where other references to this object live
        on (a probe's loop variable still naming the previous variant while the next loads):
        the parameters move to the meta device, which holds no storage, and the views are
        dropped. The object is unusable afterwards; load the spec again. A model placed by
        accelerate loses its hooks first (they hold the offloaded weights), and a temporary
        offload folder of ours is deleted."""
        self._views.clear()
        if self.placement is not None:
            # deferred: accelerate is heavy to import
            from accelerate.hooks import remove_hook_from_submodules

            remove_hook_from_submodules(self.hf)
        self.hf.to("meta")
        if self._offload_dir is not None:
            self._offload_dir = _remove(self._offload_dir)

    def refresh_views(self) -> None:
        """Drop the bridge and nnsight views; they are rebuilt on next access."""
        self._views.clear()

    def encode(self, texts: list[str] | str, padding_side: str = "right",
               **kw) -> dict[str, torch.Tensor]:
        """Tokenise (padding on ``padding_side``) onto the model's device."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side,
                             **kw)
        return {k: v.to(self.device) for k, v in enc.items()}


def _shadow(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree holding the *same* parameter and buffer objects.

    ``TransformerBridge`` rewires the module it is given (it swaps each submodule for a bridge
    component, which renames every parameter to ``..._original_component...``). Handing it this
    shadow keeps the HF view's module paths and ``state_dict`` keys intact, while the weights stay
    one copy: an edit through either view is seen by both, and so is training.
    """
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


def _remove(folder: str | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer  # deferred: transformers is heavy to import

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _placement(name: str, device_map, max_memory: dict | None,
               offload_folder: str | None) -> tuple[dict, str | None]:
    """``from_pretrained``'s placement arguments for ``device_map`` (none without one), and the
    temporary offload folder made for them when none was given (ours to delete)."""
    if device_map is None:
        return {}, None
    own_dir = None
    if offload_folder is None:
        (cache_dir() / "offload").mkdir(parents=True, exist_ok=True)
        offload_folder = own_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=cache_dir() / "offload")
    return dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder), own_dir


def load(spec: str | ResolvedSpec, device: str | None = None, dtype=None,
         name: str = "model", device_map=None, max_memory: dict | str | None = None,
         offload_folder: str | None = None) -> LoadedModel:
    """Resolve and load a model spec onto a device; checks weights and the component map.

    Args:
        spec: a spec string (see :func:`~mechinterp.models.specs.resolve`) or a resolved one.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when present.
        dtype: the weights' dtype; None picks bf16 where CUDA is present, else float32.
        name: the model's name in messages and in a :class:`~mechinterp.models.modelset.ModelSet`.
        device_map: ``"auto"``, ``"balanced"``, ``"sequential"`` or ``{module: device}`` places
            the model across devices with accelerate's big-model inference instead: its layers
            fill the GPUs (each limited by ``max_memory``), then the CPU, then disk. Accelerate's
            hooks move each layer's inputs to its device; ``device`` then only picks the dtype.
        max_memory: per-device limits for ``device_map``, e.g. ``{0: "70GiB", "cpu": "200GiB"}``.
        offload_folder: where ``device_map`` offloads to disk (default: a temporary folder,
            deleted by :meth:`LoadedModel.free`).

    Returns:
        The loaded model, in eval mode with eager attention.

    Raises:
        CorruptCheckpoint: a weight file or header is damaged, or the loader fails.
        SpecError: the spec does not resolve (see :func:`~mechinterp.models.specs.resolve`).
    """
    from transformers import AutoModelForCausalLM  # deferred: transformers is heavy to import

    resolved = spec if isinstance(spec, ResolvedSpec) else resolve(spec)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    device_map, max_memory = check_device_map(device_map), parse_max_memory(max_memory)
    index = tensor_index(resolved.path)  # validates every safetensors header first
    placed, own_dir = _placement(name, device_map, max_memory, offload_folder)
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(resolved.path), dtype=dt, attn_implementation="eager", **placed
        )
    except Exception as exc:  # noqa: BLE001 - report any loader failure as one line
        _remove(own_dir)
        raise CorruptCheckpoint(
            f"cannot load {resolved.spec!r} from {resolved.path}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            "check that the folder is a complete save_pretrained checkpoint"
            + ("" if device_map is None else ", and the device map and --max-memory"),
        ) from None
    placement = None
    if device_map is None:
        hf.to(dev)
    else:
        placement = {k: str(v) for k, v in (getattr(hf, "hf_device_map", None) or {}).items()}
        dev = input_device(hf)
        if own_dir is not None and "disk" not in placement.values():
            own_dir = _remove(own_dir)
    hf.eval()
    family = family_for(hf.config)
    check_family(family, hf.config, {k: v[1] for k, v in index.items()} | {
        n: tuple(p.shape) for n, p in hf.named_parameters()})
    return LoadedModel(resolved, hf, load_tokenizer(resolved.path), family, dev, dt, name,
                       placement, _offload_dir=own_dir)
