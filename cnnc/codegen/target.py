"""The CPU we generate code for, and turning an LLVM module into an object file.

Code is specialised to the host by default (its CPU name and feature string),
so a Zen 4 gets AVX-512 and a laptop without it gets AVX2 or SSE. Setting
``CNNC_TARGET=generic`` forces a baseline x86-64 (SSE2) target; tests use it to
check that nothing depends on AVX-512.
"""

from __future__ import annotations

import gc
import os
import re
import select
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

import llvmlite

from cnnc.forkgate import internal_fork, llvm_lock, on_internal_fork
from cnnc_runtime.host import host_cpu
from cnnc_runtime.host import llvm as _llvm

if TYPE_CHECKING:
    import llvmlite.binding as llvm
    import llvmlite.ir as ir


@runtime_checkable
class Deferred(Protocol):
    """A module built when asked for (``cnnc.codegen.module.KernelSource``): in the process that compiles it."""

    name: str

    @property
    def tiled(self) -> bool: ...

    def build(self) -> ir.Module: ...


Source = Union["ir.Module", Deferred]  # what emit_objects compiles


@dataclass(frozen=True)
class Target:
    """A code-generation target: triple, CPU name, features and SIMD width in floats."""

    triple: str
    cpu: str
    features: str

    @property
    def vector_width(self) -> int:
        """float32 lanes of the widest vector register the target has."""
        feats = set(self.features.split(","))
        if "+avx512f" in feats:
            return 16
        if "+avx" in feats:
            return 8
        return 4

    @property
    def key(self) -> str:
        """What a compiled artifact depends on (for the compile cache)."""
        return f"{self.triple}|{self.cpu}|{self.features}|llvmlite {llvmlite.__version__}"

    def machine(self) -> llvm.TargetMachine:
        target = _llvm().Target.from_triple(self.triple)
        return target.create_target_machine(
            cpu=self.cpu, features=self.features, opt=3, reloc="pic", codemodel="default"
        )


def host_target() -> Target:
    """The machine we run on, unless ``CNNC_TARGET=generic`` asks for baseline x86-64."""
    if os.environ.get("CNNC_TARGET", "host") == "generic":
        return generic_target()
    return Target(*host_cpu())


def generic_target() -> Target:
    """Baseline x86-64: SSE2 only, runs on any 64-bit x86 CPU."""
    return Target(host_cpu()[0], "x86-64", "")


def optimize(module: ir.Module, target: Target) -> llvm.ModuleRef:
    """Parse, verify and optimise `module` for `target` (see `passes`)."""
    return _prepared(module, target, target.machine())


def emit_object(module: ir.Module, target: Target) -> bytes:
    """Compile `module` to a relocatable object file for `target`."""
    return _compile_each([module], target)[0]


def emit_assembly(module: ir.Module, target: Target) -> str:
    ref = optimize(module, target)
    return target.machine().emit_assembly(ref)


TILED = "cnnc.tiled"  # named metadata on kernels that block registers and vectorise themselves
GLUE = "cnnc.glue"  # ... and on the entry-point module: calls between kernels, barriers, the run loop


def passes(ref: llvm.ModuleRef, tm: llvm.TargetMachine, tiled: bool) -> None:
    """Optimise one module in place: SROA and simplifycfg for tiled kernels and the entry points
    (`short_pipeline`), else O2.

    The conv and dense kernels come out of cnnc already register-blocked,
    vectorised and unrolled, their sums in SSA values: the passes that turn
    their few stack slots into registers made them as fast as O2 did
    (LeNet-5, CIFAR, a 64-channel conv and a strided, grouped net, kernel by
    kernel, within noise), in a seventh of the optimiser's time. InstCombine,
    the third pass once, folded their address arithmetic before the code
    generator, which folds it as well: without it the optimiser's time on
    LeNet-5 went from 203 to 138 ms of CPU, C3's forward compiles to the same
    instructions and the others to a few different ones, and a call measured
    as fast (CPU time, one thread, alternating: LeNet-5 training and
    inference on AVX-512, AVX2 and SSE, the 64-channel conv's direct and
    Winograd kernels, the CIFAR net: -3.9% to +1.5%, no sign either way;
    the same outputs bit for bit). The scalar loops of pooling and the
    elementwise kernels still gain from O2's loop-invariant code motion and
    value numbering (a 3x3 max pool: 1.5x), and are cheap to optimise.

    The entry points (a module of calls, barriers, and the run loop's
    gradient sums, vectorised by hand like the tiled kernels) took O2 a
    tenth of LeNet-5's whole LLVM time, mostly inlining each training step
    into the run loop; with the short pipeline training and batch-1
    inference measured as fast (notes of the compile work).
    """
    llvm = _llvm()
    pb = llvm.create_pass_builder(tm, _tuning())
    if not tiled:
        pb.getModulePassManager().run(ref, pb)
        return
    pm = llvm.create_new_module_pass_manager()
    pm.add_sroa_pass()
    pm.add_simplify_cfg_pass()
    pm.run(ref, pb)


