"""The input gradient of a small convolution as whole rows of dx, skipping the zero padding of dy.

``conv_direct`` computes dx as a valid convolution of dy padded by ``kh - 1``
rows and ``kw - 1`` columns on each side. On a small map that padding is
most of the plane: LeNet-5's C3 (10x10 outputs, 5x5 kernel) runs its 25 taps
over an 18x18 plane for a 14x14 dx, 2.6 times the multiply-adds that reach dx.
Here each dx row is a few vectors, and its sums run only over the dy rows
that exist:

    dx[ci, iy, ix] = sum over o, ky, kx of w[o, ci, ky, kx] * dy[o, iy + pt - ky, ix + pl - kx]

with ``ky`` from ``max(0, iy + pt - oh + 1)`` to ``min(kh, iy + pt + 1)`` (a
runtime range) and the columns read from dy rows copied into the workspace
with ``kw - 1`` zeros before them (``Rows.q`` floats apart, zero past ``ow``).
A tile is one dx row of every input channel: per dy row, output channel and
``kx``, one vector load of dy feeds an FMA for each input channel ``o`` reads
(a connect table leaves the others out), with the weight broadcast from ``w``
as it is stored. The sums go to a staging row and then to dx, whose rows
need not be whole vectors.

Workspace (floats): ``[dy rows: o x oh x q][staging: c x h x vectors * vw]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import conv_direct, emit
from cnnc.codegen.emit import for_range, i64
from cnnc.codegen.gemm import index, local, vector_loop
from cnnc.codegen.plan import aligned
from cnnc.codegen.specs import ConvSpec

MAX_UNROLLED = 1536  # FMAs in the loop body (pairs x kw x vectors): more costs compile time and the i-cache
GAIN = 0.8  # used only where it needs at most this share of conv_direct's multiply-adds


@dataclass(frozen=True)
class Rows:
    """The input-gradient form of ``spec`` on vectors of `vw`."""

    spec: ConvSpec
    vw: int

    @property
    def vectors(self) -> int:
        """Vectors per dx row."""
        return -(-self.spec.w // self.vw)

    @property
    def q(self) -> int:
        """Floats between two dy rows in the workspace: the reads of every tap of every dx column fit."""
        s = self.spec
        return self.vectors * self.vw + s.pl + s.kw - 1

    @property
    def dy_floats(self) -> int:
        return aligned(self.spec.o * self.spec.oh * self.q)

    @property
    def floats(self) -> int:
        s = self.spec
        return self.dy_floats + aligned(s.c * s.h * self.vectors * self.vw)

    def pairs(self) -> list[tuple[int, list[int]]]:
        """Each output channel and the input channels it reads (all of them without a table)."""
        s = self.spec
        rows = s.connect if s.connect is not None else [range(s.c)] * s.o
        return [(o, sorted(set(row))) for o, row in enumerate(rows) if row]

    def valid_rows(self) -> int:
        """sum over dx rows of the dy rows it reads: how many row steps the kernel takes per image."""
        s = self.spec
        return sum(min(s.kh, iy + s.pt + 1) - max(0, iy + s.pt - s.oh + 1) for iy in range(s.h)
                   if min(s.kh, iy + s.pt + 1) > max(0, iy + s.pt - s.oh + 1))


def applies(spec: ConvSpec, direct_columns: int, vw: int) -> bool:
    """Whether dx runs in rows: few enough channels for one tile in registers and an unrolled body, and at most
    GAIN of the vector multiply-adds of conv_direct (`direct_columns` output columns of its padded plane)."""
    r = Rows(spec, vw)
    regs = (32 if vw >= 16 else 16) - 4  # accumulators; the rest hold dy and the broadcast weight
    pairs = sum(len(cs) for _, cs in r.pairs())
    if spec.c * r.vectors > regs or pairs * spec.kw * r.vectors > MAX_UNROLLED:
        return False
    mine = r.valid_rows() * spec.kw * pairs * r.vectors
    theirs = (direct_columns // vw) * spec.kh * spec.kw * pairs
    return mine <= GAIN * theirs


def backward_data(b: ir.IRBuilder, spec: ConvSpec, args: dict, vw: int, x_stride: int, y_stride: int) -> None:
    """dx[n] (+)= the input gradient of dy[n] for images [n0, n1) (see the module docstring)."""
    r = Rows(spec, vw)
    s = spec
    ws = args["ws"]
    dyp = ws
    stage = emit.gep(b, ws, r.dy_floats, name="stage")
    pitch = r.vectors * vw  # floats of one staged dx row
    conv_direct.zero(b, dyp, 0, r.dy_floats, vw)  # the columns around each dy row stay zero
    pairs = r.pairs()
    zero = emit.splat(b, 0.0, vw)
    with for_range(b, args["n0"], args["n1"], name="n") as n:
        dy_img = emit.gep(b, args["dy"], index(b, (n, y_stride)), name="dy.img")
        dx_img = emit.gep(b, args["dx"], index(b, (n, x_stride)), name="dx.img")
        with for_range(b, 0, s.o * s.oh, name="cr") as row:  # dy row (o, oy) into the workspace, kw - 1 in
            src = index(b, (row, s.ow))
            dst = index(b, (row, r.q), s.kw - 1)

            def copy(b: ir.IRBuilder, t: ir.Value, width: int, src=src, dst=dst) -> None:
                emit.store(b, emit.load(b, dy_img, index(b, src, t), width), dyp, index(b, dst, t))

            vector_loop(b, 0, s.ow, vw, copy, name="cx")
        with for_range(b, 0, s.h, name="iy") as iy:
            accs = {ci: [local(b, emit.vec_type(vw), zero) for _ in range(r.vectors)] for ci in range(s.c)}
            top = b.add(iy, i64(s.pt), name="top")  # dy row of ky = 0
            lo = b.select(b.icmp_signed(">", top, i64(s.oh - 1)), b.sub(top, i64(s.oh - 1)), i64(0), name="ky.lo")
            hi = b.select(b.icmp_signed("<", top, i64(s.kh - 1)), b.add(top, i64(1)), i64(s.kh), name="ky.hi")
            with for_range(b, lo, hi, name="ky") as ky:
                dy0 = emit.gep(b, dyp, index(b, (b.sub(top, ky), r.q), s.pl))  # dy row iy + pt - ky, column pl
                w0 = emit.gep(b, args["w"], index(b, (ky, s.kw)))
                sums = {ci: [b.load(a) for a in accs[ci]] for ci in accs}
                for o, channels in pairs:
                    for kx in range(s.kw):
                        at = o * s.oh * r.q + s.kw - 1 - kx  # column ix + pl - kx of dy, kw - 1 in
                        dys = [emit.load(b, dy0, at + v * vw, vw) for v in range(r.vectors)]
                        for ci in channels:
                            weight = emit.broadcast(b, w0, (o * s.c + ci) * s.kh * s.kw + kx, vw)
                            sums[ci] = [emit.fma(b, weight, d, acc) for d, acc in zip(dys, sums[ci])]
                for ci in accs:
                    for a, value in zip(accs[ci], sums[ci]):
                        b.store(value, a)
            for ci in range(s.c):
                for v in range(r.vectors):
                    emit.store(b, b.load(accs[ci][v]), stage, index(b, (ci, s.h * pitch), (iy, pitch), v * vw))
        with for_range(b, 0, s.c * s.h, name="fr") as row:  # the staged rows into dx, ow columns each
            src, dst = index(b, (row, pitch)), index(b, (row, s.w))

            def out(b: ir.IRBuilder, t: ir.Value, width: int, src=src, dst=dst) -> None:
                value = emit.load(b, stage, index(b, src, t), width)
                if s.accumulate:
                    value = b.fadd(emit.load(b, dx_img, index(b, dst, t), width), value)
                emit.store(b, value, dx_img, index(b, dst, t))

            vector_loop(b, 0, s.w, vw, out, name="fx")
