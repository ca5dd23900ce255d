"""ResNet-20's forward convolutions as inference runs them, against training's forward, one thread, CPU time.

``python benchmarks/resnet20_infer_kernels.py [--images 1] [--repeats 9]``.
For each layer shape: training's forward (Winograd F(2x2) with the weights
transformed on every call), inference's (``ConvSpec.cached``: the transformed
weights kept between calls, F(4x4) where ``conv_winograd4.applies`` or, with output channels in the lanes,
``conv_winograd4o.applies``), and
inference's share of one image on two threads (``infer_split``: half the tile
rows of a Winograd layer of more tiles than output channels, else half the output channels). A row gives the best
CPU time of `repeats` samples per image; the last line sums them weighted by
how often ResNet-20 runs each shape.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import time

import llvmlite.ir as ir
import numpy as np
from resnet20_kernels import LAYERS, conv  # (benchmarks/: this script's folder)

from cnnc.codegen.conv import conv_workspace_floats, emit_conv_forward, row_tile, weight_cache_floats
from cnnc.codegen.target import emit_object, host_target
from cnnc_runtime.native import NativeLibrary


def share(spec, vw: int):
    """Part 0 of `spec` in infer_split: half the tile rows of a Winograd layer of more tiles than output channels,
    else half the output channels."""
    tile = row_tile(spec, vw)
    if tile and spec.oh // tile >= 2 and (spec.oh // tile) * (spec.ow // tile) > spec.o:
        return dataclasses.replace(spec, rows=(0, spec.oh // tile // 2 * tile))
    return dataclasses.replace(spec, o=spec.o // 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1, help="images a call (1: latency; 16: a run of a batch)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    target = host_target()
    vw = target.vector_width
    kinds = ("training", "inference", "share of 2")
    specs = {}
    for name, shape in LAYERS.items():
        base = conv(*shape[:5], True)
        cached = dataclasses.replace(base, cached=True)
        specs[name] = (base, cached, share(cached, vw))
    module = ir.Module(name="resnet20_infer_kernels")
    for i, row in enumerate(specs.values()):
        for j, spec in enumerate(row):
            emit_conv_forward(module, f"k{i}_{j}", spec, vw)
    lib = NativeLibrary(emit_object(module, target), target.triple, target.cpu, target.features)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    rng = np.random.default_rng(0)
    n, total = args.images, dict.fromkeys(kinds, 0.0)
    print(f"{n} image(s) a call, 1 thread, best of {args.repeats}: us of CPU per image")
    print(f"{'layer':16}" + "".join(f"{kind:>14}" for kind in kinds))
    for i, (name, row) in enumerate(specs.items()):
        cells = []
        for j, spec in enumerate(row):
            x = rng.standard_normal(n * spec.x_stride).astype(np.float32)
            w = rng.standard_normal(spec.o * spec.c * spec.kh * spec.kw).astype(np.float32)
            y, ws = np.zeros(n * spec.y_stride, np.float32), np.zeros(conv_workspace_floats(spec, vw), np.float32)
            cache = np.zeros(max(16, weight_cache_floats(spec, vw)), np.float32)
            ptrs = [x, w, None, y, ws] + ([cache] if spec.cached else [])
            fn = lib.function(f"k{i}_{j}", [p] * len(ptrs) + [i64, i64])
            values = [a.ctypes.data if a is not None else None for a in ptrs]
            calls = max(1, 64 // n)
            best = float("inf")
            for _ in range(args.repeats):
                c = time.process_time()
                for _ in range(calls):
                    fn(*values, 0, n)
                best = min(best, (time.process_time() - c) / calls / n)
            cells.append(f"{best * 1e6:14.1f}")
            total[kinds[j]] += best * LAYERS[name][5]
        print(f"{name:16}" + "".join(cells))
    print(f"{'ResNet-20':16}" + "".join(f"{total[kind] * 1e6:14.1f}" for kind in kinds))


if __name__ == "__main__":
    main()
