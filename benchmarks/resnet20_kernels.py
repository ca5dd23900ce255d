"""ResNet-20's convolution kernels one at a time: forward, input gradient, weight gradient, CPU time on one thread.

``python benchmarks/resnet20_kernels.py [--images 32] [--repeats 9] [--no-winograd]``.
Each kernel is compiled for this CPU as the training step would (no bias: a
batchnorm follows every convolution) and run on a shard of images; a row gives
the best CPU time of `repeats` calls (``time.process_time``, so that other
processes on a shared machine count less) and the GFLOP/s that time means for
the direct convolution's 2 * multiply-adds (Winograd's do fewer, so it can
pass the FMA peak, ``benchmarks/fma_peak.py``). The last line weighs each
kernel by how often one training step runs it, per image.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable

import llvmlite.ir as ir
import numpy as np

from cnnc.codegen.conv import (
    conv_workspace_floats,
    emit_conv_backward_data,
    emit_conv_backward_weights,
    emit_conv_forward,
)
from cnnc.codegen.specs import ConvSpec
from cnnc.codegen.target import emit_object, host_target
from cnnc_runtime.native import NativeLibrary


def conv(c: int, hw: int, o: int, k: int, stride: int, winograd: bool) -> ConvSpec:
    """A square `k` x `k` convolution with ResNet's padding (k // 2), no bias."""
    pad = k // 2
    out = (hw + 2 * pad - k) // stride + 1
    return ConvSpec(c=c, h=hw, w=hw, o=o, oh=out, ow=out, kh=k, kw=k, sh=stride, sw=stride, pt=pad, pl=pad,
                    bias=False, x_stride=c * hw * hw, y_stride=o * out * out, winograd=winograd)


# name: (c, map, o, kernel, stride, convolutions of this shape in the network)
LAYERS = {
    "stem 3->16 @32": (3, 32, 16, 3, 1, 1),
    "16->16 @32": (16, 32, 16, 3, 1, 6),
    "16->32 @32 /2": (16, 32, 32, 3, 2, 1),
    "1x1 16->32 /2": (16, 32, 32, 1, 2, 1),
    "32->32 @16": (32, 16, 32, 3, 1, 5),
    "32->64 @16 /2": (32, 16, 64, 3, 2, 1),
    "1x1 32->64 /2": (32, 16, 64, 1, 2, 1),
    "64->64 @8": (64, 8, 64, 3, 1, 5),
}
KINDS = {"forward": emit_conv_forward, "input grad": emit_conv_backward_data, "weight grad": emit_conv_backward_weights}


def best(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        c = time.process_time()
        fn()
        times.append(time.process_time() - c)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images a call (a training shard: 32)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-winograd", action="store_true", help="direct convolutions only")
    args = ap.parse_args()
    target = host_target()
    vw = target.vector_width
    specs = {name: conv(*shape[:5], not args.no_winograd) for name, shape in LAYERS.items()}
    module = ir.Module(name="resnet20_kernels")
    for i, spec in enumerate(specs.values()):
        for j, emitter in enumerate(KINDS.values()):
            emitter(module, f"k{i}_{j}", spec, vw)
    lib = NativeLibrary(emit_object(module, target), target.triple, target.cpu, target.features)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    rng = np.random.default_rng(0)
    n = args.images
    print(f"{n} images a call, 1 thread, best of {args.repeats}: ms | GFLOP/s of the direct convolution")
    print(f"{'layer':16}" + "".join(f"{kind:>22}" for kind in KINDS))
    step = 0.0
    for i, (name, s) in enumerate(specs.items()):
        x, dy = (rng.standard_normal(n * size).astype(np.float32) for size in (s.x_stride, s.y_stride))
        w = rng.standard_normal(s.o * s.c * s.kh * s.kw).astype(np.float32)
        y, dx, dw = np.zeros_like(dy), np.zeros_like(x), np.zeros_like(w)
        ws = np.zeros(conv_workspace_floats(s, vw), np.float32)
        at = [a.ctypes.data for a in (x, w, y, ws, dy, dx, dw)]
        calls = [(lib.function(f"k{i}_0", [p] * 5 + [i64, i64]), (at[0], at[1], None, at[2], at[3])),
                 (lib.function(f"k{i}_1", [p] * 4 + [i64, i64]), (at[4], at[1], at[5], at[3])),
                 (lib.function(f"k{i}_2", [p] * 5 + [i64, i64]), (at[0], at[4], at[6], None, at[3]))]
        flops = 2 * n * s.o * s.c * s.kh * s.kw * s.oh * s.ow
        row = []
        for j, (fn, ptrs) in enumerate(calls):
            t = best(lambda fn=fn, ptrs=ptrs: fn(*ptrs, 0, n), args.repeats)
            row.append(f"{t * 1e3:9.2f} | {flops / t / 1e9:6.1f}    ")
            if j or name != "stem 3->16 @32":  # the network input needs no gradient
                step += t * LAYERS[name][5]
        print(f"{name:16}" + "".join(row))
    print(f"all convolutions of a training step: {step / n * 1e3:.3f} ms CPU per image")


if __name__ == "__main__":
    main()
