"""A tiny JIT for kernel tests: build one module, call its kernels on numpy arrays."""

from __future__ import annotations

import ctypes

import llvmlite.ir as ir
import numpy as np
import pytest

from cnnc.codegen.target import Target, emit_object, generic_target, host_target
from cnnc_runtime.native import NativeLibrary


class Jit:
    """Collects kernels into one module, compiles on first call, calls with numpy arrays or ints."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.vw = target.vector_width
        self.module = ir.Module(name="test")
        self._lib: NativeLibrary | None = None

    def __call__(self, name: str, *args) -> None:
        if self._lib is None:
            self._lib = NativeLibrary(emit_object(self.module, self.target), self.target.triple,
                                      self.target.cpu, self.target.features)
        types, values = [], []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous
                types.append(ctypes.c_void_p)
                values.append(a.ctypes.data)
            elif a is None:
                types.append(ctypes.c_void_p)
                values.append(None)
            elif isinstance(a, (float, np.floating)):
                types.append(ctypes.c_float)
                values.append(float(a))
            else:
                types.append(ctypes.c_int64)
                values.append(int(a))
        self._lib.function(name, types)(*values)


def avx2_target() -> Target:
    """x86-64-v3 (AVX2 and FMA, 8 floats a vector): the width between the host's AVX-512 and SSE2."""
    return Target(generic_target().triple, "x86-64-v3", "+avx,+avx2,+fma")


def _host_has_avx2() -> bool:
    return "+avx2" in host_target().features.split(",")


@pytest.fixture(params=["host", "avx2", "generic"])
def jit(request) -> Jit:
    """A fresh JIT for the host CPU, AVX2 and baseline x86-64: kernels must agree on every vector width."""
    if request.param == "avx2":
        if not _host_has_avx2():
            pytest.skip("this CPU cannot run AVX2 code")
        return Jit(avx2_target())
    return Jit(host_target() if request.param == "host" else generic_target())
