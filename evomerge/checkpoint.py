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


WEIGHTS_LOG_ENV = "EVOMERGE_WEIGHTS_LOG"
_weights_noted = False


def note_weights_loading(what: str) -> None:
    """Mark the moment this process starts reading weights: a line "<pid> <what>" appended to the file
    that $EVOMERGE_WEIGHTS_LOG names, once per process (nothing when it is unset). Why: whether an
    input was refused before or after the models loaded is the difference between an error in a
    second and one after minutes; tests and ``scripts/fault_cases.py`` read this file to tell them apart."""
    global _weights_noted
    if _weights_noted:  # called for every tensor read: the first call decides
        return
    target = os.environ.get(WEIGHTS_LOG_ENV)
    if not target:
        return
    _weights_noted = True
    with open(target, "a") as f:
        f.write(f"{os.getpid()} {what}\n")


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
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{path}: cannot read the model folder (permission denied)")
    if not cfg.exists():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model folder?")
    data = read_json(cfg, "config.json")
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: config.json must hold a JSON object, got {type(data).__name__}")
    return data


def read_json(file: Path, what: str) -> Any:
    """A JSON file, or a one-line error naming it (unreadable, not UTF-8, not JSON: where)."""
    try:
        return json.loads(file.read_text())
    except PermissionError:
        raise CheckpointError(f"{file}: cannot read {what} (permission denied)") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: {what} is not UTF-8 text; is the file damaged?") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: {what} is not valid JSON (line {err.lineno}, column {err.colno}: "
                              f"{err.msg})") from None


def check_safetensors(file: Path) -> None:
    """A .safetensors file whose header is complete and whose size matches the header's data offsets,
    checked from the header alone (8 bytes of length, then JSON), so that a truncated download is
    named before any weight is read instead of failing inside safetensors without a file name."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size or n > 100_000_000:
                raise CheckpointError(f"{file}: truncated or damaged safetensors file ({size:,} bytes; its header "
                                      f"is incomplete); copy or download it again")
            header = json.loads(f.read(n))
    except PermissionError:
        raise CheckpointError(f"{file}: cannot read it (permission denied)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: damaged safetensors file (its header is not JSON); copy or download it "
                              f"again") from None
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise CheckpointError(f"{file}: truncated or damaged safetensors file ({size:,} bytes, its header describes "
                              f"{expected:,}); copy or download it again")


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
        index = read_json(index_file, "the shard index")
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_file}: the shard index has no weight_map")
        files = sorted({path / f for f in index["weight_map"].values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_file} names shard(s) the folder lacks: {', '.join(missing)}")
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
        check_safetensors(f)
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                out[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
    return out


def _pickle_index(bins: list[Path]) -> dict[str, TensorInfo]:
    out = {}
    note_weights_loading(f"pickled index {bins[0].parent}")
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
        note_weights_loading(f"tensor {name} of {info.file}")
        if info.file.suffix == ".bin":
            if info.file not in self._state_dicts:
                self._state_dicts[info.file] = torch.load(info.file, map_location="cpu", weights_only=True, mmap=True)
            return self._state_dicts[info.file][name].to(device)
        if info.file not in self._handles:
            self._handles[info.file] = safe_open(info.file, framework="pt", device="cpu")
        return self._handles[info.file].get_tensor(name).to(device)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype as ``TensorInfo`` records it (safetensors' 'F32' or torch's 'torch.float32')."""
    if dtype in SAFETENSORS_DTYPES:
        return SAFETENSORS_DTYPES[dtype].itemsize
    found = getattr(torch, dtype.removeprefix("torch."), None)
    return found.itemsize if isinstance(found, torch.dtype) else 4


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
