"""One naming scheme for components across architecture families.

Analyses speak of ``layer`` and ``matrix`` (``q k v o gate up down``, or ``in out`` for a
non-gated MLP) and of hook *sites* (``resid_pre resid_mid resid_post attn_out mlp_out
attn_pattern``). Each family maps those once onto Hugging Face parameter names and module paths;
:func:`check_family` verifies the mapping against a loaded model (shapes included) so that a wrong
map fails on load, not halfway through an analysis.

TransformerLens' ``TransformerBridge`` already gives every family the same hook names, so sites map
to ``blocks.{layer}.hook_*`` for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SpecError

ATTN = ("q", "k", "v", "o")
GATED_MLP = ("gate", "up", "down")
PLAIN_MLP = ("in", "out")

#: Hook sites and their TransformerBridge names (identical for every family).
BRIDGE_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_pattern": "blocks.{layer}.attn.hook_pattern",
}


@dataclass(frozen=True)
class ParamSlice:
    """A weight matrix as a (possibly sliced) Hugging Face parameter.

    GPT-2 stores q, k and v fused in one ``Conv1D`` weight of shape (d_model, 3 d_model); its q is
    the slice ``[:, 0:d_model]`` along dim 1. Unfused families use the whole tensor.
    """

    name: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            return tensor
        return tensor.narrow(self.dim, self.start, (self.stop or tensor.shape[self.dim]) - self.start)


@dataclass(frozen=True)
class Family:
    """How one architecture family names its parts."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # module path of the list of blocks
    attn_module: str  # relative to a block
    mlp_module: str
    param_names: dict[str, str]  # matrix -> parameter name relative to a block ("" for fused)
    gated: bool = True

    @property
    def matrices(self) -> tuple[str, ...]:
        return ATTN + (GATED_MLP if self.gated else PLAIN_MLP)

    def block(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}"

    def param(self, layer: int, matrix: str, config) -> ParamSlice:
        """The parameter (and slice) holding ``matrix`` of ``layer``."""
        if matrix not in self.matrices:
            raise SpecError(
                f"unknown matrix {matrix!r} for family {self.name}",
                f"use one of {', '.join(self.matrices)}",
            )
        rel = self.param_names[matrix]
        name = f"{self.block(layer)}.{rel}.weight"
        if self.name == "gpt2" and matrix in ("q", "k", "v"):
            d = config.n_embd
            i = ("q", "k", "v").index(matrix)
            return ParamSlice(name, dim=1, start=i * d, stop=(i + 1) * d)
        return ParamSlice(name)

    def module(self, layer: int, site: str) -> str:
        """Module path whose output is ``site`` (``attn_out`` / ``mlp_out`` / ``resid_post``)."""
        paths = {
            "attn_out": f"{self.block(layer)}.{self.attn_module}",
            "mlp_out": f"{self.block(layer)}.{self.mlp_module}",
            "resid_post": self.block(layer),
        }
        if site not in paths:
            raise SpecError(f"site {site!r} has no module path", f"use one of {', '.join(paths)}")
        return paths[site]

    def expected_shape(self, matrix: str, config) -> tuple[int, int]:
        """Shape of the (sliced) weight as the config says it must be."""
        if self.name == "gpt2":
            d, m = config.n_embd, config.n_inner or 4 * config.n_embd
            # Conv1D stores (in, out)
            return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "in": (d, m), "out": (m, d)}[
                matrix
            ]
        d = config.hidden_size
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // n_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        m = config.intermediate_size
        return {
            "q": (n_heads * head_dim, d),
            "k": (n_kv * head_dim, d),
            "v": (n_kv * head_dim, d),
            "o": (d, n_heads * head_dim),
            "gate": (m, d),
            "up": (m, d),
            "down": (d, m),
        }[matrix]


_LLAMA_LIKE = dict(
    layers_path="model.layers",
    attn_module="self_attn",
    mlp_module="mlp",
    param_names={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
)

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo"), **_LLAMA_LIKE),
    "gpt2": Family(
        "gpt2",
        ("gpt2",),
        layers_path="transformer.h",
        attn_module="attn",
        mlp_module="mlp",
        param_names={
            "q": "attn.c_attn",
            "k": "attn.c_attn",
            "v": "attn.c_attn",
            "o": "attn.c_proj",
            "in": "mlp.c_fc",
            "out": "mlp.c_proj",
        },
        gated=False,
    ),
}


def family_for(config) -> Family:
    """The family of a Hugging Face config, or a :class:`SpecError` naming the model type."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise SpecError(
        f"architecture {model_type!r} has no component map",
        f"supported model types: {', '.join(known)}; add a Family in mechinterp/models/naming.py",
    )


def n_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def check_family(family: Family, config, param_shapes: dict[str, tuple[int, ...]]) -> None:
    """Check that every (layer, matrix) the family names exists with the shape the config implies."""
    for layer in range(n_layers(config)):
        for matrix in family.matrices:
            ref = family.param(layer, matrix, config)
            if ref.name not in param_shapes:
                raise SpecError(
                    f"{family.name} map names {ref.name} for layer {layer} {matrix}, "
                    "but the model has no such parameter",
                    "the checkpoint is not the architecture its config claims",
                )
            shape = list(param_shapes[ref.name])
            if ref.dim is not None:
                shape[ref.dim] = (ref.stop or shape[ref.dim]) - ref.start
            want = family.expected_shape(matrix, config)
            if tuple(shape) != tuple(want):
                raise SpecError(
                    f"{ref.name} has shape {tuple(shape)} but the config implies {want}",
                    "config.json and the weights disagree",
                )
