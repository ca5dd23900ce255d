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
    _init_llvm()
    module.triple = target.triple
    ref = llvm.parse_assembly(str(module))
    ref.verify()
    tm = target.machine()
    ref.triple = target.triple
    ref.data_layout = str(tm.target_data)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(ref, pb)
    return ref


def emit_object(module: ir.Module, target: Target) -> bytes:
    """Compile `module` to a relocatable object file for `target`."""
    ref = optimize(module, target)
    return target.machine().emit_object(ref)


def emit_assembly(module: ir.Module, target: Target) -> str:
    ref = optimize(module, target)
    return target.machine().emit_assembly(ref)
