"""Crash-safe file writes for checkpoints and artifacts.

A file is written to a temporary sibling, flushed and fsynced, then renamed
onto the target with os.replace (atomic on POSIX and Windows within one file
system), and finally the directory is fsynced so the rename itself survives a
power loss. A process killed at any point leaves the old file or the new one,
never a torn mix; the temporary file is removed when writing fails.

A writer killed outright (``kill -9``) cannot remove its temporary file, so
each temporary name carries its writer's host and process id, and the next
write of the same target removes those whose writer is gone: same host and
no such process, or older than a day (a reused pid, another host). A file a
live writer is still writing is never touched.

A path that cannot be written (no such directory, a directory, no
permission, a full disk) raises ``WriteError``, an ``OSError`` that names
the target and keeps the errno; the old file is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import IO

import numpy as np

TEMP_NAME = re.compile(r"(?:(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})\.)?[0-9a-f]{12}")  # (no host: older cnnc's)
STALE_SECONDS = 24 * 3600  # a temporary file this old is no live writer's, whatever its pid says
EDQUOT = getattr(errno, "EDQUOT", errno.ENOSPC)  # (not on Windows)
WRITE_ERRNOS = {errno.ENOSPC, EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}  # a write's own failures


class WriteError(OSError):
    """A file that could not be written: ``filename`` names it, ``strerror`` says why, the errno is kept."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def _write_error(target: str, e: OSError) -> WriteError:
    """`e` as a WriteError naming `target` (what failed may have been its temporary sibling)."""
    if isinstance(e, WriteError):
        return e
    directory = os.path.dirname(os.path.abspath(target))
    missing = not os.path.isdir(directory)
    why = {
        errno.ENOENT: f"the directory {directory} does not exist" if missing else "its temporary file vanished",
        errno.ENOTDIR: f"{directory} is not a directory",
        errno.EISDIR: "it is a directory",
        errno.EACCES: f"permission denied (in {directory})",
        errno.EPERM: f"permission denied (in {directory})",
        errno.ENOSPC: "no space left on the device",
        EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
    }.get(e.errno, e.strerror or str(e))
    return WriteError(e.errno, why, target)


@lru_cache(maxsize=1)
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_name(target: str) -> str:
    return f".{os.path.basename(target)}.{_host_tag()}-{os.getpid()}.{secrets.token_hex(6)}.tmp"


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # (os.kill would end the process there: such files go by age alone)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # (someone else's process: alive)
    return True


def _abandoned(host: str | None, pid: str | None, path: str) -> bool:
    """Whether the temporary file at `path`, written by `pid` on `host` (None: an older cnnc's), is abandoned."""
    if host == _host_tag() and not _alive(int(pid)):
        return True
    try:
        return time.time() - os.lstat(path).st_mtime > STALE_SECONDS
    except OSError:
        return False


def remove_stale_temps(target: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary files that killed writers of `target` left behind; the paths removed."""
    target = os.fspath(target)
    directory = os.path.dirname(os.path.abspath(target))
    prefix = f".{os.path.basename(target)}."
    removed = []
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for entry in entries:
        name = TEMP_NAME.fullmatch(entry.name[len(prefix):-len(".tmp")])
        if name is None or not entry.is_file(follow_symlinks=False):
            continue  # (another target's, whose name extends this one's)
        if _abandoned(name["host"], name["pid"], entry.path):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


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
        tmp = os.path.join(directory, _temp_name(target))
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

    On an exception the temporary file is deleted and `path` is untouched; a
    path that cannot be written raises ``WriteError`` (an ``OSError``).
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise _write_error(target, IsADirectoryError(errno.EISDIR, "is a directory"))
    try:
        fd, tmp = _create_temp(target, directory)
    except OSError as e:
        raise _write_error(target, e) from None
    in_block = False
    try:
        with os.fdopen(fd, "wb") as f:
            in_block = True
            yield f
            in_block = False
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # the block's own OSErrors (reading its data, say) pass as they are; a failed write names the target
        if isinstance(e, OSError) and (not in_block or e.errno in WRITE_ERRNOS):
            raise _write_error(target, e) from None
        raise
    try:
        _fsync_dir(directory)
    except OSError as e:
        raise _write_error(target, e) from None
    remove_stale_temps(target)


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
