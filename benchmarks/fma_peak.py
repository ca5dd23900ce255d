"""Measured single-precision FMA peak of this machine: ``python benchmarks/fma_peak.py``.

The kernel and the measurement are ``cnnc_runtime.peak`` (what ``cnnc profile``
divides by, cached per CPU); this script measures afresh and prints the
median, min and max of the samples on 1 thread and on 2.
"""

from __future__ import annotations

import os

from cnnc_runtime.peak import FmaKernel, measure


def main() -> None:
    k = FmaKernel()
    print(f"<{k.width} x float> x {k.chains} chains, {os.cpu_count()} CPUs")
    for n in (1, 2):
        s = sorted(measure(n, kernel=k))
        print(f"{n} thread(s): median {s[len(s) // 2]:.1f} GFLOP/s (min {s[0]:.1f}, max {s[-1]:.1f})")


if __name__ == "__main__":
    main()
