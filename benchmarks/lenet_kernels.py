"""LeNet-5's convolution and pooling kernels one at a time: CPU microseconds per call of 32 images, 1 thread.

    python benchmarks/lenet_kernels.py                      # this checkout's kernels for the host
    python benchmarks/lenet_kernels.py --save new.o         # also keep their object code
    python benchmarks/lenet_kernels.py --compare old.o new.o  # two saved builds, blocks alternated

The kernels are the training step's own (the specs ``cnnc.compile`` gives them for examples/lenet5.cnn: arena
strides, tanh fused); each block is ``--calls`` calls on the same 32 images, timed by the thread's CPU time, and
builds alternate block by block so that a change in the machine's speed hits both alike. `--compare` takes
object files saved by this script from two checkouts (run it once in each with ``--save``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import llvmlite.ir as ir
import numpy as np

from cnnc.codegen.conv import (
    conv_workspace_floats,
    emit_conv_backward_data,
    emit_conv_backward_weights,
    emit_conv_forward,
)
from cnnc.codegen.pool import emit_pool_backward, emit_pool_forward
from cnnc.codegen.specs import ConvSpec, PoolSpec
from cnnc.codegen.target import emit_object, host_target
from cnnc_runtime.native import NativeLibrary

IMAGES = 32
STRIDE = 16256  # floats per image of the training arena (what the compiled network's kernels get)
C3_TABLE = ((0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5), (0, 1, 2, 3), (1, 2, 3, 4),
            (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5), (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
            (0, 1, 2, 3, 4, 5))
C1 = ConvSpec(c=1, h=32, w=32, o=6, oh=28, ow=28, kh=5, kw=5, act="tanh", x_stride=1024, y_stride=STRIDE)
C3 = ConvSpec(c=6, h=14, w=14, o=16, oh=10, ow=10, kh=5, kw=5, connect=C3_TABLE, act="tanh", x_stride=STRIDE,
              y_stride=STRIDE)
S2 = PoolSpec(kind="avg", c=6, h=28, w=28, oh=14, ow=14, kh=2, kw=2, sh=2, sw=2, x_stride=STRIDE, y_stride=STRIDE)
S4 = PoolSpec(kind="avg", c=16, h=10, w=10, oh=5, ow=5, kh=2, kw=2, sh=2, sw=2, x_stride=STRIDE, y_stride=STRIDE)
S2B, S4B = (PoolSpec(**{**s.__dict__, "act": "tanh"}) for s in (S2, S4))

# name -> (emitter, spec, argument kinds: x/y/w/b/ws buffers by role)
KERNELS = {
    "c1.forward": (emit_conv_forward, C1, "x1 w b y ws"),
    "s2.forward": (emit_pool_forward, S2, "x y"),
    "c3.forward": (emit_conv_forward, C3, "x w b y ws"),
    "s4.forward": (emit_pool_forward, S4, "x y"),
    "s4.backward": (emit_pool_backward, S4B, "x y dy dx"),
    "c3.weights": (emit_conv_backward_weights, C3, "x dy dw db ws"),
    "c3.data": (emit_conv_backward_data, C3, "dy w dx ws"),
    "s2.backward": (emit_pool_backward, S2B, "x y dy dx"),
    "c1.weights": (emit_conv_backward_weights, C1, "x1 dy dw db ws"),
}


def build() -> bytes:
    """This checkout's kernels for the host, as one object file."""
    target = host_target()
    module = ir.Module(name="lenet_kernels")
    for name, (emitter, spec, _) in KERNELS.items():
        emitter(module, name.replace(".", "_"), spec, target.vector_width)
    return emit_object(module, target)


def buffers(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ws = max(conv_workspace_floats(s, 16) for s in (C1, C3)) + 1024
    arena = lambda: rng.uniform(-1, 1, IMAGES * STRIDE).astype(np.float32)  # noqa: E731
    return {"x1": rng.uniform(-1, 1, IMAGES * 1024).astype(np.float32), "x": arena(), "y": arena(),
            "dy": arena(), "dx": arena(), "w": rng.uniform(-0.2, 0.2, 16 * 6 * 25).astype(np.float32),
            "b": np.zeros(16, np.float32), "dw": np.zeros(16 * 6 * 25, np.float32), "db": np.zeros(16, np.float32),
            "ws": np.zeros(ws, np.float32)}


def callers(obj: bytes, bufs: dict[str, np.ndarray]) -> tuple[NativeLibrary, dict]:
    import ctypes

    target = host_target()
    lib = NativeLibrary(obj, target.triple, target.cpu, target.features)
    calls = {}
    for name, (_, _, roles) in KERNELS.items():
        ptrs = [bufs[r].ctypes.data for r in roles.split()]
        fn = lib.function(name.replace(".", "_"), [ctypes.c_void_p] * len(ptrs) + [ctypes.c_int64] * 2)
        calls[name] = (fn, ptrs)
    return lib, calls


def block(call, calls: int) -> float:
    fn, ptrs = call
    start = time.thread_time()
    for _ in range(calls):
        fn(*ptrs, 0, IMAGES)
    return (time.thread_time() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", help="write this checkout's object code here")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two saved object files, alternated")
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--only", help="comma-separated kernel names")
    args = ap.parse_args()
    objs = [open(p, "rb").read() for p in args.compare] if args.compare else [build()]
    if args.save and not args.compare:
        with open(args.save, "wb") as f:
            f.write(objs[0])
    bufs = buffers(np.random.default_rng(0))
    libs = [callers(o, bufs) for o in objs]
    names = args.only.split(",") if args.only else list(KERNELS)
    heads = ["A", "B", "B/A"] if len(objs) == 2 else ["us"]
    print(f"CPU us per call of {IMAGES} images, median [min-max] of {args.blocks} blocks of {args.calls} calls")
    print(f"{'kernel':12s} " + "  ".join(f"{h:>22s}" for h in heads))
    for name in names:
        for _, calls in libs:
            block(calls[name], 5)
        samples = [[] for _ in libs]
        for _ in range(args.blocks):
            for i, (_, calls) in enumerate(libs):
                samples[i].append(block(calls[name], args.calls))
        cols = [f"{statistics.median(s):8.1f} [{min(s):5.1f}-{max(s):5.1f}]" for s in samples]
        if len(samples) == 2:
            cols.append(f"{statistics.median(samples[1]) / statistics.median(samples[0]):22.3f}")
        print(f"{name:12s} " + "  ".join(f"{c:>22s}" for c in cols))


if __name__ == "__main__":
    main()
