"""The input gradient of a small convolution with images in the vector lanes.

    dx[ci, iy, ix] = sum over the o that read ci, ky, kx of w[o, ci, ky, kx] * dy[o, iy - ky, ix - kx]

with ``0 <= iy - ky < oh`` and ``0 <= ix - kx < ow`` (an unpadded stride-1
convolution). As rows of dx (``conv_rows``) LeNet-5's C3 puts its 14 columns
in a vector of 16 and steps over every (dx row, dy row) pair for each of the
``kw`` taps: 15,000 vector multiply-adds an image for 9,375 useful. Here a
vector holds one value of ``vw`` images (as ``conv_lanes`` for the weight
gradient): dy is transposed to ``dyT[o, oy, ox, lane]``, and a dx row of one
input channel is ``w`` accumulators (in pieces of columns where the registers
are fewer). For each output channel that reads the channel and each dy row
that reaches the dx row (a run-time range), the row's ``kw`` weights are
broadcast once and each dy value, loaded once, is multiplied into the ``kw``
accumulators it reaches: only the multiply-adds that exist, each lane one
image. The rows go to ``dxT[ci, iy, ix, lane]`` and are transposed back into
dx. A last group of fewer than ``vw`` images is copied one float at a time.

The pairs are a constant table (each input channel's run of output channels:
where each reads dy and the weights), run by a loop, so the code holds one
row body per column piece however large the table.

Workspace (floats): ``[dyT: o x oh x ow x vw][dxT: c x h x w x vw][dx staging when dx accumulates: vw x c x h x w]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.conv_direct import zero
from cnnc.codegen.conv_lanes import MAX_FLOATS, fits
from cnnc.codegen.emit import for_range, i64
from cnnc.codegen.gemm import index, local, transpose, vector_loop
from cnnc.codegen.plan import aligned
from cnnc.codegen.specs import ConvSpec

GAIN = 0.8  # used only where it needs at most this share of the vector multiply-adds of conv_rows


@dataclass(frozen=True)
class Space:
    """The workspace of the input gradient of `spec` with `vw` images in the lanes."""

    spec: ConvSpec
    vw: int

    @property
    def dy_floats(self) -> int:
        s = self.spec
        return aligned(s.o * s.oh * s.ow * self.vw)

    @property
    def dx_floats(self) -> int:
        s = self.spec
        return aligned(s.c * s.h * s.w * self.vw)

    @property
    def floats(self) -> int:
        return self.dy_floats + self.dx_floats * (2 if self.spec.accumulate else 1)

    def sections(self, b: ir.IRBuilder, ws: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(dyT, dxT, staging) in `ws`."""
        return (ws, emit.gep(b, ws, self.dy_floats, name="dxt"),
                emit.gep(b, ws, self.dy_floats + self.dx_floats, name="dx.stage"))


