"""The fused weight-diff kernel against a float64 naive computation on sharded checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mechinterp.analysis import diffkernel
from mechinterp.analysis import weights as W
from mechinterp.errors import CorruptCheckpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64),
          "self_attn.v_proj.weight": (32, 64), "self_attn.o_proj.weight": (64, 64),
          "mlp.gate_proj.weight": (1200, 64), "mlp.up_proj.weight": (1200, 64),
          "mlp.down_proj.weight": (64, 1200)}
N_LAYERS = 3


def _write_pair(root, dtype: torch.dtype):
    """Two 2-shard Llama-shaped checkpoints; the variant mixes every kind of change per matrix."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 1200, "num_hidden_layers": N_LAYERS, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 64,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    g = torch.Generator().manual_seed(7)
    base, var = {}, {}
    for layer in range(N_LAYERS):
        for i, (key, shape) in enumerate(SHAPES.items()):
            name = f"model.layers.{layer}.{key}"
            b = torch.randn(shape, generator=g) * 0.02
            # log-uniform relative changes 1e-10..10 with random signs; a third untouched
            scale = 10 ** (torch.rand(shape, generator=g) * 11 - 10)
            v = b.double() * (1 + scale * torch.sign(torch.randn(shape, generator=g)))
            same = torch.rand(shape, generator=g) < 0.33
            v[same] = b.double()[same]
            b, v = b.to(dtype), v.to(dtype)
            if (layer, i) == (0, 0):  # hand-placed entries: zero bases, -0.0, ratio 2 (above)
                b[0, :3] = 0.0
                v[0, 0] = 0.0
                v[0, 1] = -0.0
                v[1, 1] = -b[1, 1]
            if (layer, i) == (1, 2):
                v = b.clone()  # an unchanged matrix
            base[name], var[name] = b.contiguous(), v.contiguous()
    names = sorted(base)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for which, sd in (("base", base), ("variant", var)):
        folder = root / which
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        weight_map = {}
        for fname, keys in shards.items():
            save_file({k: sd[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(keys, fname)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root / "base", root / "variant", base, var


def _naive(b: torch.Tensor, v: torch.Tensor) -> dict:
    """float64 numpy over whole tensors: no chunks, no tables, no kernel.

    The kernel subtracts in float32 (exact when entries are within 2x of each other, one rounding
    otherwise; here changes reach 10x), hence rel=1e-7 on the relative change below.
    """
    b64, v64 = b.double().numpy().ravel(), v.double().numpy().ravel()
    ratio = np.abs(v64 - b64) / np.maximum(np.abs(b64), 1e-10)
    ints = np.int32 if b.element_size() == 4 else np.int16
    bits_b = b.view(torch.int32 if ints is np.int32 else torch.int16).numpy().ravel()
    bits_v = v.view(torch.int32 if ints is np.int32 else torch.int16).numpy().ravel()
    hist, _ = np.histogram(ratio[(ratio >= 1e-8) & (ratio < 1)], bins=W.SPARSITY_EDGES)
    return {"rel": float(np.linalg.norm(v64 - b64) / np.linalg.norm(b64)),
            "changed": int((bits_b != bits_v).sum()) / b.numel(), "hist": hist,
            "below": int((ratio < 1e-8).sum()), "above": int((ratio >= 1).sum())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_diff_matches_float64_naive(dtype, threads, tmp_path, monkeypatch):
    assert diffkernel.available(dtype), diffkernel.kernel_status()  # cc is part of the image
    # small parts so that the threaded split and the kernel's 128 KiB read blocks are exercised
    monkeypatch.setattr(diffkernel, "MIN_PART", 1000)
    monkeypatch.setattr(diffkernel, "default_threads", lambda: threads)
    base_dir, var_dir, base, var = _write_pair(tmp_path, dtype)
    diff = W.weight_diff(base_dir, {"v": var_dir})
    config = W.load_config(base_dir)
    refs = W.matrix_refs(W.family_for(config), config)
    assert len(refs) == N_LAYERS * len(SHAPES)
    for layer, m, param in refs:
        name = param.name
        ref, got = _naive(base[name], var[name]), diff.stats["v"][m][layer]
        assert got.relative == pytest.approx(ref["rel"], rel=1e-7, abs=1e-15), (layer, m)
        assert got.changed_fraction == ref["changed"], (layer, m)
        np.testing.assert_array_equal(got.hist, ref["hist"])
        assert (got.n_below, got.n_above) == (ref["below"], ref["above"]), (layer, m)
    assert diff.stats["v"]["v"][1].n_changed == 0
    # the same counts through the torch-only path (what machines without a compiler run)
    monkeypatch.setattr(diffkernel, "available", lambda dtype: False)
    torch_path = W.weight_diff(base_dir, {"v": var_dir})
    for m in diff.matrices:
        for a, b in zip(diff.stats["v"][m], torch_path.stats["v"][m], strict=True):
            assert (a.n_changed, a.n_below, a.n_above) == (b.n_changed, b.n_below, b.n_above)
            np.testing.assert_array_equal(a.hist, b.hist)
            # the torch path sums squares in float32 blocks of 1024: ~1e-6 relative (measured
            # 1.0e-6 on bf16 here), the kernel in float64 (within 1e-7 of the naive one above)
            assert a.relative == pytest.approx(b.relative, rel=5e-6)


def test_kernel_chunks_on_edges_and_nonfinite():
    """Ratios on and one float32 step beside every edge, and inf/NaN entries, in one chunk."""
    edges32 = torch.from_numpy(W.SPARSITY_EDGES).float()
    b = torch.ones(3 * edges32.numel())
    v = torch.cat([1 + edges32, 1 + torch.nextafter(edges32, torch.tensor(0.0)),
                   1 + torch.nextafter(edges32, torch.tensor(2.0))])
    b = torch.cat([b, torch.tensor([float("inf"), 1.0, 0.0, 1e-12])])
    v = torch.cat([v, torch.tensor([1.0, float("nan"), 1e-19, 2e-12])])
    ref = W.chunk_stats_torch(b, v)
    got = W.chunk_stats(b, v)
    assert diffkernel.available(torch.float32)
    assert (got.n_changed, got.n_below, got.n_above) == (ref.n_changed, ref.n_below, ref.n_above)
    np.testing.assert_array_equal(got.hist, ref.hist)
    # float64 truth for the finite part: the ratio of the float32 values, binned by np.histogram
    d = (v - b)[: -4].double().abs().numpy()
    hist, _ = np.histogram(d[(d >= 1e-8) & (d < 1)], bins=W.SPARSITY_EDGES)
    tail = W.chunk_stats(b[-4:], v[-4:])
    np.testing.assert_array_equal(got.hist - tail.hist, hist)
    assert (tail.n_above, tail.n_below) == (2, 1)  # inf/inf and NaN above; 1e-19/1e-10 below


def test_truncated_file_is_a_corrupt_checkpoint(tmp_path):
    base_dir, var_dir, _, _ = _write_pair(tmp_path, torch.float32)
    with W.CheckpointReader(base_dir) as rb, W.CheckpointReader(var_dir) as rv:
        ref = W.matrix_refs(W.family_for(W.load_config(base_dir)), W.load_config(base_dir))[4][2]
        loc = rv._loc(ref.name)
        copy = tmp_path / "short.safetensors"
        shutil.copy(loc.path, copy)
        with open(copy, "r+b") as fh:  # cut inside the tensor, behind the header check's back
            fh.truncate(loc.offset + 100)
        rv._locs[ref.name] = W._TensorLoc(copy, loc.shape, loc.dtype, loc.offset)
        with pytest.raises(CorruptCheckpoint, match="ended early"):
            W._diff_refs(rb, {"v": rv}, [ref], True)
