"""Reading and writing Hugging Face checkpoints tensor by tensor.

Only safetensors are read by default: a pickled ``pytorch_model.bin`` runs code when unpickled, so
reading one needs ``allow_pickle=True`` (``--allow-pickle`` on the command line). Headers are read
without loading weights, so a config can be validated against every source before any heavy work.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what to change."""


def resolve_model_path(ref: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id fetched (safetensors, config, tokenizer only)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if str(ref).startswith((".", "/", "~")) or os.sep in str(ref) and str(ref).count("/") > 1:
        raise CheckpointError(f"model folder '{ref}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            str(ref), allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as err:  # offline, unknown repo, gated...
        raise CheckpointError(
            f"'{ref}' is not a local folder and could not be fetched from the hub ({type(err).__name__}: "
            f"{err}). Give a local path, or check the id and your network / HF_HUB_OFFLINE.") from err


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model folder?")
    return json.loads(cfg.read_text())


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def tensor_index(path: Path, allow_pickle: bool = False) -> dict[str, TensorInfo]:
    """Name -> (file, shape, dtype) for every weight, from the safetensors headers alone."""
    files = sorted(path.glob("*.safetensors"))
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        names = json.loads(index_file.read_text())["weight_map"]
        files = sorted({path / f for f in names.values()})
    if not files:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if bins and not allow_pickle:
            raise CheckpointError(
                f"{path} has only pickled weights ({bins[0].name}); unpickling runs arbitrary code. "
                "Convert it to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it.")
        if bins:
            return _pickle_index(bins)
        raise CheckpointError(f"{path} has no *.safetensors weights")
    out: dict[str, TensorInfo] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                out[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
    return out


def _pickle_index(bins: list[Path]) -> dict[str, TensorInfo]:
    out = {}
    for f in bins:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        for name, t in sd.items():
            out[name] = TensorInfo(f, tuple(t.shape), str(t.dtype))
    return out


class TensorReader:
    """Reads single tensors on demand, keeping files open; one reader per checkpoint."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.index = tensor_index(path, allow_pickle)
        self._state_dicts: dict[Path, dict[str, torch.Tensor]] = {}  # .bin files, loaded memory-mapped
        self._handles: dict[Path, Any] = {}  # safetensors handles (safe_open has no usable stub)

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        info = self.index[name]
        if info.file.suffix == ".bin":
            if info.file not in self._state_dicts:
                self._state_dicts[info.file] = torch.load(info.file, map_location="cpu", weights_only=True, mmap=True)
            return self._state_dicts[info.file][name].to(device)
        if info.file not in self._handles:
            self._handles[info.file] = safe_open(info.file, framework="pt", device="cpu")
        return self._handles[info.file].get_tensor(name).to(device)


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / bytes -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
    for unit, mult in units:
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], out: Path,
                  max_shard_size: str | int = "5GB") -> list[Path]:
    """Stream tensors into ``model-0000i-of-0000n.safetensors`` shards (+ index when n > 1).

    Holds at most one shard in memory, so a merge written this way needs memory of the order of the
    shard size, not the model size.
    """
    limit = parse_size(max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[tuple[Path, list[str]]] = []
    buf: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            tmp = out / f".shard-{len(shards):05d}.safetensors"
            save_file(buf, tmp, metadata={"format": "pt"})
            shards.append((tmp, list(buf)))
        buf, size = {}, 0

    total = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if buf and size + nbytes > limit:
            flush()
        buf[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    paths, weight_map = [], {}
    for i, (tmp, names) in enumerate(shards):
        final = out / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        tmp.rename(final)
        paths.append(final)
        weight_map.update({name: final.name for name in names})
    if n > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in ``src``."""
    copied = []
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
