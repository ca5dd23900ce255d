"""The on-disk compile cache: a pure store (``cnnc.pipeline`` compiles through it).

Two kinds of entries, both artifact files in ``cache_dir()``:

- ``<IR key>.cnnc``: keyed by the optimised graph, the target CPU and its
  features, and the cnnc, llvmlite and compiler-source versions
  (``cnnc.pipeline.Build.compiled``); two files that differ only in comments
  share it.
- ``src-<source key>.cnnc``: keyed by the exact source text and name, the
  target and the same versions. A repeated compile of the same file reads it
  without parsing anything (lark and networkx are not even imported), so it
  takes milliseconds; the warnings of the first compile are replayed.

Entries are mapped as code, so only those this user wrote, in a directory
nobody else can write, are used (``cnnc_runtime.cachedir``), and only after
their checksums match; anything else is ignored and rebuilt.

This module imports no part of the compiler, so a cached compile loads none of it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from cnnc.forkgate import on_internal_fork
from cnnc_runtime import __version__, artifact
from cnnc_runtime.cachedir import cache_dir, read_private, write_private

__all__ = ["cache_dir", "collector_paused", "compiler_fingerprint", "read", "source_key", "write"]


@lru_cache(maxsize=1)
def compiler_fingerprint() -> str:
    """A hash of the compiler's own source and grammar, so a changed compiler never reuses stale entries."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    files = [*root.glob("*.py"), *root.glob("*/*.py"), *root.parent.glob("grammar/*.lark"), *root.glob("grammar/*")]
    for path in sorted(p for p in files if p.is_file()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def read(path: Path, key: str) -> tuple[dict[str, Any], bytes] | None:
    """(manifest, object code) of an entry, or None when it is missing, corrupt, for another key or untrusted.

    The object code is mapped as code: only an entry this user wrote, in a
    directory only this user can write (``cachedir.read_private``), whose
    checksums match, is used.
    """
    data = read_private(path)
    if data is None:
        return None
    try:
        manifest, obj, _ = artifact.unpack(data, str(path))
    except ValueError:
        return None
    return (manifest, obj) if isinstance(manifest, dict) and manifest.get("cache_key") == key else None


def write(path: Path, manifest: dict[str, Any], obj: bytes) -> None:
    write_private(path, artifact.pack(manifest, obj))


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (a compile), back to its old state after.

    Importing the compiler's libraries and building the LLVM IR create
    objects by the hundred thousand, few of them garbage, and the collector
    kept walking them all: about 80 ms of LeNet-5's cold compile. What cycles a
    compile leaves are collected after it. The switch is the process's: two
    threads compiling at once may see it back on before both are done.
    """
    enabled = gc.isenabled()
    me = threading.get_ident()
    _pausing.setdefault(me, enabled)
    try:
        gc.disable()
        yield
    finally:
        if _pausing.get(me) is enabled:
            del _pausing[me]
        if enabled:
            gc.enable()


_pausing: dict[int, bool] = {}  # thread -> whether the collector was on when its (outermost) compile paused it


def _collector_back_after_fork() -> None:
    """In a child forked while another thread's compile had paused the collector: that compile never ends here."""
    if any(on for thread, on in _pausing.items() if thread != threading.get_ident()):
        gc.enable()
    _pausing.clear()


on_internal_fork(_collector_back_after_fork)


def source_key(source: str, name: str, target_key: str, options: dict[str, Any]) -> str:
    blob = json.dumps({"source": source, "name": name, "target": target_key, "options": options,
                       "cnnc": __version__, "compiler": compiler_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
