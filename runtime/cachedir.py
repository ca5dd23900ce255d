"""Where cnnc keeps what it can compute again: compiled networks and what LLVM said about this CPU.

What the cache holds is mapped as code or trusted as a description of the
CPU, so a file in it is used only when nobody but this user can have written
it: the directory is created 0700 and must be owned by this user and
writable by nobody else, and an entry must be a regular file (not a symlink:
opened with ``O_NOFOLLOW``) owned by this user and writable by nobody else.
Anything else reads as a miss, and is rebuilt (and overwritten atomically
where the directory is ours). Callers still check each entry's content hash.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cnnc_runtime import fileio


def cache_dir() -> Path:
    """``$CNNC_CACHE_DIR``, else ``$XDG_CACHE_HOME/cnnc``, else ``~/.cache/cnnc``."""
    if os.environ.get("CNNC_CACHE_DIR"):
        return Path(os.environ["CNNC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnc"


def _ours(st: os.stat_result) -> bool:
    """Owned by this user and writable by no one else."""
    return st.st_uid == _uid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def private_dir(*parts: str, create: bool = False) -> Path | None:
    """The cache directory (or a subdirectory of it) when it is safe to trust, else None.

    With `create`, missing directories are made 0700. A directory that is a
    symlink, another user's, or group- or world-writable is not used.
    """
    path = cache_dir()
    for part in ("", *parts):
        path = path / part if part else path
        if create:
            with contextlib.suppress(FileExistsError, OSError):
                path.mkdir(mode=0o700, parents=not part)
        try:
            st = _tightened(path, os.lstat(path))
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode) or not _ours(st):
            return None
    return path


def _tightened(path: Path, st: os.stat_result) -> os.stat_result:
    """The default cache directory, ours but writable by others (made under umask 002, say), made 0700; its
    entries are still checked one by one, and a file another user wrote there is never owned by this user.

    A directory named by ``CNNC_CACHE_DIR`` is left as it is (it may be a team's shared directory): if others
    may write it, it is simply not used.
    """
    if os.environ.get("CNNC_CACHE_DIR"):
        return st
    if stat.S_ISDIR(st.st_mode) and st.st_uid == _uid() and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(path, 0o700, follow_symlinks=False)
        return os.lstat(path)
    return st


def read_private(path: Path) -> bytes | None:
    """The bytes of a cache entry we can trust (see the module's docstring), else None."""
    if path.parent != private_dir(*path.parent.relative_to(cache_dir()).parts):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _ours(st):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Replace the cache entry `path` atomically, readable and writable by this user only.

    Nothing is written where the directory cannot be trusted; an unwritable
    cache only costs time.
    """
    if private_dir(*path.parent.relative_to(cache_dir()).parts, create=True) != path.parent:
        return
    with contextlib.suppress(OSError):
        fileio.atomic_write_bytes(path, data)
        os.chmod(path, 0o600, follow_symlinks=False)
