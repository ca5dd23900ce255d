"""3x3 stride-1 convolutions at inference by Winograd F(4x4, 3x3) with output channels in the vector lanes.

``conv_winograd4`` puts tiles in the lanes, so it needs a vector of tiles: an
8x8 map has 4, and ran by F(2x2) (16 tiles, 9/4 of the direct multiply-adds
instead of 9/16 ... ResNet-20's 64->64 layers: 23.8 us an image on one
thread). Here the 36 products ``M_xi[t, o] = sum_c V_xi[c, t] U_xi[c, o]`` run
with vectors of output channels (``gemm_nn`` with V transposed: each tile's
input value broadcast, a row of U loaded), so that a map of a few tiles does
F(4x4)'s 4x fewer multiply-adds at full width. The input transform is
``conv_winograd4``'s, all tile rows of an image in one vector; the output
transform works on vectors of channels, and a transpose of each square of
``vw`` pixels by ``vw`` channels (shuffles) turns them into rows of a channel
for ``finish``. U is kept between calls as ``[xi][c][o]`` (``transform_weights``, on
vectors of output channels).

Workspace (after ``Plane.floats``): ``conv_winograd4.Blocks``' V, then M as
``[xi][t][o]`` in its M section.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import conv_winograd4, emit
from cnnc.codegen.conv_direct import Finish, Plane
from cnnc.codegen.conv_winograd import MIN_CHANNELS
from cnnc.codegen.conv_winograd4 import XI, Blocks, G, _at, _combine, _input_group
from cnnc.codegen.emit import for_range, i64
from cnnc.codegen.gemm import Mat, gemm_nn, index

SIZES = (2, 4)  # tiles a row or column of the map may have (the input transform joins rows a power of two)


def applies(p: Plane, table: object) -> bool:
    """Whether `p` (a valid convolution on the padded plane) runs here at inference: 3x3, a map of 2 or 4 tiles
    each way (8x8, 8x16, 16x8) where ``conv_winograd4`` does not run (fewer tiles than a vector, or narrow rows),
    enough input channels, and whole vectors of output channels."""
    th, tw = p.oh // 4, p.ow // 4
    return ((p.kh, p.kw) == (3, 3) and p.oh % 4 == 0 and p.ow % 4 == 0 and table is None and th in SIZES
            and tw in SIZES and not conv_winograd4.applies(p, table) and p.c >= MIN_CHANNELS and p.m % p.vw == 0)


def workspace_floats(p: Plane) -> int:
    """As ``conv_winograd4.workspace_floats`` (M as [t][o] fits in its M section)."""
    return conv_winograd4.workspace_floats(p)


def transform_weights(b: ir.IRBuilder, p: Plane, w: ir.Value, u: ir.Value) -> None:
    """u[xi, ci, oi] = (G g G^T)[xi] for the 3x3 kernel g = w[oi, ci], vectorised over a vector of output channels
    (their taps gathered: ``9 * c`` floats apart), so that U's rows are stored whole. Redone whenever the weights
    change (``cached_weights``): ResNet-20's 64->64, a kernel at a time, took 470 us."""
    vw = p.vw
    vec = ir.VectorType(emit.F32, vw)
    with for_range(b, 0, p.m, vw, name="u4o") as o0:
        with for_range(b, 0, p.c, name="u4c") as ci:
            taps = []
            for t in range(9):
                value = ir.Constant(vec, ir.Undefined)
                for lane in range(vw):
                    tap = emit.load(b, w, index(b, (b.add(o0, i64(lane)), 9 * p.c), (ci, 9), t))
                    value = b.insert_element(value, tap, ir.Constant(ir.IntType(32), lane))
                taps.append(value)
            g = [taps[3 * r:3 * r + 3] for r in range(3)]
            gg = [[_combine(b, G[r], [g[0][s], g[1][s], g[2][s]], vw) for s in range(3)] for r in range(6)]
            for r in range(6):
                for s in range(6):
                    emit.store(b, _combine(b, G[s], gg[r], vw), u, index(b, (6 * r + s) * p.m * p.c, (ci, p.m), o0))


