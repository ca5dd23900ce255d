"""This machine's single-precision FMA peak, measured with a tiny kernel and remembered per CPU.

The kernel keeps ``CHAINS`` independent accumulators of ``<W x float>`` (W =
the widest vector the host has: 16 with AVX-512, 8 with AVX, 4 otherwise) and,
for ``iters`` iterations, updates each with ``acc = llvm.fma(acc, a, b)``. The
chains are independent, so the loop is bound by FMA throughput, not latency
(12 chains cover 2 pipes x 4-5 cycles of latency on current x86 cores). The
accumulators converge to a fixed point (a < 1), so no value overflows or
turns denormal. One call does ``iters * CHAINS * W * 2`` floating-point
operations; ctypes releases the GIL, so calls from several Python threads at
once measure several cores.

``fma_peak(threads)`` is what ``cnnc profile`` divides by: measured once per
CPU (the fingerprint of ``cnnc_runtime.host``) and thread count, and kept as
JSON in the cache directory (``peak/<fingerprint>.json``). A record that is
missing, damaged, not this user's or inconsistent is measured again and
rewritten atomically; nothing in it is ever executed or unpickled.
``benchmarks/fma_peak.py`` and ``benchmarks/run.py`` measure with the same kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cnnc_runtime import host
from cnnc_runtime.cachedir import cache_dir, read_private, write_private

CHAINS = 12
RECORD = 1  # the version of what a record holds: a change makes every old record a miss
MAX_GFLOPS = 1e7  # more than any CPU: a record claiming more is damaged


def vector_width(features: str) -> int:
    """Floats per vector register of a CPU with LLVM feature string `features`."""
    have = set(features.split(","))
    return 16 if "+avx512f" in have else 8 if "+avx" in have else 4


def kernel_ir(width: int, chains: int = CHAINS) -> str:
    """LLVM IR of ``void fma_loop(float* out, i64 iters)``: `chains` chains of `width`-wide FMAs, summed into
    out[0..width). (Text, so that the runtime needs no IR builder.)"""
    vec = f"<{width} x float>"
    splat = lambda v: "<" + ", ".join([f"float {v}"] * width) + ">"  # noqa: E731
    a, b = splat(_f32(0.999999)), splat(_f32(1e-6))
    start = [splat(_f32(0.01 * (c + 1))) for c in range(chains)]
    lines = [f"declare {vec} @llvm.fma.v{width}f32({vec}, {vec}, {vec})",
             "define void @fma_loop(ptr %out, i64 %iters) {",
             "entry:",
             "  %go = icmp sgt i64 %iters, 0",
             "  br i1 %go, label %loop, label %done",
             "loop:",
             "  %i = phi i64 [0, %entry], [%i.next, %loop]"]
    lines += [f"  %acc{c} = phi {vec} [{start[c]}, %entry], [%new{c}, %loop]" for c in range(chains)]
    lines += [f"  %new{c} = call {vec} @llvm.fma.v{width}f32({vec} %acc{c}, {vec} {a}, {vec} {b})"
              for c in range(chains)]
    lines += ["  %i.next = add i64 %i, 1",
              "  %more = icmp slt i64 %i.next, %iters",
              "  br i1 %more, label %loop, label %done",
              "done:"]
    lines += [f"  %fin{c} = phi {vec} [{start[c]}, %entry], [%new{c}, %loop]" for c in range(chains)]
    total = "%fin0"
    for c in range(1, chains):
        lines.append(f"  %sum{c} = fadd {vec} {total}, %fin{c}")
        total = f"%sum{c}"
    lines += [f"  store {vec} {total}, ptr %out, align 4", "  ret void", "}"]
    return "\n".join(lines) + "\n"


def _f32(v: float) -> str:
    """`v` rounded to float32, as LLVM writes float constants (the hex bits of that value as a double)."""
    (rounded,) = struct.unpack("<f", struct.pack("<f", v))
    (bits,) = struct.unpack("<Q", struct.pack("<d", rounded))
    return f"0x{bits:016X}"


class FmaKernel:
    """The compiled kernel; ``run(iters)`` calls it once and returns the sum of the lanes (to keep it honest)."""

    def __init__(self, width: int | None = None, chains: int = CHAINS) -> None:
        llvm = host.llvm()
        triple, cpu, features = host.host_cpu()
        self.width = width or vector_width(features)
        self.chains = chains
        tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3)
        ref = llvm.parse_assembly(kernel_ir(self.width, chains))
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
    """GFLOP/s of `threads` concurrent calls (all threads together), one sample per repeat of about `seconds`."""
    k = kernel or FmaKernel()
    iters = 100_000
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


@dataclass(frozen=True)
class Peak:
    """The best measured FMA rate (GFLOP/s, all threads together) for each thread count measured."""

    cpu: str  # LLVM's name for the CPU
    width: int
    best: dict[int, float]

    def gflops(self, threads: int) -> float:
        """The peak of `threads` threads: the best sample on that many, or `threads` x the best on one if higher.

        A process on another core can only slow the measurement down, so the
        best sample is the estimate; `threads` x one thread covers a run where
        a neighbour held a core while the threads were measured together.
        """
        return max(self.best.get(threads, 0.0), threads * self.best.get(1, 0.0))


def fma_peak(threads: int = 1, seconds: float = 0.25, repeats: int = 5, use_cache: bool = True,
             fresh: bool = False) -> Peak:
    """This CPU's FMA peak for 1 and `threads` threads: from the cache, else measured (a few seconds) and kept.

    ``fresh`` measures again and keeps, per thread count, the better of the two (a measurement taken while
    other processes ran is too low, never too high).
    """
    path = _record_path() if use_cache else None
    known = _read(path) if path is not None else None
    wanted = sorted({1, threads})
    if known is not None and not fresh and all(t in known.best for t in wanted):
        return known
    _, cpu, _ = host.host_cpu()
    kernel = FmaKernel()
    best = dict(known.best) if known is not None else {}
    for t in wanted:
        if fresh or t not in best:
            best[t] = max([best.get(t, 0.0), *measure(t, seconds, repeats, kernel)])
    peak = Peak(cpu, kernel.width, best)
    if path is not None:
        write_private(path, _encode(peak))
    return peak


def _record_path() -> Path | None:
    key = host.fingerprint(host._cpuinfo())
    return cache_dir() / "peak" / f"{key}.json" if key else None


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _encode(peak: Peak) -> bytes:
    body = {"record": RECORD, "cpu": peak.cpu, "width": peak.width,
            "best": {str(t): g for t, g in sorted(peak.best.items())}}
    return json.dumps(body | {"sha256": _digest(body)}).encode()


def _read(path: Path) -> Peak | None:
    """The record at `path` if this user wrote it (``cachedir.read_private``) and it is whole and sane, else None."""
    data = read_private(path)
    if data is None:
        return None
    try:
        record = json.loads(data)
        body = {k: record[k] for k in ("record", "cpu", "width", "best")}
        best = {int(t): float(g) for t, g in body["best"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # damaged: measure again and write it anew
    if (record.get("sha256") != _digest(body) or body["record"] != RECORD or not isinstance(body["cpu"], str)
            or body["width"] not in (4, 8, 16) or not best
            or not all(0 < t <= 4096 and math.isfinite(g) and 0 < g < MAX_GFLOPS for t, g in best.items())):
        return None
    return Peak(body["cpu"], body["width"], best)


__all__ = ["CHAINS", "FmaKernel", "Peak", "fma_peak", "kernel_ir", "measure", "vector_width"]
