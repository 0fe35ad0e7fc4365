"""Computed (not measured) GPU memory of the probes on big models: weights plus the largest
transient tensors of each probe at its default batch sizes.

    python benchmarks/memory_plan.py                        # OLMo-2-7B on 1 GPU, a 70B on 8
    python benchmarks/memory_plan.py --config path/config.json --gpus 2 --gpu-gib 80

Weights: parameter count from the config (embeddings, attention with grouped KV heads, gated MLP,
norms; untied head unless the config ties it) x bytes per parameter. A probe that compares holds
the base and one variant (``mechinterp`` releases each variant when done with it), spread over the
GPUs by ``--device-map auto``. Activations: the largest tensors alive at once in one forward pass
of the probe's default batch (eager attention, as the suite loads models: scores in the model's
dtype plus the float32 softmax; float32 unembedding of the scored positions and its log-softmax;
the KV cache of greedy generation). Allocator overhead, CUDA context (~0.5-1 GiB per GPU) and
fragmentation come on top: keep 10-15% free.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, path: str) -> Shape:
        c = json.loads(open(path).read())
        return cls(c.get("_name_or_path") or path, c["hidden_size"], c["num_hidden_layers"],
                   c["num_attention_heads"], c.get("num_key_value_heads") or
                   c["num_attention_heads"], c["intermediate_size"], c["vocab_size"],
                   bool(c.get("tie_word_embeddings")), c.get("model_type") == "olmo2")

    @property
    def head_dim(self) -> int:
        return self.d // self.heads

    def params(self) -> int:
        kv = self.kv_heads * self.head_dim
        attn = 2 * self.d * self.d + 2 * self.d * kv + (self.d + kv if self.qk_norm else 0)
        mlp = 3 * self.d * self.ffn
        norms = 2 * self.d
        emb = self.vocab * self.d * (1 if self.tied else 2)
        return self.layers * (attn + mlp + norms) + emb + self.d


#: OLMo-2-1124-7B(-Instruct), from its published config.json (hidden 4096, 32 layers, 32 heads
#: without grouping, MLP 11008, vocabulary 100352, untied head, q/k norms)
OLMO2_7B = Shape("allenai/OLMo-2-1124-7B-Instruct", 4096, 32, 32, 32, 11008, 100352,
                 qk_norm=True)
#: a 70B model of Llama-3-70B's shape (hidden 8192, 80 layers, 64 heads / 8 KV heads, MLP 28672,
#: vocabulary 128256, untied head): the paper has no 70B; this is the size the recipe plans for
LLAMA_70B = Shape("70B (Llama-3-70B shape)", 8192, 80, 64, 8, 28672, 128256)


def activations(s: Shape, dtype_bytes: int) -> dict[str, tuple[int, str]]:
    """Per probe: (peak transient bytes on the busiest GPU, what dominates) at default sizes."""
    def eager_attention(batch, q, k):  # scores in model dtype + float32 softmax (+ its cast)
        return batch * s.heads * q * k * (2 * dtype_bytes + 4)

    def head_fp32(rows):  # float32 logits + log-softmax of the scored positions
        return 2 * rows * s.vocab * 4

    def mlp(tokens):  # gate, up, act(gate)*up in model dtype
        return 3 * tokens * s.ffn * dtype_bytes

    kv_token = 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes
    out = {}
    b, t = 4, 1024  # kl-drift: batch_size 4, max_length 1024, every position an answer at most
    out["kl-drift"] = (max(eager_attention(b, t, t), mlp(b * t)) + head_fp32(b * t),
                       "float32 log-probs of 4x1024 answer positions; eager attention 4x1024^2")
    b, t = 4, 256  # attention-shift: every layer's pattern kept (model dtype) + one float32 softmax
    out["attention-shift"] = (s.layers * b * s.heads * t * t * dtype_bytes
                              + eager_attention(b, t, t),
                              "all layers' attention patterns of 4 prompts x 256 tokens")
    rows, t = 1024, 16  # causal-trace: up to 1024 restored rows per block call, ~16-token facts
    out["causal-trace"] = (eager_attention(rows, t, t) + mlp(rows * t) + head_fp32(rows) // 2
                           + 2 * rows * t * s.d * dtype_bytes,
                           "1024 rows x 16 tokens per block call; float32 logits of 1024 rows")
    tok = 4096  # mlp-patching: max_tokens rows x positions per patched forward
    out["mlp-patching"] = (mlp(tok) + eager_attention(tok // 64, 64, 64) + head_fp32(tok // 64),
                           "4096 tokens per patched forward")
    tok = 8192  # damage-attribution: token_budget 8192 per patched forward, items ~256 tokens
    out["damage-attribution"] = (mlp(tok) + eager_attention(tok // 256, 256, 256)
                                 + head_fp32(4 * tok // 256),
                                 "8192 tokens per patched forward (32 conditions x 256 tokens)")
    tok = 512  # mmlu: token_budget 512
    out["mmlu"] = (mlp(tok) + eager_attention(8, 64, 64) + head_fp32(tok), "512 tokens per forward")
    b, t = 16, 200 + 512  # task-accuracy (paper plan: GSM8K, 512 new tokens), batch 16
    out["task-accuracy"] = (b * t * kv_token + mlp(b * 200) + head_fp32(b),
                            f"KV cache 16 x 712 tokens ({kv_token / 2**20:.2f} MiB/token)")
    out["weight-change"] = (0, "streams safetensors row chunks on the CPU: no GPU memory")
    return out


def table(s: Shape, gpus: int, gpu_gib: float, dtype: str) -> str:
    nbytes = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    n = s.params()
    weights = n * nbytes
    lines = [f"### {s.name}: {n / 1e9:.2f}B parameters, {dtype}, {gpus} x {gpu_gib:g} GiB",
             "",
             f"weights of one model: {weights / GIB:.1f} GiB; base + one variant resident: "
             f"{2 * weights / GIB:.1f} GiB ({2 * weights / GIB / gpus:.1f} GiB per GPU spread "
             f"evenly over {gpus})",
             "",
             "| probe | weights resident (GiB) | largest activations (GiB, busiest GPU) | total per "
             "GPU (GiB) | fits | what dominates |",
             "|---|---|---|---|---|---|"]
    for probe, (act, what) in activations(s, nbytes).items():
        resident = 0 if probe == "weight-change" else 2 * weights
        per_gpu = resident / gpus + act
        fits = "yes" if per_gpu <= 0.9 * gpu_gib * GIB else "NO"
        lines.append(f"| {probe} | {resident / GIB:.1f} | {act / GIB:.2f} | {per_gpu / GIB:.1f} | "
                     f"{fits} | {what} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a model's config.json (default: OLMo-2-7B and a 70B)")
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    if args.config:
        print(table(Shape.from_config(args.config), args.gpus or 1, args.gpu_gib, args.dtype))
        return
    print(table(OLMO2_7B, args.gpus or 1, args.gpu_gib, args.dtype))
    print()
    print(table(LLAMA_70B, args.gpus or 8, args.gpu_gib, args.dtype))


if __name__ == "__main__":
    main()