def transpose(b: ir.IRBuilder, vectors: list[ir.Value]) -> list[ir.Value]:
    """The square of `vectors` (as many as each has lanes, a power of two) transposed: lane l of result i is lane
    i of vector l. Butterflies: at each step, vectors s apart swap the lanes s apart."""
    n = len(vectors)
    i32 = ir.IntType(32)
    out = list(vectors)
    s = 1
    while s < n:
        low = ir.Constant(ir.VectorType(i32, n), [lane if not lane & s else n + lane - s for lane in range(n)])
        high = ir.Constant(ir.VectorType(i32, n), [lane + s if not lane & s else n + lane for lane in range(n)])
        for i in range(n):
            if i & s:
                continue
            out[i], out[i + s] = b.shuffle_vector(out[i], out[i + s], low), b.shuffle_vector(out[i], out[i + s], high)
        s *= 2
    return out


def product(b: ir.IRBuilder, p: Plane, pad: ir.Value, u: ir.Value, ws: ir.Value, finish: Finish) -> None:
    """Every output of the convolution of the padded plane `pad` with the transformed weights `u` ([xi][c][o]),
    to `finish`."""
    blk = Blocks(p)
    th, tw = p.oh // 4, p.ow // 4
    tiles, vw = th * tw, p.vw
    v = ws
    m = emit.gep(b, ws, blk.v_floats, name="wino4o.m")
    with for_range(b, 0, p.c, name="v4oc") as ci:
        _input_group(b, p, pad, v, blk, ci, i64(0), index(b, (ci, blk.cols)), th)
    with for_range(b, 0, XI, name="xi") as xi:
        v_xi = Mat(emit.gep(b, v, index(b, (xi, blk.v_stride))), rs=1, cs=blk.cols)  # (t, c): V transposed
        u_xi = Mat(emit.gep(b, u, index(b, (xi, p.m * p.c))), rs=p.m)  # (c, o)
        m_xi = emit.gep(b, m, index(b, (xi, blk.m_stride)), name="m.xi")

        def keep(b: ir.IRBuilder, r: ir.Value, j: ir.Value, value: ir.Value, width: int, m_xi=m_xi) -> None:
            emit.store(b, value, m_xi, index(b, (r, p.m), j))

        gemm_nn(b, tiles, p.m, p.c, v_xi, u_xi, keep, vw, mr=min(tiles, 4),
                nrv=min(4 if vw >= 16 else 2, p.m // vw))
    per_row = max(1, vw // 4)  # output rows of a tile in one transposed vector (4 pixels each)
    with for_range(b, 0, tiles, name="y4ot") as t:
        corner = index(b, (b.sdiv(t, i64(tw)), 4 * p.ow), (b.srem(t, i64(tw)), 4))  # the tile's first output
        with for_range(b, 0, p.m, vw, name="y4oo") as o0:
            at = index(b, (t, p.m), o0)
            s = [_at(b, [emit.load(b, m, index(b, (6 * i + j) * blk.m_stride, at), vw) for j in range(6)], vw)
                 for i in range(6)]
            cols = [_at(b, [s[i][x] for i in range(6)], vw) for x in range(4)]  # cols[x][y]: channels o0 ..
            pixels = [cols[x][y] for y in range(4) for x in range(4)]
            for group in range(0, 16, vw):  # vw pixels (rows of the tile) by vw channels, transposed
                square = transpose(b, pixels[group:group + vw]) if vw > 1 else pixels[group:group + 1]
                for k, channel in enumerate(square):
                    oi = b.add(o0, i64(k))
                    for row in range(per_row):
                        y = group // 4 + row
                        value = channel if vw <= 4 else b.shuffle_vector(
                            channel, ir.Constant(channel.type, ir.Undefined),
                            ir.Constant(ir.VectorType(ir.IntType(32), 4), [4 * row + x for x in range(4)]))
                        out = index(b, (oi, p.oh * p.ow), corner, y * p.ow)
                        finish(b, oi, out, value, min(vw, 4))
