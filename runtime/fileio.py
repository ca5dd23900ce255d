"""Crash-safe file writes for checkpoints and artifacts.

A file is written to a temporary sibling, flushed and fsynced, then renamed
onto the target with os.replace (atomic on POSIX and Windows within one file
system), and finally the directory is fsynced so the rename itself survives a
power loss. A process killed at any point leaves the old file or the new one,
never a torn mix; the temporary file is removed when writing fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from typing import IO

import numpy as np


def _fsync_dir(directory: str) -> None:
    # Directories cannot be opened for fsync on Windows; the rename is still atomic there.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(target: str, directory: str) -> tuple[int, str]:
    """A new file next to `target`, with the permissions a plain open() would give (mkstemp's are 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            with contextlib.suppress(OSError):
                os.chmod(tmp, mode)
        return fd, tmp
    raise FileExistsError(f"cannot create a temporary file next to {target}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a binary temporary file that replaces `path` when the block exits without error.

    On an exception the temporary file is deleted and `path` is untouched.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = _create_temp(target, directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(f)` on a temporary file, then atomically move it onto `path`."""
    with atomic_open(path) as f:
        write(f)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old bytes or the new, never a mix."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez `arrays` to exactly `path` (no ".npz" appended), atomically.

    Writing through a file object keeps numpy from renaming the target.
    """
    with atomic_open(path) as f:
        np.savez(f, **arrays)
