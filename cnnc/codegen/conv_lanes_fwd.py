"""The forward of a small convolution with images in the vector lanes.

    y[o, oy, ox] = act(b[o] + sum over the ci that o reads, ky, kx of w[o, ci, ky, kx] * x[ci, oy + ky, ox + kx])

On ``kw`` shifted copies (``conv_direct.product_shifted``) LeNet-5's C3 puts
its 100 outputs a channel in 7 vectors of 16 (112 lanes) and, with its
connect table, steps one tap at a time: 10,500 vector multiply-adds an image,
a loop iteration for every 21. Here a vector holds one value of ``vw``
images (as ``conv_lanes_data`` for the input gradient, whose row routine it
shares): x is transposed to ``xT[ci, y, x, lane]``; an output row of one
channel is ``ow`` accumulators, and for each input channel it reads and each
kernel row, the ``kw`` weights are broadcast once and each x value, loaded
once, is multiplied into the accumulators it reaches: 9,375 multiply-adds an
image, every lane useful. The sums go to ``yT``, the bias and activation run
in one pass over it (one copy of the activation's code), and yT is transposed
into y. Only whole groups run here: the images past the last whole group go
through the caller's per-image form (a batch of 1 is not 16 times the work).

Workspace (floats): ``[xT: c x h x w x vw][yT: o x oh x ow x vw]``.
"""

from __future__ import annotations

from collections.abc import Callable

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.conv_lanes import MAX_FLOATS, Space, fits
from cnnc.codegen.conv_lanes_data import at, pair_table, sweep
from cnnc.codegen.emit import for_range, i64
from cnnc.codegen.gemm import index, transpose, vector_loop
from cnnc.codegen.plan import aligned
from cnnc.codegen.specs import ConvSpec

GAIN = 0.9  # used only where it needs at most this share of product_shifted's vector multiply-adds (C3: 0.89)

Finish = Callable[[ir.IRBuilder, ir.Value, ir.Value, int], ir.Value]  # (b, output channel, sums, width) -> y


def floats(spec: ConvSpec, vw: int) -> int:
    """The workspace: xT as the weight gradient's (``conv_lanes.Space``), then yT."""
    return Space(spec, vw).x_floats + aligned(spec.o * spec.oh * spec.ow * vw)


def applies(spec: ConvSpec, vw: int, pairs: int, theirs: float) -> bool:
    """Whether whole groups of images run in the lanes: the form fits (unpadded, stride 1, the workspace in the
    cache), whole output rows (not a share of them) and at most GAIN of `theirs` vector multiply-adds an image."""
    mine = pairs * spec.kh * spec.kw * spec.oh * spec.ow / vw
    return (fits(spec, vw) and spec.rows is None and floats(spec, vw) <= MAX_FLOATS
            and mine <= GAIN * theirs)


def group(b: ir.IRBuilder, module: ir.Module, name: str, spec: ConvSpec, args: dict, n: ir.Value, vw: int,
          live: list[tuple[int, list[int]]], finish: Finish, x_stride: int, y_stride: int) -> None:
    """y of the vw images from `n` (see the module docstring); `live`: each output channel and the input channels
    it reads; `finish`: bias and activation of one output channel's vector of sums."""
    ws = args["ws"]
    xt, yt = ws, emit.gep(b, ws, Space(spec, vw).x_floats, name="yt")
    transpose(b, emit.gep(b, args["x"], index(b, (n, x_stride))), vw, spec.c * spec.h * spec.w, xt, vw,
              src_rs=x_stride, dst_rs=vw)
    by_output = dict(live)
    starts, pairs = pair_table(module, name, [[(ci * spec.h * spec.w * vw, (o * spec.c + ci) * spec.kh * spec.kw)
                                               for ci in by_output.get(o, [])] for o in range(spec.o)])
    with for_range(b, 0, spec.o, name="fo") as o:
        span = at(b, starts, o), at(b, starts, b.add(o, i64(1)))
        with for_range(b, 0, spec.oh, name="fy") as oy:
            out = emit.gep(b, yt, index(b, (o, spec.oh * spec.ow * vw), (oy, spec.ow * vw)))

            def row_of(plane: ir.Value, ky: ir.Value, oy=oy) -> ir.Value:
                return emit.gep(b, plane, index(b, (b.add(oy, ky), spec.w * vw)))

            sweep(b, out, spec.ow, spec.w, spec.kw, vw, pairs, span, xt, args["w"], (0, spec.kh), row_of, -1)
        plane = emit.gep(b, yt, index(b, (o, spec.oh * spec.ow * vw)))

        def apply(b: ir.IRBuilder, t: ir.Value, width: int, o=o, plane=plane) -> None:
            emit.store(b, finish(b, o, emit.load(b, plane, t, width), width), plane, t)

        vector_loop(b, 0, spec.oh * spec.ow * vw, vw, apply, name="fa")
    transpose(b, yt, spec.o * spec.oh * spec.ow, vw, emit.gep(b, args["y"], index(b, (n, y_stride))), vw,
              src_rs=vw, dst_rs=y_stride)
