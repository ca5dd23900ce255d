"""The weight gradient of a 3x3 stride-1 convolution by Winograd's F(2x2, 3x3), on the zero-padded plane.

The forward pass computes each 2x2 block of outputs ("tile") as
``A^T (U . V) A`` with ``U = G g G^T`` (the 3x3 kernel g) and ``V = B^T d B``
(the tile's 4x4 input patch d), see ``cnnc.codegen.conv_winograd``. The loss
is linear in U, so with ``Z = (A dY A^T) . V`` (dY the tile's 2x2 output
gradient) the kernel's gradient is ``G^T Z G`` summed over tiles, and since
the transforms are linear the sum over tiles can be taken in the transformed
domain: for each of the 16 elements xi of the 4x4 transforms,

    dU_xi (c x m) = V_xi (c x tiles) @ Y_xi (tiles x m),   Y = A dY A^T,

16 products of ``c * m * tiles`` multiply-adds where the direct gradient does
``9 * c * m * 4 * tiles``: 2.25 times fewer. dU is summed over every image of
the call, then ``dW += G^T dU G`` once.

V is the forward pass's input transform (vectorised over tiles). Y is
vectorised over output channels, from dy transposed to positions x channels
(``gemm.transpose``), so that
the products run down contiguous rows of Y and accumulate in registers over
the tiles. A block of tiles is a few tile rows of one image, or whole images
when a map has fewer tiles than a block (8x8 maps: 16 tiles an image).

Workspace (floats): ``[pad (Plane.pad_floats)][dy^T: oh * ow x m][V: 16 x c x
block][Y: 16 x block x m][dU: 16 x c x m]``; V's rows and each xi's part of Y
are a cache line longer than they need be, so that the 16 streams that the
transforms write are not all 4 KiB apart (they would share a set of the L1
cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import conv_direct, emit
from cnnc.codegen.conv_direct import Plane
from cnnc.codegen.conv_winograd import MIN_CHANNELS, ImageBlocks, transform_input
from cnnc.codegen.emit import for_range, i64
from cnnc.codegen.gemm import Mat, gemm_nn, index, vector_loop
from cnnc.codegen.plan import ALIGN, aligned


def applies(p: Plane, table: object) -> bool:
    """Whether the weight gradient on the padded plane `p` runs here: 3x3, even output sizes, no connect table,
    and enough channels for the products (the forward's MIN_CHANNELS)."""
    return ((p.kh, p.kw) == (3, 3) and p.oh % 2 == 0 and p.ow % 2 == 0 and table is None
            and min(p.c, p.m) >= MIN_CHANNELS)


@dataclass(frozen=True)
class GradBlocks(ImageBlocks):
    """The forward's cut of the tiles into blocks (``ImageBlocks``: tile rows of one image, or several whole
    images when an image has fewer tiles than a block; its ``cols`` and ``v_floats`` serve here too), and Y."""

    @property
    def y_stride(self) -> int:
        """Floats from one xi's part of Y to the next."""
        return aligned(self.tiles * self.p.m) + ALIGN

    @property
    def dyt_floats(self) -> int:
        return aligned(self.p.oh * self.p.ow * self.p.m)

    @property
    def y_floats(self) -> int:
        return 16 * self.y_stride

    @property
    def du_floats(self) -> int:
        return aligned(16 * self.p.c * self.p.m)

    @property
    def floats(self) -> int:
        return self.p.pad_floats + self.dyt_floats + self.v_floats + self.y_floats + self.du_floats


def workspace_floats(p: Plane) -> int:
    return GradBlocks(p).floats


def weight_gradient(b: ir.IRBuilder, p: Plane, ws: ir.Value, images: tuple[ir.Value, ir.Value], fill, bias_grad,
                    dw: ir.Value) -> None:
    """``dw[r, ci] += G^T dU[r, ci] G`` with dU summed over the images [n0, n1) (`images`).

    ``fill(b, n, pad, dyt)`` puts image n's input on the padded plane `pad`
    and its dy, transposed (``dyt[(oy * ow + ox) * m + r]``), into `dyt`;
    ``bias_grad(b, n)`` adds image n's bias gradient (or nothing).
    """
    blk = GradBlocks(p)
    pad = ws
    dyt = emit.gep(b, ws, p.pad_floats, name="wg.dyt")
    v = emit.gep(b, dyt, blk.dyt_floats, name="wg.v")
    y = emit.gep(b, v, blk.v_floats, name="wg.y")
    du = emit.gep(b, y, blk.y_floats, name="wg.du")
    conv_direct.zero(b, ws, 0, p.pad_floats, p.vw)  # the pad's border; each image fills the interior
    conv_direct.zero(b, du, 0, blk.du_floats, p.vw)
    n0, n1 = images
    tiles = blk.th * blk.tw

    def take(b: ir.IRBuilder, n: ir.Value) -> None:
        fill(b, n, pad, dyt)
        bias_grad(b, n)

    if blk.rows == blk.th:  # whole images a block
        with for_range(b, n0, n1, blk.images, name="wg.n") as n:
            left = b.sub(n1, n)
            count = b.select(b.icmp_signed("<", left, i64(blk.images)), left, i64(blk.images), name="wg.count")
            with for_range(b, 0, count, name="wg.i") as i:
                take(b, b.add(n, i))
                col0 = index(b, (i, tiles))
                transform_input(b, p, pad, i64(0), blk.th, v, blk.cols, col0)
                _transform_dy(b, p, blk, dyt, i64(0), blk.th, y, col0)
            _products(b, p, blk, v, y, du, index(b, (count, tiles)))
    else:  # blocks of tile rows of one image
        full, rest = divmod(blk.th, blk.rows)
        with for_range(b, n0, n1, name="wg.n") as n:
            take(b, n)
            if full:
                with for_range(b, 0, full, name="wg.b") as block:
                    ty0 = index(b, (block, blk.rows))
                    transform_input(b, p, pad, ty0, blk.rows, v, blk.cols, 0)
                    _transform_dy(b, p, blk, dyt, ty0, blk.rows, y, 0)
                    _products(b, p, blk, v, y, du, blk.rows * blk.tw)
            if rest:
                ty0 = i64(full * blk.rows)
                transform_input(b, p, pad, ty0, rest, v, blk.cols, 0)
                _transform_dy(b, p, blk, dyt, ty0, rest, y, 0)
                _products(b, p, blk, v, y, du, rest * blk.tw)
    _add_gradient(b, p, du, dw)


def _transform_dy(b: ir.IRBuilder, p: Plane, blk: GradBlocks, dyt: ir.Value, ty0: ir.Value, rows: int, y: ir.Value,
                  col0: ir.Value | int) -> None:
    """Y[xi, col0 + r * tw + tx, :] = (A dY A^T)[xi] for tile (ty0 + r, tx), vectorised over output channels.

    dY is the tile's 2x2 of dy^T (``dyt[(oy * ow + ox) * m + r]``); A dY A^T takes each row (u0, u1) of a
    2x2 to (u0, u0 + u1, u0 - u1, -u1), and then each column.
    """
    m, row = p.m, p.ow * p.m

    def spread(u0: ir.Value, u1: ir.Value) -> list[ir.Value]:
        return [u0, b.fadd(u0, u1), b.fsub(u0, u1), b.fneg(u1)]

    with for_range(b, 0, rows, name="yr") as r:
        with for_range(b, 0, blk.tw, name="yt") as tx:
            at = index(b, (b.add(ty0, r), 2 * row), (tx, 2 * m))
            col = index(b, col0, (r, blk.tw), tx)

            def tile(b: ir.IRBuilder, o: ir.Value, width: int, at=at, col=col) -> None:
                d = [[emit.load(b, dyt, index(b, at, o, dy * row + dx * m), width) for dx in range(2)]
                     for dy in range(2)]
                rows4 = list(zip(*[spread(d[0][x], d[1][x]) for x in range(2)]))  # (A dY)[i] = (left, right)
                for i, (left, right) in enumerate(rows4):
                    for j, value in enumerate(spread(left, right)):
                        emit.store(b, value, y, index(b, (4 * i + j) * blk.y_stride, (col, m), o))

            vector_loop(b, 0, m, p.vw, tile, name="yo")


def _products(b: ir.IRBuilder, p: Plane, blk: GradBlocks, v: ir.Value, y: ir.Value, du: ir.Value,
              count: ir.Value | int) -> None:
    """dU_xi (c x m) += V_xi (c x count) @ Y_xi (count x m) for the 16 xi, vectorised over output channels."""
    wide = p.vw >= 16
    nrv = max(1, min(4 if wide else 3, p.m // p.vw))
    mr = {1: 8, 2: 6}.get(nrv, 4) if wide else 4
    with for_range(b, 0, 16, name="gxi") as xi:
        v_xi = Mat(emit.gep(b, v, index(b, (xi, blk.v_stride))), rs=blk.cols)
        y_xi = Mat(emit.gep(b, y, index(b, (xi, blk.y_stride))), rs=p.m)
        du_xi = emit.gep(b, du, index(b, (xi, p.c * p.m)), name="du.xi")

        def add(b: ir.IRBuilder, ci: ir.Value, o: ir.Value, value: ir.Value, width: int, du_xi=du_xi) -> None:
            at = index(b, (ci, p.m), o)
            emit.store(b, b.fadd(emit.load(b, du_xi, at, width), value), du_xi, at)

        count_v = i64(count) if isinstance(count, int) else count
        gemm_nn(b, p.c, p.m, count_v, v_xi, y_xi, add, p.vw, mr=mr, nrv=nrv)


def _add_gradient(b: ir.IRBuilder, p: Plane, du: ir.Value, dw: ir.Value) -> None:
    """dw[r, ci, ky, kx] += (G^T dU G)[ky, kx] with dU[xi] = du[xi, ci, r]; G^T takes (u0, u1, u2, u3) to
    (u0 + (u1 + u2) / 2, (u1 - u2) / 2, (u1 + u2) / 2 + u3)."""
    half = emit.f32(0.5)

    def fold(u: list[ir.Value]) -> list[ir.Value]:
        s = b.fmul(b.fadd(u[1], u[2]), half)
        return [b.fadd(u[0], s), b.fmul(b.fsub(u[1], u[2]), half), b.fadd(s, u[3])]

    with for_range(b, 0, p.c, name="gc") as ci:
        with for_range(b, 0, p.m, name="go") as r:
            z = [[emit.load(b, du, index(b, ((4 * i + j) * p.c * p.m, 1), (ci, p.m), r)) for j in range(4)]
                 for i in range(4)]
            cols = [fold([z[i][j] for i in range(4)]) for j in range(4)]  # (G^T Z)[ky] for column j
            for ky in range(3):
                row = fold([cols[j][ky] for j in range(4)])
                for kx in range(3):
                    at = index(b, (r, p.c * 9), (ci, 9), 3 * ky + kx)
                    emit.store(b, b.fadd(emit.load(b, dw, at), row[kx]), dw, at)
