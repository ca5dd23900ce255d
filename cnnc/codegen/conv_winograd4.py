"""3x3 stride-1 convolutions at inference by Winograd F(4x4, 3x3) on the zero-padded plane.

As ``conv_winograd`` (F(2x2, 3x3)), with 4x4 blocks of outputs ("tiles") from
the 6x6 patch of the padded input around each: ``V = B^T d B``, ``U = G g G^T``
and the block ``A^T (sum over input channels of U . V) A`` with the points 0,
+-1, +-2 and infinity (Lavin and Gray, 2015). The 36 products ``M_xi = U_xi @
V_xi`` do ``36 * o * c`` multiply-adds a tile of 16 outputs where the direct
convolution does ``9 * 16 * o * c``: 4 times fewer (F(2x2): 2.25). The
transforms multiply by 2, 4, 5 and 8, so the float32 rounding grows (64
channels at 32x32: 5e-6 of the largest output at most, 2e-6 rms; F(2x2): 4e-7
and 3e-7). It runs only at inference (``ConvSpec.cached``: training's forward
and gradients keep F(2x2)), on maps of whole tiles with rows of at least
``MIN_TILE_COLS`` tiles.

The input transform takes a vector of tiles of a tile row: each patch column
``4 * tx + j`` is a strided pick from two loads of four vectors' floats. Rows
of fewer tiles than a vector (16x16 maps: 4) go ``group`` rows a vector, their
picks joined, and the output transform splits them back into rows the same
way (ResNet's 32->32 on 16x16, 16 images, one thread: 24 us an image, 35 a row
at a time, 27 by F(2x2)).
Workspace (floats, after all of ``Plane.floats``): ``[V: 36 x (c x block +
XI_PAD)][M: 36 x (o x block + XI_PAD)]`` (``conv_winograd.xi_stride``); U is always kept between calls, in
the caller's region (``conv_winograd.cached_weights`` with ``xi=36``).
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import conv_winograd, emit
from cnnc.codegen.conv_direct import Finish, Plane
from cnnc.codegen.conv_winograd import MIN_CHANNELS, by_blocks, kernel_taps
from cnnc.codegen.emit import for_range, i64
from cnnc.codegen.gemm import index, vector_loop

MIN_TILE_COLS = 4  # tiles a row (16 outputs): narrower maps keep F(2x2)
MIN_OUTPUTS = 8
XI = 36  # elements of a 6x6 transform

G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
     (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def applies(p: Plane, table: object) -> bool:
    """Whether `p` (a valid convolution on the padded plane) runs here at inference: 3x3, outputs in whole 4x4
    tiles, enough input and output channels, rows of at least ``MIN_TILE_COLS`` tiles and a vector of tiles."""
    return ((p.kh, p.kw) == (3, 3) and p.oh % 4 == 0 and p.ow % 4 == 0 and table is None
            and p.c >= MIN_CHANNELS and p.m >= MIN_OUTPUTS and p.ow // 4 >= MIN_TILE_COLS
            and (p.oh // 4) * (p.ow // 4) >= p.vw)


@dataclass(frozen=True)
class Blocks(conv_winograd.Blocks):
    """How the 4x4 tiles of one image are cut into blocks of whole tile rows (U is not in the workspace)."""

    TILE = 4
    XI = XI

    @property
    def floats(self) -> int:
        return self.v_floats + self.m_floats


def workspace_floats(p: Plane) -> int:
    """All of conv_direct's workspace for `p`, then this one's (the input transform's loads may read up to
    ``8 * p.vw`` floats past the padded planes: into the sections after them, never past the workspace)."""
    return p.floats + Blocks(p).floats + 8 * p.vw


def _combine(b: ir.IRBuilder, coefs: tuple[float, ...], values: list[ir.Value], width: int) -> ir.Value:
    """sum of coefs[i] * values[i], skipping zeros (adds for +-1, multiply-adds for the rest)."""
    acc = None
    for c, v in zip(coefs, values):
        if c == 0:
            continue
        if acc is None:
            acc = v if c == 1 else b.fmul(v, emit.splat(b, emit.f32(c), width))
        elif c == 1:
            acc = b.fadd(acc, v)
        elif c == -1:
            acc = b.fsub(acc, v)
        else:
            acc = emit.fma(b, v, emit.splat(b, emit.f32(c), width), acc)
    return acc


def transform_weights(b: ir.IRBuilder, p: Plane, w: ir.Value, u: ir.Value) -> None:
    """u[xi, oi, ci] = (G g G^T)[xi] for the 3x3 kernel g = w[oi, ci], vectorised over kernels."""

    def kernels(b: ir.IRBuilder, k: ir.Value, width: int) -> None:
        taps = kernel_taps(b, w, k, width)
        g = [taps[3 * r:3 * r + 3] for r in range(3)]
        gg = [[_combine(b, G[r], [g[0][s], g[1][s], g[2][s]], width) for s in range(3)] for r in range(6)]
        for r in range(6):
            for s in range(6):
                emit.store(b, _combine(b, G[s], gg[r], width), u, index(b, (6 * r + s) * p.m * p.c, k))

    vector_loop(b, 0, p.m * p.c, p.vw, kernels, name="u4k")


def _bt(b: ir.IRBuilder, d: list[ir.Value], width: int) -> list[ir.Value]:
    """B^T applied to six values, factored (12 adds and multiply-adds)."""
    four, two, five = (emit.splat(b, emit.f32(c), width) for c in (4.0, 2.0, 5.0))
    neg4, neg5 = (emit.splat(b, emit.f32(c), width) for c in (-4.0, -5.0))
    s12, d12 = b.fadd(d[1], d[2]), b.fsub(d[1], d[2])
    s34, d43 = b.fadd(d[3], d[4]), b.fsub(d[4], d[3])
    d42, d31 = b.fsub(d[4], d[2]), b.fsub(d[3], d[1])
    return [emit.fma(b, d[2], neg5, emit.fma(b, d[0], four, d[4])),
            emit.fma(b, s12, neg4, s34),
            emit.fma(b, d12, four, d43),
            emit.fma(b, d31, two, d42),
            emit.fma(b, d31, emit.splat(b, emit.f32(-2.0), width), d42),
            emit.fma(b, d[3], neg5, emit.fma(b, d[1], four, d[5]))]


def _at(b: ir.IRBuilder, m: list[ir.Value], width: int) -> list[ir.Value]:
    """A^T applied to six values, factored."""
    s12, d12 = b.fadd(m[1], m[2]), b.fsub(m[1], m[2])
    s34, d34 = b.fadd(m[3], m[4]), b.fsub(m[3], m[4])
    return [b.fadd(b.fadd(m[0], s12), s34),
            emit.fma(b, d34, emit.splat(b, emit.f32(2.0), width), d12),
            emit.fma(b, s34, emit.splat(b, emit.f32(4.0), width), s12),
            b.fadd(emit.fma(b, d34, emit.splat(b, emit.f32(8.0), width), d12), m[5])]


def _patch_row(b: ir.IRBuilder, pad: ir.Value, at: ir.Value, width: int) -> list[ir.Value]:
    """Floats at + 4t + j for t < width, j < 6: six vectors (scalars at width 1)."""
    if width == 1:
        return [emit.load(b, pad, b.add(at, i64(j))) for j in range(6)]
    lo = emit.load(b, pad, at, 4 * width)
    hi = emit.load(b, pad, b.add(at, i64(4 * width)), 4 * width)
    i32 = ir.IntType(32)
    return [b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, width), [4 * t + j for t in range(width)]))
            for j in range(6)]


def _block(b: ir.IRBuilder, p: Plane, blk: Blocks, pad: ir.Value, u: ir.Value, ws: ir.Value, ty0: ir.Value,
           rows: int, finish: Finish) -> None:
    """The `rows` tile rows from `ty0`: input transform, the 36 products, output transform."""
    tw, t = blk.tw, blk.cols
    v = ws
    m = emit.gep(b, ws, blk.v_floats, name="wino4.m")
    g = group(p, rows)
    with for_range(b, 0, p.c, name="v4c") as ci:
        if g > 1:  # g tile rows a vector
            with for_range(b, 0, rows - rows % g, g, name="v4g") as r:
                _input_group(b, p, pad, v, blk, ci, b.add(ty0, r), index(b, (ci, t), (r, tw)), g)
        for_rows = (i64(rows - rows % g), i64(rows)) if g > 1 else (i64(0), i64(rows))
        with for_range(b, *for_rows, name="v4r") as r:
            top = index(b, (ci, p.hp * p.wp), (b.add(ty0, r), 4 * p.wp))
            first = index(b, (ci, t), (r, tw))

            def patch(b: ir.IRBuilder, tx: ir.Value, width: int, top=top, first=first) -> None:
                d = [_bt(b, _patch_row(b, pad, index(b, top, i * p.wp, (tx, 4)), width), width) for i in range(6)]
                _store_v(b, p, v, blk, index(b, first, tx), d, width)

            vector_loop(b, 0, tw, p.vw, patch, name="v4x")
    conv_winograd.products(b, p, u, v, m, t, rows * tw, XI)
    with for_range(b, 0, p.m, name="y4o") as oi:
        if g > 1:
            with for_range(b, 0, rows - rows % g, g, name="y4g") as r:
                _output_group(b, p, m, blk, oi, b.add(ty0, r), index(b, (oi, t), (r, tw)), g, finish)
        for_rows = (i64(rows - rows % g), i64(rows)) if g > 1 else (i64(0), i64(rows))
        with for_range(b, *for_rows, name="y4r") as r:
            first = index(b, (oi, t), (r, tw))
            out_row = index(b, (oi, p.oh * p.ow), (b.add(ty0, r), 4 * p.ow))

            def block(b: ir.IRBuilder, tx: ir.Value, width: int, oi=oi, first=first, out_row=out_row) -> None:
                cols = _output_tiles(b, p, m, blk, index(b, first, tx), width)
                for y in range(4):
                    out = index(b, out_row, y * p.ow, (tx, 4))
                    if width == 1:
                        for x in range(4):
                            finish(b, oi, b.add(out, i64(x)), cols[x][y], 1)
                        continue
                    for part, value in enumerate(_interleave4(b, [cols[x][y] for x in range(4)], width)):
                        finish(b, oi, b.add(out, i64(part * width)), value, width)

            vector_loop(b, 0, tw, p.vw, block, name="y4x")


def group(p: Plane, rows: int) -> int:
    """Tile rows the transforms take as one vector: a vector's worth of rows narrower than it (a 16x16 map's
    rows of 4 tiles, 4 at 16 lanes), halved until at most `rows`; 1 where a row's tiles do not divide a vector."""
    tw = p.ow // 4
    if tw >= p.vw or p.vw % tw or (4 * tw) % p.vw:
        return 1
    g = p.vw // tw  # (a power of two, as the lanes of a row, 4 tw, are whole vectors: _output_group)
    while g > rows:
        g //= 2
    return g


