"""The one way through the compiler: source text -> checked graph -> optimized graph -> LLVM module -> cached object
-> model.

``cnnc.compile``, every command of the CLI and the tests compile through here.
Each stage is a plain function (``cnnc.compiler``, ``cnnc.generate``); this
module runs them in order, keeps each stage's graph for whoever asks (``cnnc
check`` prints the checked graph with the fused groups of the optimized one;
``cnnc compile --dump-after`` watches the passes of the compile itself), and
puts the two caches of ``cnnc.cache`` (a pure store) around them:

- by source text: compiling the same text again is one file read, without a
  parse; lark, networkx and llvmlite.binding are not even imported;
- by optimized graph: two files that differ only in comments share the object.

The data flows one way: the stages (``cnnc.compiler`` up to the optimized
graph, ``cnnc.generate`` after it) and the cache never call back here.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cnnc.cache import cache_dir, collector_paused, read, source_key, write
from cnnc.codegen.target import Target, generic_target, host_target
from cnnc.errors import CnnError, Diagnostics
from cnnc_runtime.signals import signals_deferred

if TYPE_CHECKING:
    from collections.abc import Callable

    import llvmlite.ir as ir
    import networkx as nx

    from cnnc_runtime.model import Model

    AfterPass = Callable[[str, nx.DiGraph], None]

MAX_SOURCE_BYTES = 64 << 20  # a .cnn file is text a person wrote; anything larger is a mistake


def read_source(path: str | os.PathLike[str]) -> str:
    """The text of a .cnn file; unreadable, huge or non-UTF-8 files are user errors (one line), not tracebacks."""
    try:
        if Path(path).is_dir():
            raise CnnError(f"{path}: is a directory, not a .cnn file")
        with open(path, "rb") as f:
            data = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as e:
        raise CnnError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise CnnError(f"{path}: larger than {MAX_SOURCE_BYTES >> 20} MiB; not a .cnn file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CnnError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def _compiler() -> ModuleType:
    """``cnnc.compiler``: the front end (lark) and the passes (networkx), about 0.3 s to import, imported on the
    first compile that misses the cache or needs a graph."""
    with signals_deferred():  # (a Ctrl-C is raised once the import is whole: see cnnc_runtime.signals)
        from cnnc import compiler  # lazy: a cached compile, `cnnc run` of an artifact and `import cnnc` never need it

    return compiler


def _generator() -> ModuleType:
    """``cnnc.generate``: the code generator (llvmlite.ir and the kernel emitters), imported to generate code."""
    with signals_deferred():  # (a Ctrl-C is raised once the import is whole: see cnnc_runtime.signals)
        from cnnc import generate  # lazy: `cnnc check` and a cached compile never need it

    return generate


class Compiled:
    """What a compile produces: the manifest, the object code, and the LLVM modules when asked to keep them."""

    def __init__(self, manifest: dict[str, Any], obj: bytes, modules: list[ir.Module] | None = None) -> None:
        self.manifest, self.obj, self.modules = manifest, obj, modules


class Build:
    """One network on its way through the pipeline: each stage is computed once, when first asked for, and kept.

    `after(pass name, graph)` sees the graph after each pass as this build runs
    it. `checked` starts from a checked graph instead of the source text (a
    graph changed by hand: gradcheck switches dropout off). ``fuse=False``
    leaves activations unfused; ``winograd=False`` keeps every convolution
    direct (Winograd's transforms round a little differently). ``profile=True`` builds the profiling code
    (``cnnc.codegen.instrument``: a timestamp at each layer boundary), cached under keys of its own.
    """

    def __init__(self, source: str, name: str = "<string>", diag: Diagnostics | None = None, *,
                 fuse: bool = True, winograd: bool = True, after: AfterPass | None = None,
                 checked: nx.DiGraph | None = None, profile: bool = False) -> None:
        self.source, self.name = source, name
        self.diag = diag if diag is not None else Diagnostics()
        self.fuse, self.winograd, self.after, self.profile = fuse, winograd, after, profile
        self._checked, self._optimized = checked, None

    @classmethod
    def of_checked(cls, checked: nx.DiGraph, **options: Any) -> Build:
        return cls(checked.graph["source"], checked.graph["network"], checked=checked, **options)

    def checked(self) -> nx.DiGraph:
        """The graph as written, pruned, with shapes and counts (what `cnnc check` reports on)."""
        if self._checked is None:
            self._checked = _compiler().check(self.source, self.name, self.diag, self.after)
        return self._checked

    def optimized(self) -> nx.DiGraph:
        """A copy of the checked graph, fused, with the backward steps of each loss: what code is generated from."""
        if self._optimized is None:
            g = _compiler().optimize(self.checked(), self.after, skip=() if self.fuse else ("fuse",))
            g.graph["winograd"] = self.winograd
            if "inference" in g.graph:  # (fold's copy, which inference compiles)
                g.graph["inference"].graph["winograd"] = self.winograd
            self._optimized = g
        return self._optimized

    def description(self) -> dict[str, Any]:
        """The manifest's entries that do not depend on the code: the summary (text and JSON), the train section."""
        return _compiler().describe(self.checked(), self.optimized())

    def dot(self, optimized: bool = False) -> str:
        """The checked (or the optimized) graph as Graphviz DOT."""
        return _compiler().as_dot(self.optimized() if optimized else self.checked())

    def compiled(self, target: Target | None = None, use_cache: bool = True, keep_module: bool = False) -> Compiled:
        """Object code and manifest for `target` (default: this CPU), from the cache keyed by the optimized graph
        when possible; ``keep_module`` keeps the LLVM modules (and so always generates code)."""
        target = target or host_target()
        with collector_paused():
            compiler = _compiler()
            key = compiler.ir_key(self.optimized(), target, "profile" if self.profile else "")
            path = cache_dir() / f"{key}.cnnc"
            hit = read(path, key) if use_cache and not keep_module else None
            if hit is not None:  # (a corrupt entry reads as a miss and is rebuilt below)
                manifest, obj = hit
                manifest.update(self.description())  # comments and the train section are not code
                return Compiled(manifest, obj)
            manifest, obj, modules = _generator().generate(self.checked(), self.optimized(), target, self.profile,
                                                           keep_module)
        manifest["cache_key"] = key
        if use_cache:
            write(path, manifest, obj)
        return Compiled(manifest, obj, modules)


def listing(graph: nx.DiGraph) -> str:
    """A graph as text, one node a line (``cnnc compile --dump-after``)."""
    return _compiler().as_listing(graph)


def pass_names() -> list[str]:
    """The passes in the order a compile runs them (``--dump-after`` takes one of them)."""
    return list(_compiler().PASS_NAMES)


def compile_source(source: str, name: str = "<string>", *, generic: bool = False, use_cache: bool = True,
                   fuse: bool = True, winograd: bool = True, profile: bool = False,
                   diag: Diagnostics | None = None) -> tuple[dict[str, Any], bytes]:
    """(manifest, object code) for .cnn source text, from the source-keyed cache when possible.

    A hit replays the warnings the first compile gave into `diag`. ``profile``: the profiling build (see ``Build``).
    """
    target = generic_target() if generic else host_target()
    diag = diag if diag is not None else Diagnostics()
    options = {"fuse": fuse, "winograd": winograd} | ({"profile": True} if profile else {})
    key = source_key(source, name, target.key, options)
    path = cache_dir() / f"src-{key}.cnnc"
    if use_cache:
        hit = read(path, key)
        if hit is not None:
            diag.replayed.extend(hit[0].get("warnings", []))
            return hit
    compiled = Build(source, name, diag, fuse=fuse, winograd=winograd, profile=profile).compiled(target, use_cache)
    manifest = {**compiled.manifest, "cache_key": key, "warnings": diag.render()}
    if use_cache:
        write(path, manifest, compiled.obj)
    return manifest, compiled.obj


def compile_model(source: str, name: str = "<string>", *, seed: int | None = None, **options: Any) -> Model:
    """A ``Model`` for .cnn source text: the last stage (options as for ``compile_source``)."""
    compiled = compile_source(source, name, **options)
    with signals_deferred():  # (a Ctrl-C is raised once the import is whole: see cnnc_runtime.signals)
        from cnnc_runtime.model import Model  # lazy: a compile imports it while its other processes compile (generate)

    return Model(*compiled, seed=seed)


def check_source(source: str, name: str = "<string>", diag: Diagnostics | None = None) -> nx.DiGraph:
    """The checked graph of .cnn source text (``Build(...).checked()``)."""
    return Build(source, name, diag).checked()


def optimize(checked: nx.DiGraph, after: AfterPass | None = None, skip: tuple[str, ...] = ()) -> nx.DiGraph:
    """The optimized graph of a checked one, on a copy; `skip` leaves passes out (``("fuse",)``: unfused)."""
    return _compiler().optimize(checked, after, skip)
