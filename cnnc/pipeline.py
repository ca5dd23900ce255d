"""Source text to (manifest, object code): the compile, through the source-keyed cache when possible.

``cnnc.compile``, the command line and the tests compile through here. The
cache (``cnnc.cache``) only stores; the compiler (``cnnc.compiler``) never
calls back up, so neither imports this module. The front end, the passes and
LLVM are imported only on a cache miss, which keeps a cached compile to
milliseconds (lark, networkx and llvmlite.binding are not loaded at all).
"""

from __future__ import annotations

from typing import Any

from cnnc.cache import cache_dir, collector_paused, read, source_key, write
from cnnc.codegen.target import generic_target, host_target
from cnnc.errors import Diagnostics


def compile_source(source: str, name: str, *, generic: bool = False, use_cache: bool = True, fuse: bool = True,
                   winograd: bool = True, diag: Diagnostics | None = None) -> tuple[dict[str, Any], bytes]:
    """(manifest, object code) for .cnn source text, from the source-keyed cache when possible."""
    target = generic_target() if generic else host_target()
    diag = diag if diag is not None else Diagnostics()
    key = source_key(source, name, target.key, {"fuse": fuse, "winograd": winograd})
    path = cache_dir() / f"src-{key}.cnnc"
    if use_cache:
        hit = read(path, key)
        if hit is not None:
            diag.replayed.extend(hit[0].get("warnings", []))
            return hit
    with collector_paused():
        from cnnc.compiler import compile_graph  # (the compiler: loaded on a miss only, see the docstring)
        from cnnc.driver import check_source

        compiled = compile_graph(check_source(source, name, diag), target, use_cache, fuse=fuse, winograd=winograd)
    manifest = {**compiled.manifest, "cache_key": key, "warnings": diag.render()}
    if use_cache:
        write(path, manifest, compiled.obj)
    return manifest, compiled.obj