def _store_v(b: ir.IRBuilder, p: Plane, v: ir.Value, blk: Blocks, at: ir.Value, d: list[list[ir.Value]],
             width: int) -> None:
    """V[xi, at ..] from the patches' rows transformed along x (`d`, 6 by 6): the transform along y, stored."""
    for j in range(6):
        col = _bt(b, [d[i][j] for i in range(6)], width)
        for i in range(6):
            emit.store(b, col[i], v, index(b, (6 * i + j) * blk.v_stride, at))


def _concat(b: ir.IRBuilder, parts: list[ir.Value]) -> ir.Value:
    """Vectors of one width joined end to end (a power-of-two count of them)."""
    i32 = ir.IntType(32)
    while len(parts) > 1:
        n = parts[0].type.count
        lanes = ir.Constant(ir.VectorType(i32, 2 * n), list(range(2 * n)))
        parts = [b.shuffle_vector(parts[k], parts[k + 1], lanes) for k in range(0, len(parts), 2)]
    return parts[0]


def _input_group(b: ir.IRBuilder, p: Plane, pad: ir.Value, v: ir.Value, blk: Blocks, ci: ir.Value, ty: ir.Value,
                 first: ir.Value, g: int) -> None:
    """V of the tiles of `g` tile rows from `ty` (all of their tiles: one vector), channel `ci`."""
    tw = p.ow // 4
    width = g * tw
    d = []
    for i in range(6):
        rows = [_patch_row(b, pad, index(b, (ci, p.hp * p.wp), (b.add(ty, i64(k)), 4 * p.wp), i * p.wp), tw)
                for k in range(g)]
        d.append(_bt(b, [_concat(b, [row[j] for row in rows]) for j in range(6)], width))
    _store_v(b, p, v, blk, first, d, width)


