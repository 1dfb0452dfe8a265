"""A delta cache on local disk: the base and the task vectors as memory-mapped safetensors shards.

Why a file cache (and not Ray's object store or POSIX shared memory): a memory-mapped file is shared
by every process on the node through the kernel's page cache without any broker, it works the same
in-process, under Ray and under Slurm, it survives the run (the next run on the node starts without
re-reading the sources) and the kernel may drop clean pages under pressure and read them again,
where shared memory would be pinned anonymous memory. Workers read it in place, so a worker's private
memory is its candidate model alone.

Trust rules, so that no run uses a half-written or outdated cache:

- A cache folder is named by what it is for (the sources' names and resolved paths, the dtypes);
  its manifest records each source file's size and SHA-256. Opening a cache whose manifest does not
  match the sources on disk now is an error naming the folder (stale: sources changed).
- It is built in a temporary folder and renamed into place only after every shard and the manifest
  are written and fsynced, and a ``COMPLETE`` marker holding the manifest's hash is inside it. A
  writer killed midway leaves only a ``.tmp-*`` folder, which is never read and is removed by the
  next builder. Builders take an exclusive ``flock`` (released by the kernel when a process dies), so
  N workers starting together build once and the others wait and map the result.
- The free space is checked before writing; a full disk during the write removes the partial
  folder and raises an error naming ``delta_cache``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.checkpoint import TensorReader, tensor_index
from evomerge.merge.residency import MemorySettingError

VERSION = 1
SHARD_BYTES = 512 * 2**20  # a shard is assembled in memory before it is written: keep the builder small
BASE_PREFIX = "base::"


class StaleCacheError(MemorySettingError):
    """The cache on disk was built from sources whose contents have changed since."""


def task_vectors(readers: Mapping[str, TensorReader], base_name: str, others: Sequence[str], name: str,
                 dtype: torch.dtype, delta_dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tensor's base (in the model's dtype) and stacked task vectors ``x_i - base`` (in
    ``delta_dtype``; None for integer tensors), computed in float32 from the raw checkpoints. Every
    policy obtains its inputs from this function, so they agree bit for bit."""
    raw = readers[base_name].get(name, device)
    base = raw.to(dtype) if raw.is_floating_point() else raw
    if not raw.is_floating_point():
        return base, None
    stack = torch.empty((len(others), *raw.shape), dtype=delta_dtype, device=device)
    for i, n in enumerate(others):
        stack[i] = readers[n].get(name, device).float() - raw.float()
    return base, stack


# ---------------------------------------------------------------------------------------------
# Fingerprints: the sources' content hashes, memoized by file identity so a restart does not re-hash.


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(folder: Path, memo_file: Path | None = None, allow_pickle: bool = False) -> list[dict[str, Any]]:
    """[{file, size, sha256}] for every weight file of a checkpoint folder (configs do not enter:
    a delta depends on the weights alone). Hashes are memoized in ``memo_file`` under (real path,
    size, mtime, inode): a file changed in place gets a new mtime and is hashed again."""
    files = sorted({info.file for info in tensor_index(folder, allow_pickle).values()})
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    out, changed = [], False
    for f in files:
        st = f.stat()
        ident = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if ident not in memo:
            memo[ident] = _sha256(f)
            changed = True
        out.append({"file": f.name, "size": st.st_size, "sha256": memo[ident]})
    if memo_file is not None and changed:
        _write_atomic(memo_file, json.dumps(memo, indent=0))
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The cache


@dataclass
class DeltaCache:
    """An opened, trusted cache: ``inputs(name)`` gives one tensor's base and task-vector stack,
    memory-mapped (file-backed pages, shared with every process mapping the same shard)."""

    folder: Path
    manifest: dict[str, Any]
    built: bool  # True when this process built it (False: it was found complete on disk)

    def __post_init__(self) -> None:
        self._handles = {s: safe_open(str(self.folder / s), framework="pt", device="cpu")
                         for s in self.manifest["shards"]}

    def inputs(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        shard, has_delta = self.manifest["tensors"][name]
        handle = self._handles[shard]
        return handle.get_tensor(BASE_PREFIX + name), handle.get_tensor(name) if has_delta else None

    @property
    def nbytes(self) -> int:
        return sum((self.folder / s).stat().st_size for s in self.manifest["shards"])


def cache_folder(root: Path, names: Sequence[str], paths: Mapping[str, Path], dtype: torch.dtype,
                 delta_dtype: torch.dtype) -> Path:
    """Where the cache for these sources lives: named by the sources' names and real paths and the
    dtypes (what it is for); whether it is still valid is the manifest's content hashes' business."""
    ident = json.dumps([[n, str(Path(paths[n]).resolve())] for n in names] + [str(dtype), str(delta_dtype)])
    return root / f"deltas-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _sources_record(names: Sequence[str], paths: Mapping[str, Path], root: Path,
                    allow_pickle: bool) -> dict[str, Any]:
    memo = root / "hashes.json"
    return {n: {"path": str(Path(paths[n]).resolve()), "files": fingerprint(Path(paths[n]), memo, allow_pickle)}
            for n in names}


