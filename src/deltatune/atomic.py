"""Files and folders written whole or not at all: a temporary one beside the target, then renamed.

A crash (or a full disk) mid-write leaves the old file, or none, never half of a new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def file_mode() -> int:
    """The mode an ordinary new file gets under the process's umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def temporary_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` with an ordinary file's mode (``mkstemp`` makes it 0600, so
    renamed into place it would be unreadable to everyone but its owner)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(finished: Path, final: Path, aside: Path) -> None:
    """Put the completely written folder ``finished`` in place as ``final``.

    A folder already at ``final`` is renamed to ``aside`` first and deleted only after the swap, so
    a complete folder exists under one of the two names at every instant (a reader that finds
    ``aside`` after a kill can put it back). An ``aside`` left by a swap killed before its clean-up
    is an older copy and goes first; a swap that fails (or is interrupted) between the two renames
    puts the old folder back under ``final``."""
    if not final.exists():
        os.replace(finished, final)
        return
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(final, aside)
    try:
        os.replace(finished, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)
