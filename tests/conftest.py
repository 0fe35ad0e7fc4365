"""Shared fixtures. Tiny random models for unit tests; the real default model for behaviour.

The suite needs the data root (``MECHINTERP_DATA``, e.g. ``../shared/data``); tests that read data
fail with a clear message when it is missing rather than skipping into green.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MECHINTERP_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = ("tiny-random-llama", "tiny-random-qwen2", "tiny-random-gpt2")


@pytest.fixture(scope="session")
def data_source():
    from mechinterp.data import DataSource

    root = os.environ.get("MECHINTERP_DATA")
    if not root or not Path(root).is_dir():
        pytest.fail("MECHINTERP_DATA must point at the data root (e.g. ../shared/data)")
    return DataSource.from_option(root)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct, float32 on CPU (shared by the session; do not edit in place)."""
    from mechinterp.models import DEFAULT_MODEL, load

    return load(DEFAULT_MODEL, device="cpu", dtype="float32")


@pytest.fixture(scope="session", params=TINY)
def tiny_model(request):
    from mechinterp.models import load

    return load(request.param, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def planted_variants(tmp_path_factory):
    """``{"sft": folder, "grpo": folder}``: tiny Llamas with planted changes of known size in the
    q, k and gate matrices of every layer (relative change 0.2 for sft, 0.01 for grpo; gate 1.5x),
    for the tests that compare them with the base."""
    from mechinterp.models import load
    from mechinterp.models.edit import plant_change

    root = tmp_path_factory.mktemp("planted")
    out = {}
    for name, rel in (("sft", 0.2), ("grpo", 0.01)):
        model = load("tiny-random-llama", device="cpu", dtype="float32")
        edits = {(layer, m): rel * (1.5 if m == "gate" else 1.0)
                 for layer in range(model.n_layers) for m in ("q", "k", "gate")}
        out[name] = str(plant_change(model, root / name, edits, seed=1))
    return out


@pytest.fixture
def fresh_tiny_llama():
    """A tiny Llama you may edit in place."""
    from mechinterp.models import load

    return load("tiny-random-llama", device="cpu", dtype="float32")


if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each instead of oversubscribing
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny models are 10-100x slower with 2 OpenMP threads
    on a busy 2-core machine (threads spin waiting for each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