def _tuning() -> llvm.PipelineTuningOptions:
    """O2 without LLVM's loop unroller and loop vectorizer.

    The kernels vectorize and unroll their hot loops themselves (register
    tiles, vector lanes); LLVM doing it again took half of the optimiser's and
    code generator's time and measured no faster at run time (LeNet-5, CIFAR,
    a 64-channel conv: equal, or up to ~10% faster without). The two go
    together: with the unroller alone off, the vectorizer met loops it had
    not seen before and hit an assertion (a max pool with overlapping windows).
    O2 rather than O3: the same kernel speed (LeNet-5, CIFAR, the 64-channel
    conv, single-thread, within noise) for about a tenth less compile time.
    """
    options = _llvm().create_pipeline_tuning_options(speed_level=2)
    options.loop_unrolling = False
    options.loop_vectorization = False
    return options


def kernel_cost(module: ir.Module) -> float:
    """A rough estimate of LLVM's milliseconds on `module` (optimiser and codegen): the order in which the
    processes of a parallel compile take the modules, costliest first, and the size of their object files.

    Fitted by least squares on the kernels of LeNet-5, CIFAR, resnet_tiny and
    a strided, grouped net, for each of the two pipelines of `passes`: the
    time follows the instructions and blocks more than the IR's length.
    """
    blocks = instructions = 0
    for fn in module.functions:
        for block in fn.blocks:
            blocks += 1
            instructions += len(block.instructions)
    if TILED in module.namedmetadata or GLUE in module.namedmetadata:  # (the short pipeline)
        return 3 + 0.35 * blocks + 0.02 * instructions
    return 6 + 0.3 * blocks + 0.045 * instructions


TILED_GUESS = 40.0  # kernel_cost of a kernel not built yet: LeNet-5's average tiled kernel ...
PLAIN_GUESS = 14.0  # ... and other kernel


def estimate(source: Unit) -> float:
    """`kernel_cost` of a module, or a guess for a kernel whose module is not built yet (of a group: the sum)."""
    if isinstance(source, Group):
        return sum(map(estimate, source))
    if isinstance(source, Deferred):
        return TILED_GUESS if source.tiled else PLAIN_GUESS
    return kernel_cost(source)


GROUP = 4  # small kernels (O2's, not built yet) compiled as one module, this many at most


class Group(tuple):
    """Kernels compiled as one module (`units`)."""


Unit = Source | Group  # what one process compiles at a time, to one object file


def units(modules: list[Source]) -> list[Unit]:
    """The modules in their order, each kernel for O2 not built yet grouped with the next ones, up to GROUP.

    LLVM's work on a module has a fixed part (setting up and running O2's
    hundred-odd passes, then the code generator's), ~3 ms, whatever its
    size: LeNet-5's 19 small kernels (pooling, optimizer steps, the inputs'
    preparation, losses) took 340 ms of CPU one module each and 283 ms
    linked into one. Each function's code is the same either way (they do
    not call each other); groups of a few keep the shares of a parallel
    compile small enough to balance.
    """
    plain = [i for i, source in enumerate(modules) if isinstance(source, Deferred) and not source.tiled]
    chunks = [plain[k:k + GROUP] for k in range(0, len(plain), GROUP)]
    grouped = {chunk[0]: Group(modules[i] for i in chunk) for chunk in chunks if len(chunk) > 1}
    later = {i for chunk in chunks if len(chunk) > 1 for i in chunk[1:]}
    return [grouped.get(i, source) for i, source in enumerate(modules) if i not in later]


def _prepared(unit: Unit, target: Target, tm: llvm.TargetMachine) -> llvm.ModuleRef:
    """A module, or a group's modules linked into one (each built first if deferred), parsed, verified and
    optimised for `target` (see `passes`)."""
    llvm = _llvm()
    ref = text = None
    for source in unit if isinstance(unit, Group) else (unit,):
        text = str(source.build() if isinstance(source, Deferred) else source)
        own = llvm.parse_assembly(text)
        own.verify()
        if ref is None:
            ref = own
        else:
            ref.link_in(own)
    ref.triple = target.triple
    ref.data_layout = str(tm.target_data)
    passes(ref, tm, tiled=short_pipeline(text))  # (a group's kernels all take O2)
    return ref


