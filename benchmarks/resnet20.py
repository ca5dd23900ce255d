"""ResNet-20 (examples/resnet20.cnn) in cnnc and in PyTorch: training step at batch 128, inference at batch 1 and 256.

``python benchmarks/resnet20.py [--threads 2] [--torch-threads N] [--repeats 5]``.
Samples alternate between cnnc and PyTorch; each row gives the median wall
time and the median CPU time of the process (``time.process_time``, all
threads), since on a shared machine the wall time also measures the
neighbours. Also: the CPU time of the batchnorm reductions between a cnnc
training step's phases.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from torch_nets import torch_resnet20  # (benchmarks/: this script's folder)

REPO = Path(__file__).resolve().parent.parent


def sample(fn, inner: int) -> tuple[float, float]:
    """(wall, cpu) seconds per call of `fn`, over `inner` calls."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - w) / inner, (time.process_time() - c) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="PyTorch's intra-op threads (default: --threads); on a busy machine its OpenMP threads "
                         "spin-wait for each other, and 1 can be the fairer comparison")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ["CNNC_THREADS"] = str(args.threads)
    import torch

    import cnnc

    torch.set_num_threads(args.torch_threads or args.threads)
    model = cnnc.compile(REPO / "examples" / "resnet20.cnn")
    net = torch_resnet20(torch)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 256)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def torch_train() -> None:
        net.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(tx[:128]), ty[:128]).backward()
        opt.step()

    def torch_infer(n: int):
        def run() -> None:
            net.eval()
            with torch.no_grad():
                net(tx[:n])
        return run

    rows = [("train b128 (images/s)", lambda: model.value_and_grad(x[:128], y[:128]), torch_train, 2, 128),
            ("infer b1 (ms)", lambda: model(x[:1]), torch_infer(1), 50, 1),
            ("infer b256 (images/s)", lambda: model(x), torch_infer(256), 2, 256)]
    print(f"ResNet-20, cnnc {args.threads} threads, PyTorch {args.torch_threads or args.threads}, median of "
          f"{args.repeats} alternating samples (wall | CPU)")
    for name, ours, theirs, inner, n in rows:
        ours(), theirs()  # warm-up
        got: dict[str, list] = {"cnnc": [], "torch": []}
        for _ in range(args.repeats):
            got["cnnc"].append(sample(ours, inner))
            got["torch"].append(sample(theirs, inner))
        for side, samples in got.items():
            wall = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples)
            if "ms" in name:
                print(f"  {name:24} {side:6} {wall * 1e3:8.3f} ms   | CPU {cpu * 1e3:8.3f} ms")
            else:
                print(f"  {name:24} {side:6} {n / wall:8.1f} img/s | {n / cpu:8.1f} img per CPU-s")

if __name__ == "__main__":
    main()