def _output_tiles(b: ir.IRBuilder, p: Plane, m: ir.Value, blk: Blocks, at: ir.Value,
                  width: int) -> list[list[ir.Value]]:
    """The 4x4 outputs of the tiles at columns at .. at + width - 1 of M: cols[x][y], each a vector of tiles."""
    s = [_at(b, [emit.load(b, m, index(b, (6 * i + j) * blk.m_stride, at), width) for j in range(6)], width)
         for i in range(6)]
    return [_at(b, [s[i][c] for i in range(6)], width) for c in range(4)]


def _output_group(b: ir.IRBuilder, p: Plane, m: ir.Value, blk: Blocks, oi: ir.Value, ty: ir.Value, first: ir.Value,
                  g: int, finish: Finish) -> None:
    """Channel `oi`'s outputs of the tiles of `g` tile rows from `ty`, handed to `finish` a vector at a time."""
    tw = p.ow // 4
    width = g * tw
    cols = _output_tiles(b, p, m, blk, first, width)
    i32 = ir.IntType(32)
    for y in range(4):
        low = _concat(b, [cols[0][y], cols[1][y]])
        high = _concat(b, [cols[2][y], cols[3][y]])
        for k in range(g):  # output row 4 (ty + k) + y: lane 4 tx + x is tile (k, tx)'s column x
            source = [x * width + k * tw + tx for tx in range(tw) for x in range(4)]
            out = index(b, (oi, p.oh * p.ow), (b.add(ty, i64(k)), 4 * p.ow), y * p.ow)
            for piece in range(0, 4 * tw, p.vw):
                lanes = ir.Constant(ir.VectorType(i32, p.vw), source[piece:piece + p.vw])
                finish(b, oi, b.add(out, i64(piece)), b.shuffle_vector(low, high, lanes), p.vw)


