"""The CPU we generate code for, and turning an LLVM module into an object file.

Code is specialised to the host by default (its CPU name and feature string),
so a Zen 4 gets AVX-512 and a laptop without it gets AVX2 or SSE. Setting
``CNNC_TARGET=generic`` forces a baseline x86-64 (SSE2) target; tests use it to
check that nothing depends on AVX-512.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import llvmlite
import llvmlite.binding as llvm
import llvmlite.ir as ir


@lru_cache(maxsize=1)
def _init_llvm() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


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
        _init_llvm()
        target = llvm.Target.from_triple(self.triple)
        return target.create_target_machine(
            cpu=self.cpu, features=self.features, opt=3, reloc="pic", codemodel="default"
        )


def host_target() -> Target:
    """The machine we run on, unless ``CNNC_TARGET=generic`` asks for baseline x86-64."""
    _init_llvm()
    triple = llvm.get_process_triple()
    if os.environ.get("CNNC_TARGET", "host") == "generic":
        return generic_target()
    return Target(triple, llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())


def generic_target() -> Target:
    """Baseline x86-64: SSE2 only, runs on any 64-bit x86 CPU."""
    _init_llvm()
    return Target(llvm.get_process_triple(), "x86-64", "")


def optimize(module: ir.Module, target: Target) -> llvm.ModuleRef:
    """Parse, verify and run LLVM's O3 pipeline (the new pass manager) for `target`."""
    return _link([str(module)], target)


def emit_object(module: ir.Module, target: Target) -> bytes:
    """Compile `module` to a relocatable object file for `target`."""
    ref = optimize(module, target)
    return target.machine().emit_object(ref)


def emit_assembly(module: ir.Module, target: Target) -> str:
    ref = optimize(module, target)
    return target.machine().emit_assembly(ref)


def _link(texts: list[str], target: Target) -> llvm.ModuleRef:
    """Parse the modules' IR and link them into one, optimised for `target`."""
    _init_llvm()
    first = None
    for text in texts:
        ref = llvm.parse_assembly(text)
        ref.verify()
        if first is None:
            first = ref
        else:
            first.link_in(ref)
    tm = target.machine()
    first.triple = target.triple
    first.data_layout = str(tm.target_data)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(first, pb)
    return first


def _groups(modules: list[ir.Module], parts: int) -> list[list[str]]:
    """The modules' IR texts dealt into `parts` groups of similar size (largest first)."""
    texts = sorted((str(m) for m in modules), key=len, reverse=True)
    groups: list[list[str]] = [[] for _ in range(max(1, min(parts, len(texts))))]
    sizes = [0] * len(groups)
    for text in texts:
        i = sizes.index(min(sizes))
        groups[i].append(text)
        sizes[i] += len(text)
    return groups


def _compile_group(job: tuple[list[str], Target]) -> bytes:
    texts, target = job
    return target.machine().emit_object(_link(texts, target))


PARALLEL_MIN_CHARS = 200_000  # below this much IR, starting processes costs more than it saves


def emit_objects(modules: list[ir.Module], target: Target, processes: int | None = None) -> list[bytes]:
    """Compile modules to object files, one per group, the groups in parallel processes.

    llvmlite serialises every LLVM call behind one lock, so threads cannot
    overlap; forked processes can, and two cores then take about half the
    time. Where forking is not possible the groups compile one after another.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    groups = _groups(modules, processes)
    jobs = [(texts, target) for texts in groups]
    if len(groups) > 1 and sum(len(t) for g in groups for t in g) >= PARALLEL_MIN_CHARS:
        try:
            with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("fork")) as pool:
                return list(pool.map(_compile_group, jobs))
        except (OSError, ValueError, RuntimeError):  # no fork here (or it failed): compile serially
            pass
    return [_compile_group(job) for job in jobs]


def emit_assembly_all(modules: list[ir.Module], target: Target) -> str:
    return "".join(emit_assembly(m, target) for m in modules)