def pieces(width: int, kw: int, vw: int) -> list[tuple[int, int]]:
    """Columns [a0, a1) of a row of `width` a pass each: accumulators, the kw broadcast weights and a loaded value
    fit the registers."""
    most = max(1, (32 if vw >= 16 else 16) - kw - 2)
    count = -(-width // most)
    size = -(-width // count)
    return [(a0, min(width, a0 + size)) for a0 in range(0, width, size)]


def vector_fmas(spec: ConvSpec, pairs: int, vw: int) -> float:
    """Vector multiply-adds per image for `pairs` (o, c) pairs: every lane useful."""
    return pairs * spec.kh * spec.kw * spec.oh * spec.ow / vw


def applies(spec: ConvSpec, vw: int, pairs: int, theirs: float) -> bool:
    """Whether dx runs with images in the lanes: the form fits (conv_lanes.fits: unpadded, stride 1, a workspace
    in the cache) and needs at most GAIN of `theirs` vector multiply-adds an image (conv_rows')."""
    return (fits(spec, vw) and Space(spec, vw).floats <= MAX_FLOATS
            and vector_fmas(spec, pairs, vw) <= GAIN * theirs)


def pair_table(module: ir.Module, name: str, groups: list[list[tuple[int, int]]]) -> tuple[ir.Value, ir.Value]:
    """Two constant i64 arrays: where each group's entries start (and the end), and the entries, two numbers each
    (here: for an input channel, where an output channel's dyT and its weights w[o, ci] start)."""
    starts, entries = [], []
    for group in groups:
        starts.append(len(entries))
        for first, second in group:
            entries += [first, second]
    starts.append(len(entries))

    def constant(suffix: str, values: list[int]) -> ir.Value:
        ty = ir.ArrayType(emit.I64, max(1, len(values)))
        table = ir.GlobalVariable(module, ty, name=f"{name}.{suffix}")
        table.global_constant = True
        table.linkage = "internal"
        table.initializer = ir.Constant(ty, values or [0])
        return table

    return constant("starts", starts), constant("pairs", entries)


def at(b: ir.IRBuilder, table: ir.Value, i: ir.Value) -> ir.Value:
    """Entry `i` of a constant i64 array."""
    return b.load(b.gep(table, [i64(0), i], inbounds=True), typ=emit.I64)


def row_fmas(b: ir.IRBuilder, accs: list[ir.Value], a0: int, a1: int, row: ir.Value, length: int, taps: ir.Value,
             kw: int, vw: int, reach: int) -> None:
    """accs[j - a0] += taps[kx] * row[i] (vectors of lanes) for each i < `length` and kx with j = i + reach * kx in
    [a0, a1): the kw taps broadcast once, each row value loaded once (`reach`: +1 for an input gradient, -1 for a
    forward)."""
    weights = [emit.broadcast(b, taps, kx, vw) for kx in range(kw)]
    sums = [b.load(a) for a in accs]
    for i in range(length):
        reached = [kx for kx in range(kw) if a0 <= i + reach * kx < a1]
        if reached:
            value = emit.load(b, row, i * vw, vw)
            for kx in reached:
                j = i + reach * kx - a0
                sums[j] = emit.fma(b, weights[kx], value, sums[j])
    for a, v in zip(accs, sums):
        b.store(v, a)


def sweep(b: ir.IRBuilder, out: ir.Value, width: int, length: int, kw: int, vw: int, pairs: ir.Value,
          span: tuple[ir.Value, ir.Value], src: ir.Value, w: ir.Value, kys: tuple[ir.Value | int, ir.Value | int],
          row_of: Callable[[ir.Value, ir.Value], ir.Value], reach: int) -> None:
    """out[j] (j < `width`, a vector each) = the sums of ``row_fmas`` over the `pairs` entries in `span` (where the
    source plane starts in `src`, where its kernel starts in `w`) and the kernel rows ky in `kys`, whose source row
    of `length` values is ``row_of(plane, ky)``; in column pieces that fit the registers."""
    zero_v = emit.splat(b, 0.0, vw)
    for a0, a1 in pieces(width, kw, vw):
        accs = [local(b, emit.vec_type(vw), zero_v) for _ in range(a0, a1)]
        with for_range(b, span[0], span[1], 2, name="sp") as t:
            plane = emit.gep(b, src, at(b, pairs, t))
            w0 = emit.gep(b, w, at(b, pairs, b.add(t, i64(1))))
            with for_range(b, kys[0], kys[1], name="sk") as ky:
                row_fmas(b, accs, a0, a1, row_of(plane, ky), length, emit.gep(b, w0, index(b, (ky, kw))), kw, vw,
                         reach)
        for j in range(a0, a1):
            emit.store(b, b.load(accs[j - a0]), out, j * vw)


def fill(b: ir.IRBuilder, s: Space, ws: ir.Value, dy: ir.Value, n: ir.Value, count: ir.Value, y_stride: int) -> None:
    """dyT of images [n, n + count) (count <= vw): a whole group through registers, a smaller one a float at a
    time into zeroed lanes."""
    spec, vw = s.spec, s.vw
    dyt = s.sections(b, ws)[0]
    cols = spec.o * spec.oh * spec.ow
    dy0 = emit.gep(b, dy, index(b, (n, y_stride)), name="dy.group")
    with b.if_else(b.icmp_signed("==", count, i64(vw))) as (whole, partial):
        with whole:
            transpose(b, dy0, vw, cols, dyt, vw, src_rs=y_stride, dst_rs=vw)
        with partial:
            zero(b, dyt, 0, cols * vw, vw)
            with for_range(b, 0, count, name="di") as lane:
                with for_range(b, 0, cols, name="dj") as j:
                    emit.store(b, emit.load(b, dy0, index(b, (lane, y_stride), j)), dyt, index(b, (j, vw), lane))


def product(b: ir.IRBuilder, module: ir.Module, name: str, s: Space, ws: ir.Value, w: ir.Value,
            live: list[tuple[int, list[int]]]) -> None:
    """``dxT[ci, iy, ix] = sum of w[o, ci, ky, kx] * dyT[o, iy - ky, ix - kx]`` over the pairs in `live` (each
    input channel and the output channels that read it) and the taps that reach dy."""
    spec, vw = s.spec, s.vw
    dyt, dxt, _ = s.sections(b, ws)
    by_channel = dict(live)
    starts, pairs = pair_table(module, name, [[(o * spec.oh * spec.ow * vw, (o * spec.c + ci) * spec.kh * spec.kw)
                                               for o in by_channel.get(ci, [])] for ci in range(spec.c)])
    with for_range(b, 0, spec.c, name="dc") as ci:
        span = at(b, starts, ci), at(b, starts, b.add(ci, i64(1)))
        with for_range(b, 0, spec.h, name="dy") as iy:
            lo = b.select(b.icmp_signed(">", iy, i64(spec.oh - 1)), b.sub(iy, i64(spec.oh - 1)), i64(0), name="ky.lo")
            hi = b.select(b.icmp_signed("<", iy, i64(spec.kh - 1)), b.add(iy, i64(1)), i64(spec.kh), name="ky.hi")
            out = emit.gep(b, dxt, index(b, (ci, spec.h * spec.w * vw), (iy, spec.w * vw)))

            def row_of(plane: ir.Value, ky: ir.Value, iy=iy) -> ir.Value:
                return emit.gep(b, plane, index(b, (b.sub(iy, ky), spec.ow * vw)))

            sweep(b, out, spec.w, spec.ow, spec.kw, vw, pairs, span, dyt, w, (lo, hi), row_of, 1)


def store(b: ir.IRBuilder, s: Space, ws: ir.Value, dx: ir.Value, n: ir.Value, count: ir.Value,
          x_stride: int) -> None:
    """dx of images [n, n + count) (+)= dxT's lanes: a whole group transposed through registers (into the staging
    rows first when dx accumulates), a smaller one a float at a time."""
    spec, vw = s.spec, s.vw
    _, dxt, stage = s.sections(b, ws)
    cols = spec.c * spec.h * spec.w
    dx0 = emit.gep(b, dx, index(b, (n, x_stride)), name="dx.group")
    with b.if_else(b.icmp_signed("==", count, i64(vw))) as (whole, partial):
        with whole:
            if not spec.accumulate:
                transpose(b, dxt, cols, vw, dx0, vw, src_rs=vw, dst_rs=x_stride)
            else:
                transpose(b, dxt, cols, vw, stage, vw, src_rs=vw, dst_rs=cols)
                with for_range(b, 0, vw, name="da") as lane:
                    src, dst = index(b, (lane, cols)), index(b, (lane, x_stride))

                    def add(b: ir.IRBuilder, t: ir.Value, width: int, src=src, dst=dst) -> None:
                        at = index(b, dst, t)
                        value = b.fadd(emit.load(b, dx0, at, width), emit.load(b, stage, index(b, src, t), width))
                        emit.store(b, value, dx0, at)

                    vector_loop(b, 0, cols, vw, add, name="dv")
        with partial:
            with for_range(b, 0, count, name="ei") as lane:
                with for_range(b, 0, cols, name="ej") as j:
                    at = index(b, (lane, x_stride), j)
                    value = emit.load(b, dxt, index(b, (j, vw), lane))
                    if spec.accumulate:
                        value = b.fadd(emit.load(b, dx0, at), value)
                    emit.store(b, value, dx0, at)


def backward_data(b: ir.IRBuilder, module: ir.Module, name: str, spec: ConvSpec, args: dict, vw: int,
                  live: list[tuple[int, list[int]]], x_stride: int, y_stride: int) -> None:
    """dx[n] (+)= the input gradient of dy[n] for images [n0, n1), vw images at a time (the module docstring)."""
    s = Space(spec, vw)
    n0, n1 = args["n0"], args["n1"]
    with for_range(b, n0, n1, vw, name="dg") as n:
        left = b.sub(n1, n)
        count = b.select(b.icmp_signed("<", left, i64(vw)), left, i64(vw), name="group")
        fill(b, s, args["ws"], args["dy"], n, count, y_stride)
        product(b, module, name, s, args["ws"], args["w"], live)
        store(b, s, args["ws"], args["dx"], n, count, x_stride)
