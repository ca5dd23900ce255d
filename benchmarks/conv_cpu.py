"""The `conv` rows' direct forward (``winograd=False``) by CPU time, against the FMA kernel's, on a loaded machine.

``python benchmarks/conv_cpu.py [--rounds 20] [--calls 4]`` (threads: ``CNNC_THREADS``).
``benchmarks/run.py --only conv`` divides wall-clock GFLOP/s by the best FMA
sample, which other processes on the cores depress. Here both sides are
FLOPs per second of process CPU time (``time.process_time``: all threads),
the forward's blocks of `calls` alternating with blocks of the FMA loop, so
that a change of load hits both alike: their ratio is the forward's share of
the peak a core gives it while it runs (the pool's waits count against it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from statistics import median

import numpy as np
from run import CONV_C, CONV_HW, CONV_MACS, CONV_N, CONV_ONE

import cnnc
from cnnc_runtime.peak import FmaKernel


def cpu_rate(fn: Callable[[], object], flop: float) -> float:
    """GFLOP per CPU-second of one call of fn."""
    t0 = time.process_time()
    fn()
    return flop / (time.process_time() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=4, help="forward calls per sample")
    args = ap.parse_args()
    model = cnnc.compile_string(CONV_ONE, name="conv_one_direct", winograd=False)
    x = np.random.default_rng(0).standard_normal((CONV_N, CONV_C, CONV_HW, CONV_HW), dtype=np.float32)
    out = np.empty_like(x)
    fma = FmaKernel()
    iters = 20_000_000  # ~0.07 s of FMAs on one core: about a block of forward calls' CPU time

    def forward() -> None:
        for _ in range(args.calls):
            model.infer_into(x, out)

    forward(), fma.run(iters)  # warm-up
    conv_s, fma_s = [], []
    for _ in range(args.rounds):
        conv_s.append(cpu_rate(forward, 2 * CONV_MACS * args.calls))
        fma_s.append(cpu_rate(lambda: fma.run(iters), fma.flops(iters)))
    share = sorted(100 * c / f for c, f in zip(conv_s, fma_s))
    print(f"{model.threads} thread(s), {args.rounds} rounds: direct forward {median(conv_s):.1f} GFLOP per CPU-s, "
          f"FMA loop (1 thread) {median(fma_s):.1f}; forward/FMA median {median(share):.1f}% "
          f"(min {share[0]:.1f}%, max {share[-1]:.1f}%)")


if __name__ == "__main__":
    main()
