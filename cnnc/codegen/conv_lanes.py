"""The weight gradient of a small convolution with images in the vector lanes.

    dW[o, ci, ky, kx] = sum over images n and outputs (oy, ox) of dy[n, o, oy, ox] * x[n, ci, oy + ky, ox + kx]

Vectorised over output channels (``conv_direct.weight_product``) a connect
table wastes the lanes of the pairs outside it: LeNet-5's C3 reads 60 of its
16 x 6 (output, input) pairs, so 37.5% of those multiply-adds are thrown
away; over positions (``conv_dot``) its 10 x 10 outputs fill 7 vectors of 16
with 100 of 112 lanes and pay a copy per tap column. Here a vector holds one
value of ``vw`` images: a group of images is transposed (``gemm.transpose``)
to ``xT[ci, y, x, lane]`` and ``dyT[o, oy, ox, lane]``, and every multiply-add
of a pair in the table has every lane useful, at every position. A tile is a
few output channels by one kernel row's ``kw`` taps (as ``conv_dot``), its
loads of dy and x each feeding several FMAs; the partial sums stay vectors (a
vector per weight, laid out like dW) across the groups and are reduced across
lanes once per call. A last group of fewer than ``vw`` images is copied one
float at a time into zeroed lanes.

Only for unpadded stride-1 convolutions (no border to fill in the lanes).

Workspace (floats): ``[xT: c x h x w x vw][dyT: o x oh x ow x vw][sums: o x c x taps x vw]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.conv_direct import channel_rows, zero
from cnnc.codegen.emit import for_range
from cnnc.codegen.gemm import index, local, transpose
from cnnc.codegen.plan import aligned
from cnnc.codegen.specs import ConvSpec

MAX_FLOATS = 131072  # the workspace (LeNet's C3 at 16 lanes: 82,816), which stays in the L2 cache
GAIN = 0.8  # used only where it needs at most this share of the vector multiply-adds of the form it replaces


@dataclass(frozen=True)
class Space:
    """The workspace of the weight gradient of `spec` with `vw` images in the lanes."""

    spec: ConvSpec
    vw: int

    @property
    def x_floats(self) -> int:
        s = self.spec
        return aligned(s.c * s.h * s.w * self.vw)

    @property
    def dy_floats(self) -> int:
        s = self.spec
        return aligned(s.o * s.oh * s.ow * self.vw)

    @property
    def sum_floats(self) -> int:
        s = self.spec
        return aligned(s.o * s.c * s.kh * s.kw * self.vw)

    @property
    def floats(self) -> int:
        return self.x_floats + self.dy_floats + self.sum_floats

    def sections(self, b: ir.IRBuilder, ws: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(xT, dyT, sums) in `ws`."""
        return (ws, emit.gep(b, ws, self.x_floats, name="dyt"),
                emit.gep(b, ws, self.x_floats + self.dy_floats, name="sums"))


def vector_fmas(spec: ConvSpec, pairs: int, vw: int) -> float:
    """Vector multiply-adds per image for `pairs` (o, c) pairs: every lane useful."""
    return pairs * spec.kh * spec.kw * spec.oh * spec.ow / vw


def fits(spec: ConvSpec, vw: int) -> bool:
    """Whether the form applies to `spec` at all: stride 1, no padding, one group, no dilation, a workspace that
    stays in the cache."""
    s = spec
    return ((s.sh, s.sw, s.groups, s.dh, s.dw, s.pt, s.pl) == (1, 1, 1, 1, 1, 0, 0)
            and (s.oh, s.ow) == (s.h - s.kh + 1, s.w - s.kw + 1) and Space(spec, vw).floats <= MAX_FLOATS)


