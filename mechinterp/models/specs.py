"""Model specs: the one place where a spec string becomes a local checkpoint folder.

Grammar (first match wins):

* ``NAME`` - a zoo model (``mechinterp models list``), e.g. ``smollm2-135m-instruct``;
* ``PATH.gguf`` - a GGUF file, dequantised once into the cache;
* ``DIR`` - a folder with ``config.json`` and ``*.safetensors``;
* ``DIR@REV`` - a checkpoint of a training run: ``DIR/checkpoints/REV`` or ``DIR/REV``
  (``out@step-40``);
* ``DIR@all`` - every checkpoint of a training output folder, in step order (see
  :func:`expand_checkpoints`; only where a list of checkpoints is accepted, e.g. ``--variant``);
* ``ORG/NAME[@REVISION]`` - a Hugging Face hub repository, at a branch, tag or commit.

Whatever the spec, the result is a :class:`ResolvedSpec` pointing at a folder of safetensors, so
everything downstream (loading, streaming diffs, hashing) has exactly one code path.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError
from ..paths import cache_dir, checkpoint_step
from . import zoo
from .lineage import find_train_config
from .origin import ORIGIN_FILE, read_origin
from .safetensors_io import file_sha256, folder_hash, model_files, weight_files, weights_identity

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSpec:
    spec: str  # as the user wrote it
    path: Path  # local folder: config.json, *.safetensors, tokenizer files
    source: str  # "zoo" | "gguf" | "local" | "hub"
    revision: str | None = None

    def weight_files(self) -> list[Path]:
        return weight_files(self.path)

    def weight_hash(self) -> str:
        """SHA-256 of every weight byte (reads the whole checkpoint once; cached)."""
        return folder_hash(self.path)

    def weight_id(self) -> str:
        """What identifies these weights without reading them (:func:`weights_identity`)."""
        return weights_identity(self.path)

    def provenance(self) -> dict:
        return {"spec": self.spec, "source": self.source, "revision": self.revision,
                "path": str(self.path), "weights_id": self.weight_id(),
                "files": model_files(self.path),
                "quantisation_origin": quantisation_origin(self.path)}


def split_revision(spec: str) -> tuple[str, str | None]:
    """``"a/b@rev"`` -> ``("a/b", "rev")``; a spec without ``@`` has no revision."""
    if "@" in spec:
        head, rev = spec.rsplit("@", 1)
        if head and rev:
            return head, rev
        raise SpecError(f"malformed spec {spec!r}: empty name or revision around '@'",
                        "write NAME@REVISION, e.g. org/model@main or out@step-40")
    return spec, None


def _check_folder(folder: Path, spec: str) -> Path:
    if not (folder / "config.json").exists():
        raise SpecError(f"{folder} (from spec {spec!r}) has no config.json",
                        "point at a folder written by save_pretrained")
    if not weight_files(folder):
        raise SpecError(f"{folder} (from spec {spec!r}) has no .safetensors weights",
                        "re-save it with save_pretrained(safe_serialization=True)")
    return folder


def _gguf_folder(gguf: Path) -> Path:
    """Dequantise a GGUF into the cache (keyed by its checksum) and return that folder."""
    digest = file_sha256(gguf)
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:12]}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=folder.parent))
    try:
        zoo.gguf_to_folder(gguf, tmp)
        if folder.exists() and not (folder / "config.json").exists():  # a half-written old one
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)  # atomic: the folder is whole or absent
        except OSError:
            if not (folder / "config.json").exists():
                raise
            # another process converted the same file first: its folder is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _hub_folder(repo: str, revision: str | None, spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download  # deferred: huggingface_hub, hub specs only
    except ImportError:  # pragma: no cover - transformers depends on it
        raise SpecError("huggingface_hub is not installed", "pip install huggingface_hub") from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as online_exc:  # noqa: BLE001 - offline, gated, missing revision...
        try:
            return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                          local_files_only=True))
        except Exception:  # noqa: BLE001
            reason = str(online_exc).strip().splitlines()[0] if str(online_exc).strip() else ""
            raise SpecError(
                f"cannot get {spec!r} from the Hugging Face hub ({type(online_exc).__name__}"
                f"{': ' + reason[:160] if reason else ''})",
                "check the repository id and revision and that the hub is reachable, "
                "or pass a local folder, a .gguf file or a zoo name (mechinterp models list)",
            ) from None


ALL_CHECKPOINTS = "all"
def expand_checkpoints(spec: str) -> list[str]:
    """``OUT@all`` -> ``["OUT@step-40", "OUT@step-80", ...]``; any other spec -> ``[spec]``.

    The checkpoints of a training output folder are its subfolders named ``step-N`` or
    ``checkpoint-N`` (the Hugging Face Trainer's name) that hold a ``config.json``, looked for in
    ``OUT/checkpoints/`` first and then in ``OUT/`` itself, ordered by N. The final model in ``OUT``
    itself (if any) is not included: add it as its own spec (``OUT@all,OUT``).
    """
    head, rev = split_revision(str(spec).strip()) if "@" in str(spec) else (str(spec), None)
    if rev != ALL_CHECKPOINTS:
        return [spec]
    root = Path(head).expanduser()
    if not root.is_dir():
        raise SpecError(f"{head!r} (from {spec!r}) is not a folder",
                        "@all lists the checkpoints of a local training output folder")
    for parent in (root / "checkpoints", root):
        found = []
        for sub in parent.glob("*") if parent.is_dir() else []:
            step = checkpoint_step(sub.name, folder=True)
            if step is not None and sub.is_dir() and (sub / "config.json").exists():
                found.append((step, sub.name))
        if found:
            return [f"{head}@{name}" for _, name in sorted(found)]
    raise SpecError(f"{root} has no checkpoints (no step-N/ or checkpoint-N/ folders with a "
                    "config.json in it or in its checkpoints/ folder)",
                    "point @all at a training output folder, or list checkpoints as DIR@step-N")


def resolve(spec: str) -> ResolvedSpec:
    """Turn any spec string into a local folder of safetensors (downloading/converting once).

    Args:
        spec: a zoo name, ``PATH.gguf``, a checkpoint folder, ``DIR@REV`` (a training run's
            checkpoint) or ``ORG/NAME[@REVISION]`` (see the module docstring for the grammar).

    Returns:
        The spec, its local folder, where it came from (``zoo``, ``gguf``, ``local``, ``hub``)
        and its revision.

    Raises:
        SpecError: the spec matches no form, or its folder lacks ``config.json`` or weights.
    """
    spec = str(spec).strip()
    if not spec:
        raise SpecError("empty model spec", "pass a zoo name, a folder, a .gguf file or a hub id")
    if spec in zoo.ZOO:
        return ResolvedSpec(spec, _check_folder(zoo.fetch(spec), spec), "zoo")
    as_path = Path(spec).expanduser()
    if as_path.suffix == ".gguf":
        if not as_path.is_file():
            raise SpecError(f"GGUF file {as_path} does not exist", "check the path")
        return ResolvedSpec(spec, _gguf_folder(as_path), "gguf")
    if as_path.is_dir():
        return ResolvedSpec(spec, _check_folder(as_path, spec), "local")
    head, rev = split_revision(spec)
    head_path = Path(head).expanduser()
    if head_path.is_dir() and rev is not None:
        for cand in (head_path / "checkpoints" / rev, head_path / rev):
            if cand.is_dir():
                return ResolvedSpec(spec, _check_folder(cand, spec), "local", rev)
        found = sorted(p.name for p in (head_path / "checkpoints").glob("*") if p.is_dir())
        raise SpecError(f"{head_path} has no checkpoint {rev!r}",
                        f"available: {', '.join(found)}" if found else "no checkpoints/ folder there")
    if head in zoo.ZOO:
        raise SpecError(f"zoo model {head!r} has no revisions", f"use plain {head!r}")
    if _HUB_ID.match(head) and not head.startswith((".", "/", "~")):
        return ResolvedSpec(spec, _check_folder(_hub_folder(head, rev, spec), spec), "hub", rev)
    raise SpecError(
        f"cannot resolve model spec {spec!r}: not a zoo name, an existing folder, a .gguf file, "
        "or a hub id ORG/NAME",
        f"zoo names: {', '.join(zoo.ZOO)}",
    )



def quantisation_origin(folder: Path, _depth: int = 0) -> dict | None:
    """The folder's origin record (:mod:`~mechinterp.models.origin`), else its training base's
    (``OUT`` and ``OUT/checkpoints/step-N`` find ``OUT/train-config.json``, whose base spec is
    resolved), else None (plain weights as far as we know)."""
    folder = Path(folder)
    if (folder / ORIGIN_FILE).is_file():
        return read_origin(folder)
    if _depth > 4:  # a run trained from a run trained from ...: stop somewhere
        return None
    cfg = find_train_config(folder)
    if cfg is None:
        return None
    try:
        base = json.loads(cfg.read_text()).get("base")
        found = quantisation_origin(resolve(base).path, _depth + 1) if base else None
    except Exception:  # noqa: BLE001 - a base that no longer resolves: origin unknown
        return None
    return None if found is None else {**found, "inherited_from": str(base)}