def short_pipeline(text: str) -> bool:
    """Whether a module's text is marked for the short pipeline of `passes` (a tiled kernel, or the entry points)."""
    return f"!{TILED} =" in text or f"!{GLUE} =" in text


def _compile_each(sources: Iterable[Unit], target: Target) -> list[bytes]:
    """An object file for each unit: the same bytes whichever process compiles it, and in whatever company."""
    tm = target.machine()
    return [tm.emit_object(_prepared(source, target, tm)) for source in sources]


PARALLEL_MIN_COST = 200  # estimated ms of LLVM work below which a second process does not pay
CHILD_WAIT_MIN = 20.0  # seconds a child may take beyond this process's own share before it counts as stuck
CHILD_WAIT_FACTOR = 5.0  # ... or this many times what this process took for its share, whichever is longer
_INDEX = struct.Struct("<I")  # a module's index: a token of the work pipe
_HEADER = struct.Struct("<IQ")  # before each object a child writes: its module's index, its length
MAX_TOKENS = 4096  # modules whose tokens fit a pipe written before any reader starts (16 KiB: macOS's least)

_emitting = threading.Lock()  # one parallel compile at a time in a process


def emit_objects(modules: list[Source], target: Target, processes: int | None = None,
                 meanwhile: Callable[[], object] | None = None) -> list[bytes]:
    """Compile modules (kernels not built yet are built where they are compiled) to object files, one per module
    or group of small kernels (`units`), in the modules' order: the same bytes however many processes compiled
    them (MPI ranks compare them).

    llvmlite serialises every LLVM call behind one lock, so threads cannot
    overlap; forked processes can, and two cores then take about half the
    time. The modules' indices, costliest first by estimate, are tokens in a
    pipe; this process and forked children each take the next one when done
    with the last, build that kernel's body, print it, optimise it and
    generate its code. Whoever is free takes the next, so the shares balance
    without knowing the costs, and the kernel bodies are built in parallel
    too. A child's modules are compiled here when it cannot be started,
    fails or makes no progress in time, so errors surface in this process
    and nothing waits forever.

    A fork copies only the forking thread: a lock another thread held at that
    moment stays held in the child for ever. The fork is made holding
    llvmlite's lock (so no thread is inside LLVM, whose own mutexes are only
    taken under it), and parallel compiles in one process take turns; for
    whatever other lock a child might still meet, the parent's wait is
    bounded (`_deadline`) and a stuck child is killed.

    `meanwhile` is work of the caller's own that this process does once the
    children are started, before it takes modules (in a compile in one
    process: first).
    """
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    modules = units(modules)
    processes = min(processes, len(modules))
    if (processes < 2 or not hasattr(os, "fork") or sum(map(estimate, modules)) < PARALLEL_MIN_COST
            or len(modules) > MAX_TOKENS):
        if meanwhile is not None:
            meanwhile()
        return _compile_each(modules, target)
    with _emitting:
        return _emit_parallel(modules, target, processes, meanwhile)


def _emit_parallel(modules: list[Unit], target: Target, processes: int,
                   meanwhile: Callable[[], object] | None) -> list[bytes]:
    # costliest first (stable: ties in program order), the groups of small kernels last: the shares' ends balance
    order = sorted(range(len(modules)), key=lambda i: (isinstance(modules[i], Group), -estimate(modules[i])))
    try:
        work, fill = os.pipe()
    except OSError:  # (no descriptor left): compiled here, as when no child can be started
        return _compile_each(modules, target)
    try:
        os.write(fill, b"".join(_INDEX.pack(i) for i in order))
    finally:
        os.close(fill)  # closed before the fork: an empty pipe then reads as the end, in every process
    freeze = gc.get_freeze_count() == 0  # (a caller's own frozen objects are left as they are)
    if freeze:
        gc.freeze()  # neither process's collector walks (and so copies) the heap they share
    try:
        children = [_start(work, modules, target) for _ in range(processes - 1)]
        try:
            if meanwhile is not None:
                meanwhile()
            began = time.monotonic()
            done = dict(_compile_claims(work, modules, target))
            deadline = _deadline(time.monotonic() - began)
        except BaseException:
            for child in children:
                _abandon(child)
            raise
    finally:
        os.close(work)
        if freeze:
            gc.unfreeze()
    collected = 0  # every child reaped before any of its modules is redone here
    try:
        for child in children:
            done.update(_collect(child, deadline))
            collected += 1
    except BaseException:  # (an interrupt): no child left behind
        for child in children[collected + 1:]:
            _abandon(child)
        raise
    rest = [i for i in range(len(modules)) if i not in done]  # a failed or stuck child's share
    done.update(zip(rest, _compile_each([modules[i] for i in rest], target)))
    return [done[i] for i in range(len(modules))]


