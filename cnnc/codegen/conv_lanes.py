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
few output channels that read one input channel by one kernel row's ``kw``
taps (as ``conv_dot``), its loads of dy and x each feeding several FMAs; the
partial sums stay vectors (a vector per weight, laid out like dW) across the
groups and are reduced across lanes once per call. The tiles are rows of a
constant table (where each reads x, dy and its sums), run by one loop: a
table's pairs unrolled as tiles of their own took four times the compile time
(C3: ~240 ms). A last group of fewer than ``vw`` images is copied one
float at a time into zeroed lanes.

Only for unpadded stride-1 convolutions (no border to fill in the lanes).

Workspace (floats): ``[xT: c x h x w x vw][dyT: o x oh x ow x vw, then a row of zeros][sums: o x c x taps x vw,
then one weight's taps]``: a tile's rows past its channel's output channels read the zeros and add to the
spare sums.
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
        return aligned((s.o + 1) * s.oh * s.ow * self.vw)

    @property
    def sum_floats(self) -> int:
        s = self.spec
        return aligned((s.o * s.c + 1) * s.kh * s.kw * self.vw)

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
            zero(b, ws, 0, s.x_floats + spec.o * spec.oh * spec.ow * vw, vw)
            for src, dst, cols, stride in parts:
                with for_range(b, 0, count, name="li") as lane:
                    with for_range(b, 0, cols, name="lj") as j:
                        value = emit.load(b, src, index(b, (lane, stride), j))
                        emit.store(b, value, dst, index(b, (j, vw), lane))


def rows_per_tile(spec: ConvSpec, vw: int, live: list[tuple[int, list[int]]]) -> int:
    """Output channels per tile: rows x kw accumulators, a dy register per row and one for the x load fit the
    registers; of those, the fewest padded rows, then the most rows (C3: 5, each input channel's 10 in two)."""
    most = max(1, ((32 if vw >= 16 else 16) - 1) // (spec.kw + 1))
    padded = lambda mr: sum(-(-len(rows) // mr) * mr for _, rows in live)  # noqa: E731
    return min(range(1, most + 1), key=lambda mr: (padded(mr), -mr))


def tiles(spec: ConvSpec, vw: int, live: list[tuple[int, list[int]]]) -> list[tuple[int, list[int | None]]]:
    """Each input channel's output channels (`live`) in tiles of ``rows_per_tile``, the last filled with None."""
    mr = rows_per_tile(spec, vw, live)
    out = []
    for ci, rows in live:
        for first in range(0, len(rows), mr):
            chunk: list[int | None] = list(rows[first:first + mr])
            out.append((ci, chunk + [None] * (mr - len(chunk))))
    return out


def _tile_table(module: ir.Module, name: str, s: Space, live: list[tuple[int, list[int]]]) -> tuple[ir.Value, int]:
    """The tiles as a constant i64 array, a row each: x's offset, then each row's dy offset and sums offset."""
    spec, vw = s.spec, s.vw
    outputs, taps = spec.oh * spec.ow * vw, spec.kh * spec.kw * vw
    values = []
    for ci, rows in tiles(spec, vw, live):
        values.append(ci * spec.h * spec.w * vw)
        values += [spec.o * outputs if r is None else r * outputs for r in rows]
        values += [spec.o * spec.c * taps if r is None else (r * spec.c + ci) * taps for r in rows]
    ty = ir.ArrayType(emit.I64, len(values))
    table = ir.GlobalVariable(module, ty, name=f"{name}.tiles")
    table.global_constant = True
    table.linkage = "internal"
    table.initializer = ir.Constant(ty, values)
    return table, len(values)


def product(b: ir.IRBuilder, module: ir.Module, name: str, s: Space, ws: ir.Value,
            live: list[tuple[int, list[int]]]) -> None:
    """``sums[o, ci, ky, kx] += dyT[o, oy, ox] * xT[ci, oy + ky, ox + kx]`` over the outputs (vectors of images),
    for each input channel and the output channels that read it (`live`)."""
    spec, vw = s.spec, s.vw
    xt, dyt, sums = s.sections(b, ws)
    mr = rows_per_tile(spec, vw, live)
    table, size = _tile_table(module, name, s, live)
    zero_v = emit.splat(b, 0.0, vw)
    with for_range(b, 0, size, 1 + 2 * mr, name="lt") as t:
        def field(i: int) -> ir.Value:
            return b.load(b.gep(table, [emit.i64(0), b.add(t, emit.i64(i))], inbounds=True), typ=emit.I64)

        x0 = emit.gep(b, xt, field(0))
        dy0s = [emit.gep(b, dyt, field(1 + i)) for i in range(mr)]
        sum0s = [emit.gep(b, sums, field(1 + mr + i)) for i in range(mr)]
        with for_range(b, 0, spec.kh, name="ly") as ky:
            at = [emit.gep(b, base, index(b, (ky, spec.kw * vw))) for base in sum0s]
            accs = [[local(b, emit.vec_type(vw), zero_v) for _ in range(spec.kw)] for _ in range(mr)]
            for i in range(mr):
                for kx in range(spec.kw):
                    b.store(emit.load(b, at[i], kx * vw, vw), accs[i][kx])
            with for_range(b, 0, spec.oh, name="lo") as oy:
                xrow = emit.gep(b, x0, index(b, (b.add(oy, ky), spec.w * vw)))
                dyrow = index(b, (oy, spec.ow * vw))
                with for_range(b, 0, spec.ow, name="lx") as ox:
                    xj, j = emit.gep(b, xrow, index(b, (ox, vw))), index(b, dyrow, (ox, vw))
                    dys = [emit.load(b, d, j, vw) for d in dy0s]
                    values = [[b.load(a) for a in row] for row in accs]
                    for kx in range(spec.kw):
                        xv = emit.load(b, xj, kx * vw, vw)
                        for i, d in enumerate(dys):
                            values[i][kx] = emit.fma(b, d, xv, values[i][kx])
                    for row, vals in zip(accs, values):
                        for a, v in zip(row, vals):
                            b.store(v, a)
            for i in range(mr):
                for kx in range(spec.kw):
                    emit.store(b, b.load(accs[i][kx]), at[i], kx * vw)


def clear(b: ir.IRBuilder, s: Space, ws: ir.Value) -> None:
    """The sums and the row of zeros after dyT: zeroed once per call (xT and dyT are written whole by every
    group)."""
    spec, vw = s.spec, s.vw
    _, dyt, sums = s.sections(b, ws)
    outputs = spec.oh * spec.ow * vw
    zero(b, dyt, spec.o * outputs, (spec.o + 1) * outputs, vw)
    zero(b, sums, 0, s.sum_floats, vw)


def live_pairs(table: frozenset[tuple[int, int]] | None, c: int, o: int) -> list[tuple[int, list[int]]]:
    """``product``'s `live`: each input channel and the output channels that read it (all without a table)."""
    return [(ci, list(range(o))) for ci in range(c)] if table is None else channel_rows(table, c, 0, o)
