"""The weight gradient of a small convolution as dot products over positions, on shifted copies of the image.

    dW[o, ci, ky, kx] = sum over j < oh * ow of dy[o, j] * copy(ci, kx)[ky * ow + j]

with ``copy(ci, kx)`` the shifted plane of ``conv_direct`` (rows exactly ``ow``
wide, shifted left by ``kx``), so that every tap reads a contiguous run of
every output once. Vectors run over positions ``j``; a tile is a few output
channels by one kernel row's ``kw`` taps, each of its loads of dy and of the
copies feeding several FMAs. The partial sums stay vectors (``vw`` per weight,
laid out like dW) across the images and are reduced across lanes once per
call. Positions past ``oh * ow`` in the last vector read zeros of a copy of dy
(rows of whole vectors).

Against ``conv_direct``'s dot products for few output channels this wastes
only the last vector's lanes where those run over whole padded rows (LeNet's
C1: 784 outputs as 49 vectors rather than 896 columns as 56). With a connect
table the pairs outside it are left out (the channels unrolled).

Workspace (floats): ``[shifted copies][dy: m rows of n, only if oh * ow is not whole vectors][sums: m * c * taps
* vw]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.conv_direct import Plane, fill_shifted, zero
from cnnc.codegen.emit import for_range
from cnnc.codegen.gemm import index, local, vector_loop
from cnnc.codegen.plan import aligned

MAX_SUMS = 49152  # floats of partial sums (LeNet's C3: 38,400), which stay in the L2 cache
GAIN = 0.9  # used only where it needs at most this share of the vector multiply-adds of the form it replaces


@dataclass(frozen=True)
class Space:
    """The workspace of the weight gradient on the shifted plane `p`: one image's copies, dy, the sums."""

    p: Plane

    @property
    def total(self) -> int:
        return self.p.oh * self.p.ow

    @property
    def copies_dy(self) -> bool:
        """Whether dy is copied to rows of whole vectors (zeros past each row's outputs): else read in place."""
        return self.total % self.p.vw != 0

    @property
    def dy_floats(self) -> int:
        return aligned(self.p.m * self.p.n) if self.copies_dy else 0

    @property
    def sum_floats(self) -> int:
        return aligned(self.p.m * self.p.c * self.p.taps * self.p.vw)

    @property
    def floats(self) -> int:
        return self.p.pad_floats + self.dy_floats + self.sum_floats

    def sums(self, b: ir.IRBuilder, ws: ir.Value) -> ir.Value:
        return emit.gep(b, ws, self.p.pad_floats + self.dy_floats, name="sums")


def vector_fmas(p: Plane, pairs: int) -> int:
    """Vector multiply-adds per image on the shifted plane `p` for `pairs` (o, c) pairs."""
    return pairs * p.taps * (p.n // p.vw)


def fill(b: ir.IRBuilder, s: Space, ws: ir.Value, x: ir.Value, dy: ir.Value,
         placement: tuple[int, int, int, int]) -> ir.Value:
    """The workspace's shifted copies of `x` (``placement``: h, w, top, left); dy in rows of ``n``: `dy` itself
    when ``oh * ow`` is whole vectors, else a copy (the copies' borders and dy's tails stay zero from the
    call's start)."""
    p = s.p
    fill_shifted(b, p, x, *placement, ws)
    if not s.copies_dy:
        return dy
    dyp = emit.gep(b, ws, p.pad_floats)
    with for_range(b, 0, p.m, name="dr") as r:
        src, dst = index(b, (r, s.total)), index(b, (r, p.n))

        def copy(b: ir.IRBuilder, t: ir.Value, width: int, src=src, dst=dst) -> None:
            emit.store(b, emit.load(b, dy, index(b, src, t), width), dyp, index(b, dst, t))

        vector_loop(b, 0, s.total, p.vw, copy, name="dx")
    return dyp


def product(b: ir.IRBuilder, s: Space, ws: ir.Value, dy: ir.Value, live: list[tuple[int, list[int]]] | None
            ) -> None:
    """``sums[o, ci, ky, kx] += lanes of sum over j of dy[o, j] * copy(ci, kx)[ky * ow + j]`` (vectors of j).

    The copies are in `ws`, `dy` as ``fill`` returns it; `live`: each input channel and the output channels
    that read it (a connect table, unrolled), or None for all of them (a loop over input channels).
    """
    p = s.p
    vw = p.vw
    sums = s.sums(b, ws)
    regs = (32 if vw >= 16 else 16) - 4
    mr = max(1, regs // (p.kw + 1))  # rows x kw accumulators, a dy register per row, one for the copy's load
    zero_v = emit.splat(b, 0.0, vw)

    def channel(ci: ir.Value | int, rows: list[int]) -> None:
        with for_range(b, 0, p.kh, name="gy") as ky:
            x0 = emit.gep(b, ws, index(b, (ci, p.ch_stride), (ky, p.ky_stride)))
            for first in range(0, len(rows), mr):
                chunk = rows[first:first + mr]
                at = [index(b, (r * p.c * p.taps, vw), (ci, p.taps * vw), (ky, p.kw * vw)) for r in chunk]
                accs = [[local(b, emit.vec_type(vw), zero_v) for _ in range(p.kw)] for _ in chunk]
                for i in range(len(chunk)):
                    for kx in range(p.kw):
                        b.store(emit.load(b, sums, index(b, at[i], kx * vw), vw), accs[i][kx])
                with for_range(b, 0, p.n, vw, name="gj") as j:
                    xj, dj = emit.gep(b, x0, j), emit.gep(b, dy, j)
                    dys = [emit.load(b, dj, r * p.n, vw) for r in chunk]
                    values = [[b.load(a) for a in row] for row in accs]
                    for kx in range(p.kw):
                        x = emit.load(b, xj, kx * p.kx_stride, vw)
                        for i, d in enumerate(dys):
                            values[i][kx] = emit.fma(b, d, x, values[i][kx])
                    for row, vals in zip(accs, values):
                        for a, v in zip(row, vals):
                            b.store(v, a)
                for i in range(len(chunk)):
                    for kx in range(p.kw):
                        emit.store(b, b.load(accs[i][kx]), sums, index(b, at[i], kx * vw))

    if live is None:
        with for_range(b, 0, p.c, name="gc") as ci:
            channel(ci, list(range(p.m)))
    else:
        for ci, rows in live:
            channel(ci, rows)


def clear(b: ir.IRBuilder, s: Space, ws: ir.Value) -> None:
    """The copies' borders, dy's tails and the sums: zeroed once per call."""
    zero(b, ws, 0, s.floats, s.p.vw)