def fill(b: ir.IRBuilder, s: Space, ws: ir.Value, x: ir.Value, dy: ir.Value, n: ir.Value, count: ir.Value,
         x_stride: int, y_stride: int) -> None:
    """xT and dyT of images [n, n + count) (count <= vw): a whole group through registers, a last smaller one a
    float at a time into zeroed lanes."""
    spec, vw = s.spec, s.vw
    xt, dyt, _ = s.sections(b, ws)
    x0 = emit.gep(b, x, index(b, (n, x_stride)), name="x.group")
    dy0 = emit.gep(b, dy, index(b, (n, y_stride)), name="dy.group")
    parts = ((x0, xt, spec.c * spec.h * spec.w, x_stride), (dy0, dyt, spec.o * spec.oh * spec.ow, y_stride))
    with b.if_else(b.icmp_signed("==", count, emit.i64(vw))) as (whole, partial):
        with whole:
            for src, dst, cols, stride in parts:
                transpose(b, src, vw, cols, dst, vw, src_rs=stride, dst_rs=vw)
        with partial:
            zero(b, ws, 0, s.x_floats + s.dy_floats, vw)
            for src, dst, cols, stride in parts:
                with for_range(b, 0, count, name="li") as lane:
                    with for_range(b, 0, cols, name="lj") as j:
                        value = emit.load(b, src, index(b, (lane, stride), j))
                        emit.store(b, value, dst, index(b, (j, vw), lane))


def product(b: ir.IRBuilder, s: Space, ws: ir.Value, live: list[tuple[int, list[int]]] | None) -> None:
    """``sums[o, ci, ky, kx] += dyT[o, oy, ox] * xT[ci, oy + ky, ox + kx]`` over the outputs (vectors of images).

    `live`: each input channel and the output channels that read it (a connect table, unrolled), or None for
    all of them (a loop over input channels).
    """
    spec, vw = s.spec, s.vw
    xt, dyt, sums = s.sections(b, ws)
    taps = spec.kh * spec.kw
    regs = (32 if vw >= 16 else 16) - 4
    mr = max(1, regs // (spec.kw + 1))  # rows x kw accumulators, a dy register per row, one for the x load
    zero_v = emit.splat(b, 0.0, vw)
    plane, outputs = spec.h * spec.w, spec.oh * spec.ow

    def channel(ci: ir.Value | int, rows: list[int]) -> None:
        with for_range(b, 0, spec.kh, name="ly") as ky:
            for first in range(0, len(rows), mr):
                chunk = rows[first:first + mr]
                at = [index(b, (r * spec.c * taps, vw), (ci, taps * vw), (ky, spec.kw * vw)) for r in chunk]
                accs = [[local(b, emit.vec_type(vw), zero_v) for _ in range(spec.kw)] for _ in chunk]
                for i in range(len(chunk)):
                    for kx in range(spec.kw):
                        b.store(emit.load(b, sums, index(b, at[i], kx * vw), vw), accs[i][kx])
                with for_range(b, 0, spec.oh, name="lo") as oy:
                    xrow = emit.gep(b, xt, index(b, (ci, plane * vw), (b.add(oy, ky), spec.w * vw)))
                    dyrow = emit.gep(b, dyt, index(b, (oy, spec.ow * vw)))
                    with for_range(b, 0, spec.ow, name="lx") as ox:
                        xj, dj = emit.gep(b, xrow, index(b, (ox, vw))), emit.gep(b, dyrow, index(b, (ox, vw)))
                        dys = [emit.load(b, dj, r * outputs * vw, vw) for r in chunk]
                        values = [[b.load(a) for a in row] for row in accs]
                        for kx in range(spec.kw):
                            xv = emit.load(b, xj, kx * vw, vw)
                            for i, d in enumerate(dys):
                                values[i][kx] = emit.fma(b, d, xv, values[i][kx])
                        for row, vals in zip(accs, values):
                            for a, v in zip(row, vals):
                                b.store(v, a)
                for i in range(len(chunk)):
                    for kx in range(spec.kw):
                        emit.store(b, b.load(accs[i][kx]), sums, index(b, at[i], kx * vw))

    if live is None:
        with for_range(b, 0, spec.c, name="lc") as ci:
            channel(ci, list(range(spec.o)))
    else:
        for ci, rows in live:
            channel(ci, rows)


def clear(b: ir.IRBuilder, s: Space, ws: ir.Value) -> None:
    """The sums: zeroed once per call (xT and dyT are written whole by every group)."""
    _, _, sums = s.sections(b, ws)
    zero(b, sums, 0, s.sum_floats, s.vw)


def live_pairs(table: frozenset[tuple[int, int]] | None, c: int, o: int) -> list[tuple[int, list[int]]] | None:
    """``product``'s `live` for a connect table's (o, c) pairs (None without one)."""
    return None if table is None else channel_rows(table, c, 0, o)