def _interleave4(b: ir.IRBuilder, parts: list[ir.Value], width: int) -> list[ir.Value]:
    """(a0 b0 c0 d0 a1 b1 ...) of four vectors as four vectors of `width`."""
    i32 = ir.IntType(32)
    ab = b.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(i32, 2 * width), list(range(2 * width))))
    cd = b.shuffle_vector(parts[2], parts[3], ir.Constant(ir.VectorType(i32, 2 * width), list(range(2 * width))))
    lanes = [x * width + t for t in range(width) for x in range(4)]  # output lane 4t + x: part x, tile t
    return [b.shuffle_vector(ab, cd, ir.Constant(ir.VectorType(i32, width), lanes[k * width:(k + 1) * width]))
            for k in range(4)]


def product(b: ir.IRBuilder, p: Plane, pad: ir.Value, u: ir.Value, ws: ir.Value, finish: Finish,
            tile_rows: tuple[int, int] | None = None) -> None:
    """Every output of the convolution of the padded plane `pad` with the transformed weights `u`, to `finish`
    (or those of tile rows [t0, t1)), as ``conv_winograd.product``."""
    blk = Blocks(p)
    by_blocks(b, blk, tile_rows, lambda b, ty0, rows: _block(b, p, blk, pad, u, ws, ty0, rows, finish))
