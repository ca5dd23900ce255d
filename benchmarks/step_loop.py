"""LeNet-5 training steps: native runs of steps against the per-step path, by CPU time, and the Python share.

    python benchmarks/step_loop.py [--steps 300] [--rounds 4] [--threads N]

Fits LeNet-5 (batch 64, Adam) on random uint8 28x28 images, alternating the
two ways ``fit`` runs steps (``model.native_runs``: runs of steps in one
native call per thread, or one native step per thread with Python between)
in the same process, so both see the same background load. Per step it
prints the process's CPU time (all threads), the wall time, and for the runs
the CPU time of the calling thread outside the native run calls: the
Python share of a step (issue 15 asks for under 5%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cnnc  # noqa: E402
from cnnc_runtime.inputs import Inputs  # noqa: E402
from cnnc_runtime.model import Model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    model = cnnc.compile(str(REPO / "examples" / "lenet5.cnn"))
    if args.threads is not None:
        model = Model(model.manifest, model.code, threads=args.threads)
    rng = np.random.default_rng(0)
    n = 64 * args.steps
    x = Inputs(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), model.input_shape)
    y = rng.integers(0, 10, n)
    settings = dict(epochs=1, batch=64, optimizer="adam", lr=1e-3, progress=False, validation=0.0)
    inside = [0.0]
    run_steps = model.run_steps

    def timed(*a) -> None:
        t = time.thread_time()
        run_steps(*a)
        inside[0] += time.thread_time() - t

    model.run_steps = timed
    print(f"LeNet-5, batch 64, Adam, {model.threads} thread(s), {args.steps} steps a sample; ms per step")
    for native in (True, False):  # warm-up: buffers, caches
        model.native_runs = native
        model.fit(x, y, **{**settings, "max_steps": 5})
    for _ in range(args.rounds):
        for native in (True, False):
            model.native_runs = native
            inside[0] = 0.0
            c, p, w = time.thread_time(), time.process_time(), time.perf_counter()
            model.fit(x, y, **settings)
            c, p, w = time.thread_time() - c, time.process_time() - p, time.perf_counter() - w
            per = 1e3 / args.steps
            line = f"{'runs    ' if native else 'per-step'} CPU {p * per:.3f}  wall {w * per:.3f}"
            if native:
                line += f"  Python (calling thread outside the runs) {(c - inside[0]) * per:.3f} = " \
                        f"{100 * (c - inside[0]) / p:.1f}% of the CPU time"
            print(line, flush=True)


if __name__ == "__main__":
    main()