def _compile_claims(work: int, modules: list[Unit], target: Target) -> Iterator[tuple[int, bytes]]:
    """(index, object code) of each module this process takes from the work pipe, one when the last is compiled,
    until the pipe is empty: whoever is free takes the next, code generation included.

    (A pipe read of a token's 4 bytes is atomic: every token was written before any reader started.)
    """
    tm = target.machine()
    while token := os.read(work, _INDEX.size):
        i = _INDEX.unpack(token)[0]
        yield i, tm.emit_object(_prepared(modules[i], target, tm))


def _deadline(own_seconds: float) -> float:
    """When a child still running is taken to be stuck (a monotonic time)."""
    return time.monotonic() + max(CHILD_WAIT_MIN, CHILD_WAIT_FACTOR * own_seconds)


def _llvm_lock() -> AbstractContextManager:
    """llvmlite's lock around every LLVM call (a private attribute: without it, the watchdog alone guards)."""
    _llvm()
    return llvm_lock() or nullcontext()


def _new_lock_after_fork() -> None:
    """In a child forked while this process's parallel compile forked: that compile never ends here."""
    global _emitting
    _emitting = threading.Lock()


on_internal_fork(_new_lock_after_fork)


def _start(work: int, modules: list[Unit], target: Target) -> tuple[int, int] | None:
    """Fork a process that compiles modules it takes from the work pipe and writes each one's index and object code
    to a pipe of its own: (pid, read end), or None."""
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        with _llvm_lock(), internal_fork():
            pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        gc.disable()  # a collection would touch, and so copy, every page of the parent's heap
        try:
            os.close(r)
            # (written at the end: a full pipe would stop this child until the parent is done with its own share)
            records = b"".join(_HEADER.pack(i, len(data)) + data for i, data in _compile_claims(work, modules, target))
            with os.fdopen(w, "wb") as out:
                out.write(records)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(child: tuple[int, int] | None, deadline: float) -> dict[int, bytes]:
    """The object code of each module a child compiled, by index, after reaping it; none when there was no child,
    it failed or it was stuck."""
    if child is None:
        return {}
    pid, r = child
    chunks = []
    poll = select.poll()  # (not select.select: it fails on descriptors past 1024)
    poll.register(r, select.POLLIN)
    try:
        while True:
            if not poll.poll(max(0, round((deadline - time.monotonic()) * 1000))):
                # stuck (a lock another thread held at the fork?): killed, its modules redone here
                _abandon(child)
                return {}
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:
        _abandon(child)
        raise
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return _objects(b"".join(chunks)) if os.waitstatus_to_exitcode(status) == 0 else {}


def _objects(data: bytes) -> dict[int, bytes]:
    """The (index, object code) records a child wrote, by index."""
    objects, at = {}, 0
    while at < len(data):
        i, size = _HEADER.unpack_from(data, at)
        at += _HEADER.size
        objects[i] = data[at:at + size]
        at += size
    return objects


def _abandon(child: tuple[int, int] | None) -> None:
    """Stop a child whose result is no longer wanted, and reap it."""
    if child is None:
        return
    pid, r = child
    try:
        os.close(r)
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os.waitpid(pid, 0)


def function_assembly(asm: str) -> dict[str, list[str]]:
    """Each function's instructions in an assembly text of LLVM's, local labels and constant-pool names made alike
    (their numbers follow a function's place in its module): two builds' code compared function by function."""
    out: dict[str, list[str]] = {}
    name = None
    for line in asm.splitlines():
        if line.startswith(".Lfunc_end"):
            name = None
        elif line.startswith(".L"):  # (a block or a constant within the function)
            continue
        elif m := re.match(r'^"?([\w.]+)"?:', line):
            name = m.group(1)
            out[name] = []
        elif name and line.startswith("\t") and not line.startswith("\t."):
            out[name].append(re.sub(r"\.L\w+", "L", line.split("#")[0].strip()))
    return out


def emit_assembly_all(modules: list[ir.Module], target: Target) -> str:
    return "".join(emit_assembly(m, target) for m in modules)