def _trusted(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache folder, or None (absent, half-written or tampered)."""
    marker, manifest = folder / "COMPLETE", folder / "manifest.json"
    if not (marker.is_file() and manifest.is_file()):
        return None
    text = manifest.read_text()
    if marker.read_text().strip() != hashlib.sha256(text.encode()).hexdigest():
        return None
    data = json.loads(text)
    if data.get("version") != VERSION or not all((folder / s).is_file() for s in data["shards"]):
        return None
    return data


def _stale_reason(manifest: dict[str, Any], sources: dict[str, Any]) -> str | None:
    for name, now in sources.items():
        then = manifest["sources"].get(name)
        if then is None:
            return f"model '{name}' is not in it"
        if then["files"] != now["files"]:
            old = {f["file"]: f for f in then["files"]}
            for f in now["files"]:
                o = old.get(f["file"])
                if o is None:
                    return f"model '{name}' has a new weight file {f['file']}"
                if o != f:
                    return (f"model '{name}' file {f['file']} changed (size {o['size']} -> {f['size']}, "
                            f"sha256 {o['sha256'][:12]} -> {f['sha256'][:12]})")
            return f"model '{name}' lost weight files"
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the kernel releases it when the holder dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_cache(root: Path, base_name: str, others: Sequence[str], paths: Mapping[str, Path],
               tensor_names: Sequence[str], dtype: torch.dtype, delta_dtype: torch.dtype, need_bytes: int,
               allow_pickle: bool = False, on_tensor: Callable[[str], None] | None = None) -> DeltaCache:
    """Open the cache for these sources, building it (once per node, under a lock) when absent.

    Raises StaleCacheError when a complete cache exists but the sources' contents changed, and
    MemorySettingError when the disk lacks ``need_bytes`` of free space. ``on_tensor`` is called after
    each tensor is computed while building (progress; the fault test kills the writer there).
    """
    names = [base_name, *others]
    folder = cache_folder(root, names, paths, dtype, delta_dtype)
    sources = _sources_record(names, paths, root, allow_pickle)

    def check(manifest: dict[str, Any]) -> DeltaCache:
        why = _stale_reason(manifest, sources)
        if why is not None:
            raise StaleCacheError(
                f"delta cache {folder} is stale: {why} since it was built. Delete that folder to rebuild "
                "it, or set delta_cache: to another folder (or memory: device / host, which need no cache)")
        return DeltaCache(folder, manifest, built=False)

    found = _trusted(folder)
    if found is not None:
        return check(found)
    with _locked(folder.with_name(folder.name + ".lock")):
        found = _trusted(folder)  # another worker may have built it while we waited
        if found is not None:
            return check(found)
        for leftover in root.glob(f".tmp-{folder.name}-*"):  # a killed writer's remains: never trusted
            shutil.rmtree(leftover, ignore_errors=True)
        if folder.exists():  # incomplete (no valid marker): not trusted, rebuilt
            shutil.rmtree(folder)
        free = shutil.disk_usage(root).free
        if free < need_bytes + 64 * 2**20:
            raise MemorySettingError(
                f"delta_cache {root}: the disk has {free / 2**30:.2f} GiB free but the cache needs "
                f"{need_bytes / 2**30:.2f} GiB; set delta_cache: to a folder on a disk with room, a "
                "lower delta_dtype (e.g. bfloat16), or memory: device / host")
        tmp = root / f".tmp-{folder.name}-{os.getpid()}-{time.time_ns()}"
        try:
            manifest = _build(tmp, base_name, others, paths, tensor_names, dtype, delta_dtype, sources,
                              allow_pickle, on_tensor)
            os.rename(tmp, folder)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                raise MemorySettingError(
                    f"delta_cache {root}: the disk filled up while writing the cache ({need_bytes / 2**30:.2f} "
                    "GiB needed); set delta_cache: to a folder on a disk with room, or memory: device / host"
                ) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return DeltaCache(folder, manifest, built=True)


def _build(tmp: Path, base_name: str, others: Sequence[str], paths: Mapping[str, Path],
           tensor_names: Sequence[str], dtype: torch.dtype, delta_dtype: torch.dtype,
           sources: dict[str, Any], allow_pickle: bool, on_tensor: Callable[[str], None] | None) -> dict[str, Any]:
    tmp.mkdir(parents=True)
    readers = {n: TensorReader(Path(paths[n]), allow_pickle) for n in [base_name, *others]}
    shards: list[str] = []
    where: dict[str, tuple[str, bool]] = {}
    buf: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if not buf:
            return
        shard = f"shard-{len(shards):05d}.safetensors"
        save_file(buf, str(tmp / shard))
        _fsync(tmp / shard)
        shards.append(shard)
        buf, size = {}, 0

    for name in tensor_names:
        base, stack = task_vectors(readers, base_name, others, name, dtype, delta_dtype)
        nbytes = base.numel() * base.element_size() + (stack.numel() * stack.element_size() if stack is not None else 0)
        if buf and size + nbytes > SHARD_BYTES:
            flush()
        buf[BASE_PREFIX + name] = base.contiguous().clone()  # a clone: never alias the source's mapping
        if stack is not None:
            buf[name] = stack
        where[name] = (f"shard-{len(shards):05d}.safetensors", stack is not None)
        size += nbytes
        if on_tensor is not None:
            on_tensor(name)
    flush()
    manifest = {"version": VERSION, "base": base_name, "others": list(others), "dtype": str(dtype),
                "delta_dtype": str(delta_dtype), "sources": sources, "shards": shards, "tensors": where}
    text = json.dumps(manifest, indent=1)
    (tmp / "manifest.json").write_text(text)
    _fsync(tmp / "manifest.json")
    (tmp / "COMPLETE").write_text(hashlib.sha256(text.encode()).hexdigest())
    _fsync(tmp / "COMPLETE")
    return manifest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
