"""3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) on the zero-padded plane.

Each 2x2 block of outputs ("tile") comes from the 4x4 patch of the padded
input around it: with ``V = B^T d B`` for the patch and ``U = G g G^T`` for
the 3x3 kernel, the block is ``A^T (sum over input channels of U . V) A``
(Lavin and Gray, "Fast algorithms for convolutional neural networks", 2015).
The sum over channels, for each of the 16 elements of the 4x4 transforms, is
a matrix product ``M_xi (o x tiles) = U_xi (o x c) @ V_xi (c x tiles)``: 16
products of ``o * c * tiles`` multiply-adds where the direct convolution does
``9 * o * c * 4 * tiles``, 2.25 times fewer. The transforms are adds and a few
halvings, vectorised over a row of tiles (their columns split into even and
odd like the pooling kernels').

Tiles are taken a block of tile rows at a time so that V and M stay in the
cache between the transforms and the products. The same routine gives the
input gradient (the flipped, channel-swapped weights on dy padded by 2), as
``conv_direct.product`` does.

Maps whose tiles make exactly one vector (ResNet's 8x8 maps at 16 lanes:
``whole_images``) would run these transforms on vectors of a tile row (4 of
16 lanes) and the products on one vector of columns. There
(``product_images``) each channel of the unpadded image is loaded whole and
split by shuffles into the 16 vectors of its tiles' patches (zero outside
the image), the output transform gathers the 2x2 blocks back into rows the
same way, and the products take several images at once (``ImageBlocks``):
the same arithmetic in the same order, so the same bits.

Workspace (floats, after all of ``Plane.floats``): ``[U: 16 x o x c][V: 16 x
c x block][M: 16 x o x block]``.

At inference U can be kept between calls instead (``cached_weights``), in a
region of its own with a copy of the weights it was made from: a call compares
the weights' bits with the copy (reading 18 floats a kernel, against the 9
read and 16 written by a transform, with the shuffles) and transforms again
only what changed, so a write into the weights by any path (an update, a load,
a view) holds from the next call. Zeroed memory is a valid region (the
transform of zero weights is zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.conv_direct import Finish, Plane
from cnnc.codegen.emit import for_range, i64
from cnnc.codegen.gemm import Mat, gemm_nn, index, local, vector_loop, widths
from cnnc.codegen.plan import ALIGN, aligned

MIN_CHANNELS = 16  # below this the products are too small to beat the direct convolution (CIFAR's first layer)
# ... except for output channels: 16 -> 8 on 32x32 (one thread's half of ResNet's 16 -> 16 when two threads share
# an image): 23.3 us direct, 18.8 by Winograd (batch 1, one thread, CPU time)
MIN_OUTPUTS = 8
# floats from one transform element's rows of V (or M) to the next's beyond the rows themselves: a cache line, so
# that the 16 (36) streams the transforms write and read are not 4 KiB apart (c x cols floats is a multiple of 1024
# for 64 channels, or 32 of a 16x16 map by F(4x4)), which made every access wait on the stores to the others
XI_PAD = 16
BLOCK_TILES = 64  # tiles per block: V and M of a 64-channel layer are 256 KiB each (32 and 128: slower)


def applies(p: Plane, table: object) -> bool:
    """Whether `p` (a valid convolution on the padded plane) runs here: 3x3, even output sizes, enough input and
    output channels and tiles (the products' columns: with less than a vector of them the direct convolution is
    as fast), and rows of at least four tiles (the transforms' vectors)."""
    return ((p.kh, p.kw) == (3, 3) and p.oh % 2 == 0 and p.ow % 2 == 0 and table is None
            and p.c >= MIN_CHANNELS and p.m >= MIN_OUTPUTS and (p.oh // 2) * (p.ow // 2) >= p.vw and p.ow >= 8)


@dataclass(frozen=True)
class Blocks:
    """How the tiles of one image are cut into blocks of whole tile rows."""

    p: Plane
    TILE = 2  # outputs a tile is wide and high
    XI = 16  # elements of a transform

    @property
    def tw(self) -> int:
        return self.p.ow // self.TILE

    @property
    def th(self) -> int:
        return self.p.oh // self.TILE

    @property
    def rows(self) -> int:
        """Tile rows per block."""
        return max(1, min(self.th, BLOCK_TILES // self.tw))

    @property
    def tiles(self) -> int:
        return self.rows * self.tw

    @property
    def cols(self) -> int:
        """The length of a row of V and M: the tiles and a cache line, so that the 16 streams the transforms
        write or read are not all 4 KiB apart (which would put them in one set of the L1 cache)."""
        return aligned(self.tiles) + ALIGN

    @property
    def u_floats(self) -> int:
        return aligned(self.XI * self.p.m * self.p.c)

    @property
    def v_stride(self) -> int:
        return xi_stride(self.p.c, self.cols)

    @property
    def m_stride(self) -> int:
        return xi_stride(self.p.m, self.cols)

    @property
    def v_floats(self) -> int:
        return self.XI * self.v_stride

    @property
    def m_floats(self) -> int:
        return self.XI * self.m_stride

    @property
    def floats(self) -> int:
        """Workspace after the padded plane."""
        return self.u_floats + self.v_floats + self.m_floats


def xi_stride(rows: int, cols: int) -> int:
    """The floats from one transform element's part of V (`rows` input channels) or M (output channels) to the
    next's: its rows of `cols`, and ``XI_PAD``."""
    return rows * cols + XI_PAD


@dataclass(frozen=True)
class ImageBlocks(Blocks):
    """Blocks of several whole images when an image has fewer tiles than a block (else as ``Blocks``)."""

    @property
    def images(self) -> int:
        """Images a block holds: more than one when an image has fewer tiles than a block."""
        return max(1, BLOCK_TILES // (self.th * self.tw)) if self.rows == self.th else 1

    @property
    def tiles(self) -> int:
        """Columns of V (and of M) a block can hold."""
        return self.images * self.rows * self.tw


def workspace_floats(p: Plane) -> int:
    """All of conv_direct's workspace for `p` (the padded plane and the flipped weights in it), then this one's."""
    return p.floats + (ImageBlocks(p) if _one_vector(p) else Blocks(p)).floats


def _one_vector(p: Plane) -> bool:
    return p.vw > 1 and (p.oh // 2) * (p.ow // 2) == p.vw


def whole_images(p: Plane, h: int, w: int) -> bool:
    """Whether `p`'s forward runs by ``product_images``: an image's tiles are one vector and its unpadded
    `h` x `w` channel at most four (loaded whole, then split by shuffles)."""
    return _one_vector(p) and h * w <= 4 * p.vw


def kernel_taps(b: ir.IRBuilder, w: ir.Value, k: ir.Value, width: int) -> list[ir.Value]:
    """The 9 taps of kernels k .. k + width - 1 of the row-major (m, c, 3, 3) weights `w`: 9 vectors of
    `width` (one load of 9 vectors, split by strided shuffles)."""
    if width == 1:
        return [emit.load(b, w, index(b, (k, 9), t)) for t in range(9)]
    block = b.load(emit.gep(b, w, index(b, (k, 9))), typ=ir.VectorType(emit.F32, 9 * width), align=4)
    lanes = lambda t: ir.Constant(ir.VectorType(ir.IntType(32), width), [t + 9 * i for i in range(width)])  # noqa: E731
    return [b.shuffle_vector(block, ir.Constant(block.type, ir.Undefined), lanes(t)) for t in range(9)]


def transform_weights(b: ir.IRBuilder, p: Plane, w: ir.Value, u: ir.Value) -> None:
    """u[xi, oi, ci] = (G g G^T)[xi] for the 3x3 kernel g = w[oi, ci] (row-major (m, c, 3, 3)).

    Vectorised over kernels: kernel k = oi * c + ci is element k of each of the
    16 rows of u (``kernel_taps``). Done on every call unless kept
    (``cached_weights``), so at batch 1 it must cost little next to the products.
    """
    half = emit.f32(0.5)

    def kernels(b: ir.IRBuilder, k: ir.Value, width: int) -> None:
        taps = kernel_taps(b, w, k, width)
        halve = emit.splat(b, half, width)
        g = [taps[3 * r:3 * r + 3] for r in range(3)]
        gg = [g[0],  # G g: 4 rows of 3
              [b.fmul(b.fadd(b.fadd(g[0][s], g[1][s]), g[2][s]), halve) for s in range(3)],
              [b.fmul(b.fadd(b.fsub(g[0][s], g[1][s]), g[2][s]), halve) for s in range(3)],
              g[2]]
        for r in range(4):
            row = gg[r]
            out = [row[0],
                   b.fmul(b.fadd(b.fadd(row[0], row[1]), row[2]), halve),
                   b.fmul(b.fadd(b.fsub(row[0], row[1]), row[2]), halve),
                   row[2]]
            for s in range(4):
                emit.store(b, out[s], u, index(b, (4 * r + s) * p.m * p.c, k))

    vector_loop(b, 0, p.m * p.c, p.vw, kernels, name="uk")


def cache_floats(p: Plane, xi: int = 16) -> int:
    """The floats of a region ``cached_weights`` keeps: U (`xi` transforms of o x c), then the copy of the
    weights it was made from."""
    return aligned(xi * p.m * p.c) + aligned(9 * p.m * p.c)


def cached_weights(b: ir.IRBuilder, p: Plane, w: ir.Value, cache: ir.Value, transform=transform_weights,
                   xi: int = 16) -> ir.Value:
    """U (`transform` of the weights `w`, `xi` elements a kernel) from the region `cache` (``cache_floats``),
    transformed again first unless every weight has the bits of the copy kept there; returns U.

    The weights are copied first and U made from the copy: another thread may write `w` meanwhile (inference
    takes no lock), and U made from `w` itself could then belong to other bits than the copy kept beside it,
    a stale U that no later call would notice.
    """
    u, copy = cache, emit.gep(b, cache, aligned(xi * p.m * p.c), name="wino.copy")
    count = 9 * p.m * p.c
    with b.if_then(b.not_(_same_bits(b, w, copy, count, p.vw))):

        def keep(b: ir.IRBuilder, k: ir.Value, width: int) -> None:
            emit.store(b, emit.load(b, w, k, width), copy, k)

        vector_loop(b, 0, count, p.vw, keep, name="wk")
        transform(b, p, copy, u)
    return u


def _same_bits(b: ir.IRBuilder, x: ir.Value, y: ir.Value, count: int, vw: int) -> ir.Value:
    """Whether floats [0, count) of `x` and `y` have the same bits (an i1): the OR of their XORs is zero (an
    accumulator per width ``vector_loop`` runs at, so that the loop does no reduction)."""
    i32 = ir.IntType(32)
    words = {width: ir.VectorType(i32, width) if width > 1 else i32 for width in widths(vw)}
    acc = {width: local(b, ty, ir.Constant(ty, None), name=f"diff{width}") for width, ty in words.items()}

    def differ(b: ir.IRBuilder, k: ir.Value, width: int) -> None:
        bits = [b.bitcast(emit.load(b, v, k, width), words[width]) for v in (x, y)]
        b.store(b.or_(b.load(acc[width]), b.xor(*bits)), acc[width])

    vector_loop(b, 0, count, vw, differ, name="wcmp")
    same = ir.Constant(ir.IntType(1), 1)
    for width, ty in words.items():
        lanes = b.icmp_unsigned("==", b.load(acc[width]), ir.Constant(ty, None))
        if width > 1:  # every lane zero: the lanes' bits as one integer are all ones
            lanes = b.icmp_unsigned("==", b.bitcast(lanes, ir.IntType(width)), ir.Constant(ir.IntType(width), -1))
        same = b.and_(same, lanes)
    return same


def _bt(b: ir.IRBuilder, d: list[ir.Value]) -> list[ir.Value]:
    """B^T applied to four values: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)."""
    return [b.fsub(d[0], d[2]), b.fadd(d[1], d[2]), b.fsub(d[2], d[1]), b.fsub(d[1], d[3])]


def _at(b: ir.IRBuilder, m: list[ir.Value]) -> list[ir.Value]:
    """A^T applied to four values: (m0 + m1 + m2, m1 - m2 - m3)."""
    return [b.fadd(b.fadd(m[0], m[1]), m[2]), b.fsub(b.fsub(m[1], m[2]), m[3])]


def transform_input(b: ir.IRBuilder, p: Plane, pad: ir.Value, ty0: ir.Value, rows: int, v: ir.Value, cols: int,
                    col0: ir.Value | int) -> None:
    """V[xi, ci, col0 + r * tw + tx] = (B^T d B)[xi] for the 4x4 patch d of tile (ty0 + r, tx) of the padded plane,
    for the `rows` tile rows from `ty0`; V's rows are `cols` long (a block's tiles)."""
    tw = p.ow // 2
    with for_range(b, 0, p.c, name="vc") as ci:
        with for_range(b, 0, rows, name="vr") as r:
            top = index(b, (ci, p.hp * p.wp), (b.add(ty0, r), 2 * p.wp))  # the patch's first row in the plane
            first = index(b, (ci, cols), (r, tw), col0)

            def patch(b: ir.IRBuilder, tx: ir.Value, width: int, top=top, first=first) -> None:
                d = []
                for i in range(4):
                    at = index(b, top, i * p.wp, (tx, 2))
                    c0, c1 = emit.even_odd(b, pad, at, width)
                    c2, c3 = emit.even_odd(b, pad, b.add(at, i64(2)), width)
                    d.append(_bt(b, [c0, c1, c2, c3]))
                for j in range(4):
                    col = _bt(b, [d[0][j], d[1][j], d[2][j], d[3][j]])
                    for i in range(4):
                        emit.store(b, col[i], v, index(b, (4 * i + j) * xi_stride(p.c, cols), first, tx))

            vector_loop(b, 0, tw, p.vw, patch, name="vx")


def product(b: ir.IRBuilder, p: Plane, pad: ir.Value, u: ir.Value, ws: ir.Value, finish: Finish,
            tile_rows: tuple[int, int] | None = None) -> None:
    """Every output of the convolution of the padded plane `pad` with the transformed weights `u`, to `finish`
    (or those of tile rows [t0, t1): `tile_rows`, a thread's share of an image in ``infer_split``).

    ``finish(b, r, at, value, width)`` gets output channel r's values at the
    dense offsets ``at .. at + width - 1`` (``(r * oh + oy) * ow + ox``), as from
    ``conv_direct.each_output``. Blocks and tile rows are run-time loops, so the
    code does not grow with the map.
    """
    by_blocks(b, Blocks(p), tile_rows, lambda b, ty0, rows: _block(b, p, Blocks(p), pad, u, ws, ty0, rows, finish))


def by_blocks(b: ir.IRBuilder, blk: Blocks, tile_rows: tuple[int, int] | None, body) -> None:
    """``body(b, ty0, rows)`` over tile rows [t0, t1) (default: all) in blocks of ``blk.rows`` and a rest."""
    t0, t1 = tile_rows or (0, blk.th)
    full, rest = divmod(t1 - t0, blk.rows)
    if full:
        with for_range(b, 0, full, name="wb") as block:
            body(b, index(b, (block, blk.rows), t0), blk.rows)
    if rest:
        body(b, i64(t0 + full * blk.rows), rest)


def products(b: ir.IRBuilder, p: Plane, u: ir.Value, v: ir.Value, m: ir.Value, cols: int, tiles: int,
             xi_count: int = 16) -> None:
    """The `xi_count` products M_xi = U_xi @ V_xi over `tiles` columns (rows of V and M `cols` long): tiles of
    4 rows by up to 4 vectors of columns (2 on narrower targets: 16 registers), or 8 rows by one vector where
    there are fewer (an 8x8 map's 16 tiles)."""
    vectors = max(1, min(4 if p.vw >= 16 else 2, tiles // p.vw))
    with for_range(b, 0, xi_count, name="xi") as xi:
        u_xi = Mat(emit.gep(b, u, index(b, (xi, p.m * p.c))), rs=p.c)
        v_xi = Mat(emit.gep(b, v, index(b, (xi, xi_stride(p.c, cols)))), rs=cols)
        m_xi = emit.gep(b, m, index(b, (xi, xi_stride(p.m, cols))), name="m.xi")

        def keep(b: ir.IRBuilder, r: ir.Value, j: ir.Value, value: ir.Value, width: int, m_xi=m_xi) -> None:
            emit.store(b, value, m_xi, index(b, (r, cols), j))

        gemm_nn(b, p.m, tiles, p.c, u_xi, v_xi, keep, p.vw, mr=8 if vectors == 1 else 4, nrv=vectors)


def _block(b: ir.IRBuilder, p: Plane, blk: Blocks, pad: ir.Value, u: ir.Value, ws: ir.Value, ty0: ir.Value,
           rows: int, finish: Finish) -> None:
    """The `rows` tile rows from `ty0`: input transform, the 16 products, output transform."""
    v = ws
    m = emit.gep(b, ws, blk.v_floats, name="wino.m")
    tw, t = blk.tw, blk.cols
    transform_input(b, p, pad, ty0, rows, v, t, 0)
    products(b, p, u, v, m, t, rows * tw)
    # output transform: each 2x2 block of outputs
    with for_range(b, 0, p.m, name="yo") as oi:
        with for_range(b, 0, rows, name="yr") as r:
            first = index(b, (oi, t), (r, tw))
            out_row = index(b, (oi, p.oh * p.ow), (b.add(ty0, r), 2 * p.ow))  # the block's first output row

            def block(b: ir.IRBuilder, tx: ir.Value, width: int, oi=oi, first=first, out_row=out_row) -> None:
                at = index(b, first, tx)
                s = []
                for i in range(4):
                    s.append(_at(b, [emit.load(b, m, index(b, (4 * i + j) * blk.m_stride, at), width)
                                     for j in range(4)]))
                cols = [_at(b, [s[0][c], s[1][c], s[2][c], s[3][c]]) for c in range(2)]  # cols[c][row]
                for y in range(2):
                    out = index(b, out_row, y * p.ow, (tx, 2))
                    if width == 1:
                        finish(b, oi, out, cols[0][y], 1)
                        finish(b, oi, b.add(out, i64(1)), cols[1][y], 1)
                    else:
                        lo, hi = emit.interleave(b, cols[0][y], cols[1][y], width)
                        finish(b, oi, out, lo, width)
                        finish(b, oi, b.add(out, i64(width)), hi, width)

            vector_loop(b, 0, tw, p.vw, block, name="yx")


Image = tuple[int, int, int, int]  # the unpadded input: h, w, and the padding at its top and left


def product_images(b: ir.IRBuilder, p: Plane, image: Image, x: ir.Value, x_stride: int, u: ir.Value, ws: ir.Value,
                   finish_of, n0: ir.Value, n1: ir.Value) -> None:
    """Every output of images [n0, n1) of the unpadded input `x` (`x_stride` floats an image), where
    ``whole_images``: blocks of ``ImageBlocks.images`` images, then single images for the rest.

    ``finish_of(b, n)`` gives image n's ``finish`` (as ``product``'s).
    """
    blk = ImageBlocks(p)
    per = blk.images
    if per > 1:
        count = b.sub(n1, n0)
        full = b.add(n0, b.sub(count, b.srem(count, i64(per))), name="wi.full")
        with for_range(b, n0, full, per, name="wi.n") as n:
            _image_block(b, p, blk, image, x, x_stride, u, ws, finish_of, n, per)
        n0 = full
    with for_range(b, n0, n1, name="wi.one") as n:
        _image_block(b, p, blk, image, x, x_stride, u, ws, finish_of, n, 1)


def _image_block(b: ir.IRBuilder, p: Plane, blk: ImageBlocks, image: Image, x: ir.Value, x_stride: int,
                 u: ir.Value, ws: ir.Value, finish_of, n: ir.Value, images: int) -> None:
    """Images [n, n + images): their input transforms side by side in V, the 16 products, the output transforms."""
    v = ws
    m = emit.gep(b, ws, blk.v_floats, name="wi.m")
    t, per_image = blk.cols, p.vw
    with for_range(b, 0, images, name="wi.in") as g:
        x_img = emit.gep(b, x, index(b, (b.add(n, g), x_stride)), name="wi.x")
        _image_input(b, p, image, x_img, v, t, index(b, (g, per_image)))
    products(b, p, u, v, m, t, images * per_image)
    with for_range(b, 0, images, name="wi.out") as g:
        _image_output(b, p, m, t, index(b, (g, per_image)), finish_of(b, b.add(n, g)))


def _shuffle(b: ir.IRBuilder, value: ir.Value, other: ir.Value, lanes: list[int]) -> ir.Value:
    return b.shuffle_vector(value, other, ir.Constant(ir.VectorType(ir.IntType(32), len(lanes)), lanes))


def _image_input(b: ir.IRBuilder, p: Plane, image: Image, x_img: ir.Value, v: ir.Value, cols: int,
                 col0: ir.Value) -> None:
    """V[xi, ci, col0 + tile] = (B^T d B)[xi] for the 4x4 patch d of each tile of one image, as ``transform_input``
    computes it, with the patches taken from each whole channel by shuffles (zero lanes where they leave it)."""
    h, w, top, left = image
    tw = p.ow // 2
    zero = ir.Constant(ir.VectorType(emit.F32, h * w), None)

    def lanes(i: int, j: int) -> list[int]:
        out = []
        for tile in range(p.vw):
            y, x = 2 * (tile // tw) + i - top, 2 * (tile % tw) + j - left
            out.append(y * w + x if 0 <= y < h and 0 <= x < w else h * w)  # (h * w: the first lane of `zero`)
        return out

    with for_range(b, 0, p.c, name="wi.c") as ci:
        whole = b.load(emit.gep(b, x_img, index(b, (ci, h * w))), typ=zero.type, align=4)
        d = [_bt(b, [_shuffle(b, whole, zero, lanes(i, j)) for j in range(4)]) for i in range(4)]
        for j in range(4):
            col = _bt(b, [d[0][j], d[1][j], d[2][j], d[3][j]])
            for i in range(4):
                emit.store(b, col[i], v, index(b, (4 * i + j) * xi_stride(p.c, cols), (ci, cols), col0))


def _image_output(b: ir.IRBuilder, p: Plane, m: ir.Value, cols: int, col0: ir.Value, finish: Finish) -> None:
    """Each output channel of one image from M (columns col0 on), as ``_block``'s output transform computes it,
    the 2x2 blocks put back into rows by shuffles and handed to `finish` a vector at a time."""
    tw, vw = p.ow // 2, p.vw

    def source(o: int) -> int:
        """Where output o of the channel is in the tiles' four (y, x) output vectors joined ((y, x): part 2y + x)."""
        (ty, y), (tx, xx) = divmod(o // p.ow, 2), divmod(o % p.ow, 2)
        return (2 * y + xx) * vw + ty * tw + tx

    with for_range(b, 0, p.m, name="wi.o") as oi:
        at = index(b, (oi, cols), col0)
        s = [_at(b, [emit.load(b, m, index(b, (4 * i + j) * xi_stride(p.m, cols), at), vw) for j in range(4)])
             for i in range(4)]
        cols2 = [_at(b, [s[0][c], s[1][c], s[2][c], s[3][c]]) for c in range(2)]  # cols2[x][y]
        low = _shuffle(b, cols2[0][0], cols2[1][0], list(range(2 * vw)))  # parts 0, 1
        high = _shuffle(b, cols2[0][1], cols2[1][1], list(range(2 * vw)))  # parts 2, 3
        whole = _shuffle(b, low, high, list(range(4 * vw)))
        undef = ir.Constant(whole.type, ir.Undefined)
        for k in range(4):
            row = _shuffle(b, whole, undef, [source(k * vw + lane) for lane in range(vw)])
            finish(b, oi, index(b, (oi, p.oh * p.ow), k * vw), row, vw)
