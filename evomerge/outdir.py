"""Output folders written whole or not at all, and write failures said in one line.

Why: ``evomerge merge`` into a folder that held an older sharded checkpoint wrote beside it and kept
the stale index and shard (evomerge's own reader then took tensors from the stale shard), and a full
disk at export left a 0-byte recipe behind. Now every checkpoint (``merge``, ``export``, a run's
exports) is written into a temporary sibling folder and renamed into place when complete; a folder
that already holds something is replaced only when asked (``--overwrite``), and a failed write removes
what it began. A full disk, a read-only file system or a missing permission ends in one line naming
the path (and the bytes needed, where the size is known) instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EFBIG: "file too large for this file system"}


class OutputError(ValueError):
    """An output that cannot be written as asked; the message names the path and what to change."""


def shown(path: Path | str) -> Path:
    """The path a user asked for: a file inside (or the name of) a temporary ``.OUT.xxxx.partial`` folder
    is shown inside OUT, the name the user gave, not the temporary one."""
    path = Path(path)
    parts = list(path.parts)
    for i, part in enumerate(parts):
        if part.startswith(".") and part.endswith(".partial") and part.count(".") >= 3:
            parts[i] = part[1:].rsplit(".", 2)[0]
    return Path(*parts) if parts else path


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the file system of ``path`` (its nearest existing ancestor); None if unknown."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def check_space(path: Path, need: Optional[int]) -> None:
    """Refuse before writing when the file system of ``path`` has less than ``need`` bytes free."""
    free = free_bytes(path)
    if need and free is not None and free < need:
        raise OutputError(f"{shown(path)}: not enough disk space: the output needs about {need:,} bytes and "
                          f"{free:,} are free; free some space or choose another folder")


@contextmanager
def io_errors(path: Path, need: Optional[int] = None) -> Iterator[None]:
    """Turn a write that fails for a reason the user can fix (full disk, read-only, permission) into
    an OutputError of one line naming the file."""
    try:
        yield
    except OSError as err:
        if err.errno not in REASONS:
            raise
        where = err.filename or path
        extra = ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = free_bytes(Path(where))
            extra = "; " + (f"the output needs about {need:,} bytes, " if need else "") + \
                (f"{free:,} bytes are free there" if free is not None else "")
        raise OutputError(f"cannot write {shown(where)}: {REASONS[err.errno]}{extra}") from None


def check_target(out: Path, overwrite: bool) -> None:
    """A folder that may receive a new checkpoint: absent, empty, or (``overwrite``) to be replaced."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file, not a folder; choose another output folder")
    if not out.is_dir():
        return
    try:
        entries = sorted(p.name for p in out.iterdir())
    except PermissionError:
        raise OutputError(f"{out}: cannot read the output folder (permission denied)") from None
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputError(f"{out} is not empty ({len(entries)} entries: {shown}); choose a new folder, or pass "
                          f"--overwrite to replace its contents")
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == Path(target.anchor) or target == Path.home().resolve() or here == target or target in here.parents:
        raise OutputError(f"--overwrite would delete {out}, which holds the working directory or is a home or "
                          f"root folder; choose a folder of its own")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False, need: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` to write into; when the block ends without error it
    takes ``out``'s place in one rename (an old ``out``, allowed by ``overwrite``, is removed), and
    on any error it is deleted, so ``out`` holds the old contents or the complete new ones."""
    out = Path(out)
    check_target(out, overwrite)
    parent = out.absolute().parent
    with io_errors(parent):
        parent.mkdir(parents=True, exist_ok=True)
    check_space(parent, need)
    with io_errors(parent):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    try:
        with io_errors(out, need):
            yield tmp
            replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Put folder ``tmp`` at ``out``: a rename, with an existing ``out`` moved aside first and removed after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.absolute().parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / out.name, out)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_file(path: Path, text: str) -> None:
    """A small file beside an output (a recipe), written atomically: the old file or the new, never a
    torn or empty one; failures in one line."""
    from evomerge.runstore import write_atomic

    with io_errors(path):
        write_atomic(path, text.encode())
