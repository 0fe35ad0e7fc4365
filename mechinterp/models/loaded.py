"""A loaded model and its three views over one copy of the weights.

``hf`` is the Hugging Face module; ``bridge`` a TransformerLens ``TransformerBridge`` and ``lm`` an
nnsight ``LanguageModel``, both built lazily *around* ``hf`` (no copy: the parity test checks
storage pointers). Attention runs in eager mode so that all three compute the same thing and the
bridge can expose attention patterns.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CorruptCheckpoint
from .device import pick_device, pick_dtype
from .naming import BRIDGE_HOOKS, Family, ParamSlice, check_family, family_for, n_layers
from .safetensors_io import tensor_index
from .specs import ResolvedSpec, resolve


@dataclass(eq=False)
class LoadedModel:
    resolved: ResolvedSpec
    hf: torch.nn.Module
    tokenizer: object
    family: Family
    device: torch.device
    dtype: torch.dtype
    name: str = "model"
    _views: dict = field(default_factory=dict, repr=False)

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
        return ref.take(self.hf.get_parameter(ref.name))

    def module(self, layer: int, site: str) -> torch.nn.Module:
        """The HF module whose output is ``site`` (``attn_out``, ``mlp_out``, ``resid_post``)."""
        return self.hf.get_submodule(self.family.module(layer, site))

    @staticmethod
    def hook_name(site: str, layer: int) -> str:
        """TransformerBridge hook name of a site, e.g. ``hook_name("mlp_out", 5)``."""
        return BRIDGE_HOOKS[site].format(layer=layer)

    # ----- views -------------------------------------------------------------------------------
    @property
    def bridge(self):
        """TransformerLens view (``TransformerBridge``) sharing ``hf``'s parameters."""
        if "bridge" not in self._views:
            from transformer_lens.model_bridge import TransformerBridge

            logging.getLogger("transformer_lens").setLevel(logging.ERROR)
            self._views["bridge"] = TransformerBridge.boot_transformers(
                str(self.resolved.path), hf_model=self.hf, tokenizer=self.tokenizer,
                device=self.device, dtype=self.dtype,
            )
        return self._views["bridge"]

    @property
    def lm(self):
        """nnsight view (``LanguageModel``) wrapping ``hf`` itself."""
        if "lm" not in self._views:
            from nnsight import LanguageModel

            self._views["lm"] = LanguageModel(self.hf, tokenizer=self.tokenizer)
        return self._views["lm"]

    def encode(self, texts: list[str] | str, **kw) -> dict[str, torch.Tensor]:
        """Tokenise with right padding onto the model's device."""
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, **kw)
        return {k: v.to(self.device) for k, v in enc.items()}


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load(spec: str | ResolvedSpec, device: str | None = None, dtype=None,
         name: str = "model") -> LoadedModel:
    """Resolve and load a model spec onto a device; checks weights and the component map."""
    from transformers import AutoModelForCausalLM

    resolved = spec if isinstance(spec, ResolvedSpec) else resolve(spec)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    index = tensor_index(resolved.path)  # validates every safetensors header first
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(resolved.path), dtype=dt, attn_implementation="eager"
        )
    except Exception as exc:  # noqa: BLE001 - report any loader failure as one line
        raise CorruptCheckpoint(
            f"cannot load {resolved.spec!r} from {resolved.path}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            "check that the folder is a complete save_pretrained checkpoint",
        ) from None
    hf.to(dev).eval()
    family = family_for(hf.config)
    check_family(family, hf.config, {k: v[1] for k, v in index.items()} | {
        n: tuple(p.shape) for n, p in hf.named_parameters()})
    return LoadedModel(resolved, hf, load_tokenizer(resolved.path), family, dev, dt, name)


@functools.cache
def _silence_warnings() -> None:  # pragma: no cover - cosmetic
    import warnings

    warnings.filterwarnings("ignore", message=".*attn_implementation.*")
