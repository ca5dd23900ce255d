"""This machine's memory, and the check that refuses what cannot fit before anything is allocated.

A size read from a file header, a manifest or an argument can claim any
number of bytes; asking numpy for them ends in a ``MemoryError`` traceback or
the OOM killer. Callers compare first and get one clear ``ValueError``.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def physical_memory() -> int | None:
    """Bytes of RAM in this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(nbytes: int, what: str) -> None:
    """``ValueError`` before allocating `nbytes` for `what` if that is more than this machine's RAM."""
    ram = physical_memory()
    if ram is not None and nbytes > ram:
        raise ValueError(f"{what} needs {nbytes / 2**30:,.1f} GiB, more than this machine's "
                         f"{ram / 2**30:,.1f} GiB of memory")
