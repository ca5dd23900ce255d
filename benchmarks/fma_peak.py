"""Measured single-precision FMA peak of this machine, with a tiny llvmlite kernel.

The kernel keeps ``CHAINS`` independent accumulators of ``<W x float>`` (W = the
widest vector the host has: 16 with AVX-512, 8 with AVX, 4 otherwise) and, for
``iters`` iterations, updates each with ``acc = llvm.fma(acc, a, b)``. The
chains are independent, so the loop is bound by FMA throughput, not latency
(12 chains cover 2 pipes x 4-5 cycles of latency on current x86 cores). The
accumulators converge to a fixed point (a < 1), so no value overflows or
turns denormal. One call does ``iters * CHAINS * W * 2`` floating-point
operations; ctypes releases the GIL, so calling it from two Python threads at
once measures both cores.

    python benchmarks/fma_peak.py          # prints GFLOP/s on 1 thread and on 2
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from functools import lru_cache

import llvmlite.binding as llvm
import llvmlite.ir as ir

CHAINS = 12


@lru_cache(maxsize=1)
def _init() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


def host_vector_width() -> int:
    _init()
    feats = set(llvm.get_host_cpu_features().flatten().split(","))
    if "+avx512f" in feats:
        return 16
    if "+avx" in feats:
        return 8
    return 4


def build_ir(width: int, chains: int = CHAINS) -> str:
    """``void fma_loop(float* out, i64 iters)``: chains of vector FMAs, summed into out[0..width)."""
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, width)
    i64 = ir.IntType(64)
    module = ir.Module(name="fma_peak")
    fma = ir.Function(module, ir.FunctionType(vec, [vec, vec, vec]), name=f"llvm.fma.v{width}f32")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [f32.as_pointer(), i64]), name="fma_loop")
    out, iters = fn.args
    entry, loop, done = fn.append_basic_block("entry"), fn.append_basic_block("loop"), fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    a_vec = ir.Constant(vec, [0.999999] * width)
    b_vec = ir.Constant(vec, [1e-6] * width)
    init = [ir.Constant(vec, [float(c + 1) * 0.01] * width) for c in range(chains)]
    positive = b.icmp_signed(">", iters, ir.Constant(i64, 0))
    b.cbranch(positive, loop, done)

    b.position_at_end(loop)
    i = b.phi(i64, "i")
    accs = [b.phi(vec, f"acc{c}") for c in range(chains)]
    new = [b.call(fma, [acc, a_vec, b_vec]) for acc in accs]
    i_next = b.add(i, ir.Constant(i64, 1))
    i.add_incoming(ir.Constant(i64, 0), entry)
    i.add_incoming(i_next, loop)
    for acc, v, c in zip(accs, new, init):
        acc.add_incoming(c, entry)
        acc.add_incoming(v, loop)
    b.cbranch(b.icmp_signed("<", i_next, iters), loop, done)

    b.position_at_end(done)
    finals = [b.phi(vec, f"final{c}") for c in range(chains)]
    for fin, v, c in zip(finals, new, init):
        fin.add_incoming(c, entry)
        fin.add_incoming(v, loop)
    total = finals[0]
    for v in finals[1:]:
        total = b.fadd(total, v)
    b.store(total, b.bitcast(out, vec.as_pointer()), align=4)
    b.ret_void()
    return str(module)


class FmaKernel:
    """The compiled kernel; ``run(iters)`` calls it once and returns the sum of the lanes (to keep it honest)."""

    def __init__(self, width: int | None = None, chains: int = CHAINS) -> None:
        _init()
        self.width = width or host_vector_width()
        self.chains = chains
        triple = llvm.get_process_triple()
        tm = llvm.Target.from_triple(triple).create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
        ref = llvm.parse_assembly(build_ir(self.width, chains))
        ref.triple = triple
        ref.data_layout = str(tm.target_data)
        ref.verify()
        # Deliberately no IR optimisation pipeline: the loop is already minimal, and O3 could unroll or
        # reassociate it. The backend (opt=3) still does instruction selection and register allocation.
        self._engine = llvm.create_mcjit_compiler(ref, tm)
        self._engine.finalize_object()
        addr = self._engine.get_function_address("fma_loop")
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(addr)

    def flops(self, iters: int) -> int:
        return iters * self.chains * self.width * 2

    def run(self, iters: int) -> float:
        out = (ctypes.c_float * self.width)()
        self._fn(ctypes.addressof(out), iters)
        return float(sum(out))


def measure(threads: int = 1, seconds: float = 0.25, repeats: int = 5, kernel: FmaKernel | None = None) -> list[float]:
    """GFLOP/s of ``threads`` concurrent calls (all threads together), one sample per repeat."""
    k = kernel or FmaKernel()
    iters = 1_000_000
    t0 = time.perf_counter()
    k.run(iters)  # warm-up and calibration
    dt = max(time.perf_counter() - t0, 1e-6)
    iters = max(1000, int(iters * seconds / dt))
    samples = []
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)
        ends: list[float] = []

        def work(k=k, iters=iters, barrier=barrier, ends=ends) -> None:
            barrier.wait()
            k.run(iters)
            ends.append(time.perf_counter())

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in pool:
            t.join()
        samples.append(threads * k.flops(iters) / (max(ends) - start) / 1e9)
    return samples


def main() -> None:
    k = FmaKernel()
    print(f"<{k.width} x float> x {k.chains} chains, {os.cpu_count()} CPUs")
    for n in (1, 2):
        s = sorted(measure(n, kernel=k))
        print(f"{n} thread(s): median {s[len(s) // 2]:.1f} GFLOP/s (min {s[0]:.1f}, max {s[-1]:.1f})")


if __name__ == "__main__":
    main()
