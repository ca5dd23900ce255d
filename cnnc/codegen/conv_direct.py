"""Stride-1 convolution straight from a zero-padded copy of the image, with no im2col.

With the input copied into a ``c x hp x wp`` plane padded by zeros (``hp = oh +
kh - 1``, ``wp = ow + kw - 1``), output position ``(oy, ox)`` of tap ``(ky, kx)``
reads element ``(oy + ky) * wp + (ox + kx)`` of its channel's plane. Number the
outputs ``j = oy * wp + ox`` (rows as wide as the padded plane; the ``kw - 1``
columns past ``ow`` are computed and thrown away): then tap ``(ci, ky, kx)``
reads ``pad[ci * hp * wp + ky * wp + kx + j]`` for every ``j``, a contiguous run.
So ``out = W @ B`` with ``B[(ci, ky, kx), j] = pad[offset(ci, ky, kx) + j]`` is
a GEMM whose B panel is read straight from the padded image: each reduction
step loads a few unaligned vectors of it and broadcasts one weight per output
row (``product``). Compared with im2col (``kh * kw`` copies of the image
written and read back through the cache) this costs a copy of the image and of
the output, and the wasted columns (``(kw - 1) / wp`` of the work). When output
rows are whole vectors (CIFAR's 32 and 16 wide maps), tiles of whole rows skip
the wasted columns and store straight to the output (``product_rows``).

The same routine gives the gradient wrt the input: ``dx`` is the stride-1
convolution of ``dy`` padded by ``kh - 1 - pt`` (top) and ``kw - 1 - pl``
(left) with the weights flipped in both spatial axes and their channel axes
swapped, which the tiles read from the forward weights in place (``Weights``):
a training step calls it an image at a time, and a flipped copy per call was
2% of its time on a 64-channel 32x32 layer. The gradient wrt the weights is a product over the outputs instead:
``weight_product`` vectorised over output channels, ``dot_weight_product``
over output positions when there are few output channels.

Maps narrower than a vector (ResNet's 8x8) waste ``(kw - 1) / wp`` of
``product``'s work (20% at 8 wide) and copy the output. A ``shifted`` plane
instead holds ``kw`` copies of each channel, copy ``kx`` shifted left by
``kx`` columns, with rows exactly ``ow`` wide (zero where the shift leaves the
image): tap ``(ci, ky, kx)`` then reads ``ky * ow + j`` of copy ``(ci, kx)``
for output ``j = oy * ow + ox``, every output once (``product_shifted``), for
``kw`` times the copying.

Workspace (floats), each section rounded to a cache line: forward and input
gradient ``[pad][out: m x n][flipped weights, for Winograd: o * c * kh * kw]`` (``Plane``);
weight gradient ``GradSpace``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import for_range
from cnnc.codegen.gemm import Index, column_pieces, index, local, transpose, vector_loop, widths
from cnnc.codegen.plan import aligned


@dataclass(frozen=True)
class Plane:
    """A valid ``kh x kw`` convolution over ``c`` padded planes of ``hp x wp``, ``m`` output rows, vectors of ``vw``."""

    c: int
    hp: int
    wp: int
    kh: int
    kw: int
    m: int
    vw: int
    shifted: bool = False  # kw shifted copies of each channel, rows ow wide (product_shifted)

    @property
    def ch_stride(self) -> int:
        """Floats from one channel's padded plane (or its kw shifted copies) to the next."""
        return self.kw * self.hp * self.ow if self.shifted else self.hp * self.wp

    @property
    def ky_stride(self) -> int:
        return self.ow if self.shifted else self.wp

    @property
    def kx_stride(self) -> int:
        return self.hp * self.ow if self.shifted else 1

    @property
    def oh(self) -> int:
        return self.hp - self.kh + 1

    @property
    def ow(self) -> int:
        return self.wp - self.kw + 1

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    @property
    def n(self) -> int:
        """Output columns computed: whole padded rows (shifted: the outputs), rounded up to a vector."""
        return -(-self.oh * self.ky_stride // self.vw) * self.vw

    @property
    def pad_floats(self) -> int:
        if self.shifted:  # the last tap reads the last copy's last ow * oh floats, then up to a vector
            return aligned(self.c * self.ch_stride + self.n - self.oh * self.ow)
        # the last tap of the last column reads (kw - 1) + (n - oh * wp) floats past the planes
        return aligned(self.c * self.hp * self.wp + self.kw - 1 + self.n - self.oh * self.wp)

    @property
    def out_floats(self) -> int:
        return aligned(self.m * self.n)

    @property
    def weight_floats(self) -> int:
        """The flipped weights of the input-gradient convolution (the forward reads the weights in place)."""
        return aligned(self.m * self.c * self.taps)

    @property
    def floats(self) -> int:
        return self.pad_floats + self.out_floats + self.weight_floats


@dataclass(frozen=True)
class Weights:
    """Where a product reads the weight of output row r, channel ci, tap t = ky * kw + kx: float
    ``r * row + ci * channel + t`` of the weights, or ``... + taps - 1 - t`` when `flipped`."""

    row: int
    channel: int
    flipped: bool = False

    @staticmethod
    def forward(p: Plane) -> Weights:
        """``w[r, ci, ky, kx]`` as stored: the forward convolution's."""
        return Weights(p.c * p.taps, p.taps)

    @staticmethod
    def transposed(p: Plane) -> Weights:
        """The forward weights ``w[ci, r, kh - 1 - ky, kw - 1 - kx]``: the input gradient's on its plane `p`
        (``p.m`` rows: the forward's input channels; ``p.c`` channels: its output channels)."""
        return Weights(p.taps, p.m * p.taps, flipped=True)

    def first(self, b: ir.IRBuilder, p: Plane, r: Index, ci: Index, ky0: Index, kx0: Index = 0) -> ir.Value:
        """The offset of tap (ky0, kx0) of row r, channel ci."""
        if self.flipped:
            return index(b, (r, self.row), (ci, self.channel), (ky0, -p.kw), (kx0, -1), p.taps - 1)
        return index(b, (r, self.row), (ci, self.channel), (ky0, p.kw), kx0)

    def step(self, p: Plane, row: int, ky: int, kx: int) -> int:
        """The offset of tap (ky0 + ky, kx0 + kx) of row r + `row` from ``first(r, ci, ky0, kx0)``."""
        return row * self.row + (-1 if self.flipped else 1) * (ky * p.kw + kx)


def tile_rows(m: int, vw: int) -> int:
    """Output rows per register tile: the largest that divides `m` among those that fit the registers."""
    choices = (6, 4, 3, 2) if vw >= 16 else (4, 3, 2) if vw > 4 else (2,)
    for mr in choices:
        if m % mr == 0:
            return mr
    return choices[0] if m >= choices[0] else 1


def tile_vectors(mr: int, vw: int) -> int:
    """Vectors of output columns per tile, so that ``mr * nv`` accumulators plus loads fit the vector registers."""
    regs = 32 if vw >= 16 else 16
    return max(1, min(4, (regs - 4) // (mr + 1)))


def zero(b: ir.IRBuilder, base: ir.Value, lo: Index, hi: Index, vw: int, runs: bool = False) -> None:
    """base[lo:hi] = 0 (bounds may be run-time values); with `runs`, `hi` is a constant count of floats from `lo`
    (unrolled into vectors and narrower pieces)."""
    def body(b: ir.IRBuilder, t: ir.Value, width: int) -> None:
        emit.store(b, emit.splat(b, 0.0, width), base, index(b, lo, t) if runs else t)

    vector_loop(b, 0 if runs else lo, hi, vw, body, name="z")


def fill(b: ir.IRBuilder, p: Plane, src: ir.Value, h: int, w: int, top: int, left: int, pad: ir.Value,
         rows: tuple[Index, Index] | None = None, borders: bool = False) -> None:
    """Copy ``c`` planes of ``h x w`` from `src` into the padded planes at (top, left); the border stays zero.
    `rows`: only the source rows [y0, y1) of each plane (what a share of the output rows reads); run-time values
    only where the share reads no padded row above or below the image (no zeros written there).

    With `borders` the copy also writes the border's zeros, so that every float of the ``c`` planes is written
    (``zero_tail`` does the rest of the pad once per call): the zeros go to cache lines the copy writes anyway,
    where zeroing the whole pad first wrote it twice (~4 us of a 64-channel 32x32 image's ~700, paid per image when
    a training step calls a kernel an image at a time). With `rows` too, only the padded rows they fill, and the
    pad rows above or below where they reach the plane's edge: a share of the output rows reads no others.
    """
    y0, y1 = rows or (0, h)

    def zeros(at: ir.Value, count: int) -> None:
        if count > 0:
            zero(b, pad, at, count, p.vw, runs=True)

    plane = p.hp * p.wp
    with for_range(b, 0, p.c, name="pc") as ci:
        if borders and isinstance(y0, int) and y0 == 0:  # the rows above and the first row's left border
            zeros(index(b, (ci, plane)), top * p.wp + left)
        elif borders:  # the first row's left border
            zeros(index(b, (ci, plane), (y0, p.wp), top * p.wp), left)
        with for_range(b, y0, y1, name="py") as y:
            s = index(b, (ci, h * w), (y, w))
            d = index(b, (ci, plane), (y, p.wp), top * p.wp + left)

            def copy(b: ir.IRBuilder, t: ir.Value, width: int, s=s, d=d) -> None:
                emit.store(b, emit.load(b, src, index(b, s, t), width), pad, index(b, d, t))

            vector_loop(b, 0, w, p.vw, copy, name="px")
            if borders:  # this row's right border and the next row's left one (past the plane: zero_tail's)
                zeros(index(b, d, w), p.wp - w)
        # the rows below, but the left border of the first (with the last row's right one)
        if borders and isinstance(y1, int) and y1 == h:
            zeros(index(b, (ci, plane), (top + h) * p.wp + left), plane - (top + h) * p.wp - left)


def zero_tail(b: ir.IRBuilder, p: Plane, pad: ir.Value) -> None:
    """Zero what the tiles read past the ``c`` planes (``pad_floats``): with ``fill(..., borders=True)`` the whole
    pad is then written."""
    zero(b, pad, p.c * p.hp * p.wp, p.pad_floats, p.vw)


def shifts_fit(p: Plane) -> bool:
    """Whether `p` (rows not in whole vectors) runs faster on shifted copies: no thrown-away columns and no copy
    of the output, for kw copies of the input (LeNet's C1 and C3 too: their products are 150 and 60 x 25
    multiply-adds an output for 5 copies of an input)."""
    return p.kw > 1 and p.ow % p.vw != 0


def fill_shifted(b: ir.IRBuilder, p: Plane, src: ir.Value, h: int, w: int, top: int, left: int,
                 pad: ir.Value) -> None:
    """The kw shifted copies of ``c`` planes of ``h x w`` from `src`: copy kx of row y at column x holds
    ``src[y - top, x + kx - left]``; what falls outside the image is never written (zeroed once per call)."""
    with for_range(b, 0, p.c, name="sc") as ci:
        for kx in range(p.kw):
            lo, hi = max(0, left - kx), min(p.ow, w + left - kx)  # the columns inside the image
            if hi <= lo:
                continue
            with for_range(b, 0, h, name="sy") as y:
                s = index(b, (ci, h * w), (y, w), kx - left)
                d = index(b, (ci, p.ch_stride), kx * p.kx_stride, (y, p.ow), top * p.ow)

                def copy(b: ir.IRBuilder, t: ir.Value, width: int, s=s, d=d) -> None:
                    emit.store(b, emit.load(b, src, index(b, s, t), width), pad, index(b, d, t))

                vector_loop(b, lo, hi, p.vw, copy, name="sx")


def shifted_tile(m: int, vecs: int, vw: int) -> tuple[int, int]:
    """(output rows, vectors) of ``product_shifted``'s tile: the most accumulators that, with a register per
    vector of input, fit the vector registers, the vectors dividing `vecs` (every tile alike), rows at most 6."""
    regs = (32 if vw >= 16 else 16) - 4
    options = [(mr, nv) for nv in range(1, min(vecs, 8) + 1) if vecs % nv == 0
               for mr in range(1, min(m, 6) + 1) if nv * (mr + 1) <= regs]
    return max(options, key=lambda t: (t[0] * t[1], m % t[0] == 0, t[1]))


def product_shifted(b: ir.IRBuilder, p: Plane, pad: ir.Value, weights: ir.Value, finish: Finish,
                    connected: frozenset[tuple[int, int]] | None = None) -> None:
    """The sums of ``product`` on a shifted plane, each output once, handed to ``finish(b, r, at, value, width)``
    (``at = r * oh * ow + j``: the outputs are numbered as stored).

    The last vector of a row may pass its ``oh * ow`` outputs (LeNet's C3: 100 = 6 x 16 + 4): its lanes
    beyond them are left out of the store, in pieces of narrower vectors. With `connected` (a connect table)
    the row tiles and channels are unrolled and the pairs outside the table left out, as in ``product``.
    """
    vw = p.vw
    total = p.oh * p.ow
    vecs = p.n // vw
    mr, nv = shifted_tile(p.m, vecs, vw)
    step = nv * vw
    tail = total % vw != 0  # the last tile column ends in a partial vector: unrolled after the loop

    def column(j: ir.Value | int, last: bool) -> None:
        def tile(r, rows, live) -> None:
            offsets = [v * vw for v in range(nv)]
            accs = _tile(b, p, pad, weights, Weights.forward(p), r, emit.i64(j) if isinstance(j, int) else j, rows,
                         offsets, live, tap_loop=connected is not None)
            for row in range(rows):
                for v, off in enumerate(offsets):
                    at = index(b, (r, total), row * total, j, off)
                    value, first = accs[row][v], (vecs - nv + v) * vw if last else None
                    if first is None or first + vw <= total:
                        finish(b, index(b, r, row), at, value, vw)
                        continue
                    lo = 0
                    for width in widths(vw)[1:]:
                        if lo + width <= total - first:
                            part = b.shuffle_vector(value, value, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                                              list(range(lo, lo + width))))
                            finish(b, index(b, r, row), index(b, at, lo), part if width > 1 else
                                   b.extract_element(part, emit.i64(0)), width)
                            lo += width

        _each_row_tile(b, p, mr, connected, tile)

    loop_end = p.n - step if tail else p.n
    if loop_end > 0:
        with for_range(b, 0, loop_end, step, name="j") as j:
            column(j, False)
    if tail:
        column(loop_end, True)


def _row_pieces(m: int, mr: int) -> list[tuple[int, int]]:
    full = m - m % mr
    return [(lo, lo + mr) for lo in range(0, full, mr)] + [(lo, lo + 1) for lo in range(full, m)]


def channel_rows(connected: frozenset[tuple[int, int]], c: int, lo: int, hi: int) -> list[tuple[int, list[int]]]:
    """For the rows [lo, hi) of a tile: each channel with a nonzero weight in it, and those rows (from 0)."""
    live = [(ci, [r - lo for r in range(lo, hi) if (r, ci) in connected]) for ci in range(c)]
    return [(ci, rows) for ci, rows in live if rows]


def _each_row_tile(b: ir.IRBuilder, p: Plane, mr: int, connected, body) -> None:
    """Call ``body(r, rows, live)`` for every tile of output rows: a runtime loop, or unrolled with a table."""
    if connected is not None:
        for lo, hi in _row_pieces(p.m, mr):
            body(lo, hi - lo, channel_rows(connected, p.c, lo, hi))
        return
    full = p.m - p.m % mr
    for rlo, rhi, rows in ((0, full, mr), (full, p.m, 1)):
        if rhi > rlo:
            with for_range(b, rlo, rhi, rows, name="r") as r:
                body(r, rows, None)


def product(b: ir.IRBuilder, p: Plane, pad: ir.Value, weights: ir.Value, out: ir.Value,
            connected: frozenset[tuple[int, int]] | None = None, layout: Weights | None = None) -> None:
    """``out[r, j] = sum over (ci, ky, kx) of weights[r, ci, ky, kx] * pad[ci, ky * wp + kx + j]`` for r < m, j < n.

    With `connected` (the (r, ci) pairs whose weights may be nonzero: a connect
    table) the row tiles and channels are unrolled, and the multiply-adds of
    the other pairs are left out; LeNet's C3 table spares 37.5% of them.
    `layout`: where the weights lie (default ``Weights.forward``).
    """
    vw = p.vw
    layout = layout or Weights.forward(p)
    mr = tile_rows(p.m, vw)
    most = tile_vectors(mr, vw)
    # a tile width that divides the columns, if one is not much narrower: one variant of the tile to compile
    nv = next((v for v in range(most, max(1, most - 1) - 1, -1) if (p.n // vw) % v == 0), most)
    full = p.n - p.n % (nv * vw)
    for jlo, jhi, vecs in ((0, full, nv), (full, p.n, 1)):
        if jhi <= jlo:
            continue
        with for_range(b, jlo, jhi, vecs * vw, name="j") as j:
            def tile(r, rows, live, j=j, vecs=vecs) -> None:
                offsets = [v * vw for v in range(vecs)]
                accs = _tile(b, p, pad, weights, layout, r, j, rows, offsets, live)
                for row in range(rows):
                    for v, off in enumerate(offsets):
                        emit.store(b, accs[row][v], out, index(b, (r, p.n), row * p.n, j, off))

            _each_row_tile(b, p, mr, connected, tile)


Finish = Callable[[ir.IRBuilder, ir.Value, ir.Value, ir.Value, int], None]


def rows_fit(p: Plane) -> bool:
    """Whether output rows are whole vectors, so that tiles can skip the thrown-away columns (product_rows)."""
    return p.ow % p.vw == 0


def row_tile_shape(p: Plane) -> tuple[int, int, int]:
    """``product_rows``' tile: (output channels, vectors along an output row, output rows)."""
    mr = tile_rows(p.m, p.vw)
    want = tile_vectors(mr, p.vw)
    per_row = p.ow // p.vw
    across = next(v for v in (4, 3, 2, 1) if v <= want and per_row % v == 0)  # vectors along a row
    down = max(1, want // across) if across == per_row else 1  # output rows per tile
    return mr, across, down


def product_rows(b: ir.IRBuilder, p: Plane, pad: ir.Value, weights: ir.Value, finish: Finish,
                 connected: frozenset[tuple[int, int]] | None = None, layout: Weights | None = None,
                 oy_range: tuple[Index, Index] | None = None) -> None:
    """The same sums as ``product`` for the valid outputs only, handed to ``finish(b, r, at, value, width)``.

    Needs ``rows_fit``: a tile is a few output rows by vectors of whole rows
    (CIFAR's 32 and 16 wide maps), so no column is computed to be thrown away
    and no copy of the output is needed. `oy_range`: only the output rows
    [oy0, oy1), both multiples of the tile's rows (``row_tile_shape``), which
    must divide ``oh``; each output is the same sum as in a whole image's call.
    """
    vw = p.vw
    layout = layout or Weights.forward(p)
    mr, across, down = row_tile_shape(p)
    full = p.oh - p.oh % down
    bands = ((0, full, down), (full, p.oh, 1))
    if oy_range is not None:
        assert full == p.oh, (p, down)
        bands = ((*oy_range, down),)
    for ylo, yhi, ys in bands:
        if isinstance(yhi, int) and isinstance(ylo, int) and yhi <= ylo:
            continue
        with for_range(b, ylo, yhi, ys, name="oy") as oy:
            with for_range(b, 0, p.ow, across * vw, name="ox") as ox:
                def tile(r, rows, live, oy=oy, ox=ox, ys=ys) -> None:
                    offsets = [dy * p.wp + v * vw for dy in range(ys) for v in range(across)]
                    accs = _tile(b, p, pad, weights, layout, r, index(b, (oy, p.wp), ox), rows, offsets, live)
                    for row in range(rows):
                        for i, (dy, v) in enumerate((dy, v) for dy in range(ys) for v in range(across)):
                            at = index(b, (r, p.oh * p.ow), row * p.oh * p.ow, (oy, p.ow), dy * p.ow, ox, v * vw)
                            finish(b, index(b, r, row), at, accs[row][i], vw)

                _each_row_tile(b, p, mr, connected, tile)


def _tile(b: ir.IRBuilder, p: Plane, pad: ir.Value, weights: ir.Value, layout: Weights, r: ir.Value | int,
          j: ir.Value, rows: int, offsets: list[int], live: list[tuple[int, list[int]]] | None,
          tap_loop: bool = False) -> list[list[ir.Value]]:
    """The sums of one tile: `rows` output rows by vectors at ``j + offsets`` of the plane, weights at `layout`.

    `live`: the channels to reduce over and each one's nonzero rows (None: all of them, in a runtime loop).
    `tap_loop`: one tap per iteration of loops over kernel rows and columns, rather than whole kernels or rows
    unrolled (a table's unrolled channels times wide tiles would be thousands of FMAs of code to compile).
    """
    vw = p.vw
    zero_v = emit.splat(b, 0.0, vw)
    accs = [[local(b, emit.vec_type(vw), zero_v) for _ in offsets] for _ in range(rows)]
    # unroll whole kernels up to 16 taps, else one kernel row per iteration (more steps spill registers)
    if tap_loop:
        inner = [(0, 0)]
    elif p.taps <= 16:
        inner = [(ky, kx) for ky in range(p.kh) for kx in range(p.kw)]
    else:
        inner = [(0, kx) for kx in range(p.kw)]

    def steps(b: ir.IRBuilder, ci: ir.Value | int, ky0: ir.Value | int, tile_rows: list[int],
              kx0: ir.Value | int = 0) -> None:
        # base pointers, then constant offsets: no address arithmetic per load (less for LLVM to clean up)
        x0 = emit.gep(b, pad, index(b, (ci, p.ch_stride), (ky0, p.ky_stride), (kx0, p.kx_stride), j))
        w0 = emit.gep(b, weights, layout.first(b, p, r, ci, ky0, kx0))
        # the sums stay SSA values through the unrolled steps: one load and one store each per loop body
        sums = {row: [b.load(acc) for acc in accs[row]] for row in tile_rows}
        for ky, kx in inner:
            xs = [emit.load(b, x0, ky * p.ky_stride + kx * p.kx_stride + off, vw) for off in offsets]
            for row in tile_rows:
                a = emit.broadcast(b, w0, layout.step(p, row, ky, kx), vw)
                sums[row] = [emit.fma(b, a, x, acc) for x, acc in zip(xs, sums[row])]
        for row in tile_rows:
            for acc, value in zip(accs[row], sums[row]):
                b.store(value, acc)

    def over_taps(ci: ir.Value | int, tile_rows: list[int]) -> None:
        if tap_loop:
            with for_range(b, 0, p.kh, name="ky") as ky, for_range(b, 0, p.kw, name="kx") as kx:
                steps(b, ci, ky, tile_rows, kx)
        elif p.taps > 16:
            with for_range(b, 0, p.kh, name="ky") as ky:
                steps(b, ci, ky, tile_rows)
        else:
            steps(b, ci, 0, tile_rows)

    if live is None:
        with for_range(b, 0, p.c, name="ci") as ci:
            over_taps(ci, list(range(rows)))
    else:
        for ci, tile_rows in live:
            over_taps(ci, tile_rows)
    return [[b.load(acc) for acc in row] for row in accs]


def each_output(b: ir.IRBuilder, p: Plane, out: ir.Value, finish: Finish) -> None:
    """Call ``finish(b, r, at, value, width)`` for each run of valid outputs of ``out``.

    `at` is the dense offset ``(r * oh + oy) * ow + ox`` of the run's first
    output and `value` its `width` lanes (the thrown-away columns are skipped).
    """
    with for_range(b, 0, p.m, name="fr") as r:
        with for_range(b, 0, p.oh, name="fy") as oy:
            src = index(b, (r, p.n), (oy, p.wp))
            dst = index(b, (r, p.oh * p.ow), (oy, p.ow))

            def body(b: ir.IRBuilder, ox: ir.Value, width: int, r=r, src=src, dst=dst) -> None:
                finish(b, r, index(b, dst, ox), emit.load(b, out, index(b, src, ox), width), width)

            vector_loop(b, 0, p.ow, p.vw, body, name="fx")


def flipped(b: ir.IRBuilder, o: int, c: int, kh: int, kw: int, w: ir.Value, out: ir.Value) -> None:
    """out[ci, oi, ky, kx] = w[oi, ci, kh - 1 - ky, kw - 1 - kx]: the weights of the input-gradient convolution."""
    taps = kh * kw
    with for_range(b, 0, o, name="fo") as oi:
        with for_range(b, 0, c, name="fc") as ci:
            s = index(b, (oi, c * taps), (ci, taps))
            d = index(b, (ci, o * taps), (oi, taps))
            for t in range(taps):
                emit.store(b, emit.load(b, w, index(b, s, taps - 1 - t)), out, index(b, d, t))


def sections(b: ir.IRBuilder, p: Plane, ws: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """The workspace's pad, out and weight sections."""
    return (ws, emit.gep(b, ws, p.pad_floats, name="out"), emit.gep(b, ws, p.pad_floats + p.out_floats, name="wt"))


Ahead = tuple[tuple[ir.Value, int], ...] | list[tuple[ir.Value, int]]
LINE = 16  # floats in a cache line


def prefetching(ahead: Ahead, steps: int) -> Callable[[ir.IRBuilder, ir.Value], None]:
    """``fetch(b, step)``: prefetch step `step`'s share (of `steps`) of each ``(base, floats)`` region of `ahead`.

    Called once per iteration of a loop nest that computes one image, it
    spreads the next image's data over that work, so that it is in the cache
    when the next image is copied in rather than waited for then (the weight
    gradient's copy of x and transpose of dy, from memory, were ~5% of it on
    a 64-channel 32x32 layer, ~2% with this).
    """
    def fetch(b: ir.IRBuilder, step: ir.Value) -> None:
        for base, floats in ahead:
            total = -(-floats // LINE)
            lines = -(-total // steps)
            first = b.mul(step, emit.i64(lines * LINE))
            for k in range(lines):
                emit.prefetch(b, base, b.add(first, emit.i64(k * LINE)) if k else first)

    return fetch


# --- gradient wrt the weights ------------------------------------------------------------------------


@dataclass(frozen=True)
class GradSpace:
    """Workspace of the weight gradient on the padded plane `p` (``p.m`` output channels): ``[pad][dy][sums]``.

    Vectorised over output channels (``weight_product``), when there are at
    least half a vector of them: dy^T, ``n x m`` (the rows of thrown-away
    columns unused), and dW^T, ``(c * taps) x m``. Over positions
    (``dot_weight_product``): dy on the plane's columns, ``m`` rows of ``n``
    (zero past each output row), and a vector of partial sums per weight, laid
    out like dW; they stay vectors across the batch and are reduced across
    lanes once per call.
    """

    p: Plane

    @property
    def over_channels(self) -> bool:
        return 2 * self.p.m >= self.p.vw

    @property
    def dy_floats(self) -> int:
        return aligned(self.p.n * self.p.m)

    @property
    def sum_floats(self) -> int:
        return aligned(self.p.c * self.p.taps * self.p.m) * (1 if self.over_channels else self.p.vw)

    @property
    def floats(self) -> int:
        return self.p.pad_floats + self.dy_floats + self.sum_floats

    def sections(self, b: ir.IRBuilder, ws: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        return (ws, emit.gep(b, ws, self.p.pad_floats, name="dy.ws"),
                emit.gep(b, ws, self.p.pad_floats + self.dy_floats, name="sums"))


def transpose_dy(b: ir.IRBuilder, p: Plane, dy: ir.Value, dyt: ir.Value) -> None:
    """dyt[oy * wp + ox, r] = dy[r, oy, ox] for the valid outputs (weight_product reads no other rows): blocks of
    a vector's width of channels by an output row transposed through registers (``gemm.transpose``).

    A block of channels runs down the whole map before the next: its rows are read as that many sequential
    streams (all channels at once, 64 streams a plane apart, took a third longer, from the cache or memory).
    """
    full = p.m - p.m % p.vw

    def rows(r0: Index, count: int) -> None:
        with for_range(b, 0, p.oh, name="ty") as oy:
            src = emit.gep(b, dy, index(b, (r0, p.oh * p.ow), (oy, p.ow)))
            dst = emit.gep(b, dyt, index(b, (oy, p.wp * p.m), r0))
            transpose(b, src, count, p.ow, dst, p.vw, src_rs=p.oh * p.ow, dst_rs=p.m)

    if full:
        with for_range(b, 0, full, p.vw, name="tr") as r0:
            rows(r0, p.vw)
    if p.m > full:
        rows(full, p.m - full)


def weight_product(b: ir.IRBuilder, p: Plane, pad: ir.Value, dyt: ir.Value, dwt: ir.Value,
                   ahead: Ahead = ()) -> None:
    """``dwt[(ci, ky, kx), r] += sum over j of pad[ci, ky * wp + kx + j] * dyt[j, r]``.

    Vectorised over output channels r: a tile is up to two vectors of r by a
    channel's taps (as many kernel rows of them as the registers hold), and the
    reduction runs over the valid outputs j (not the thrown-away columns).
    `ahead`: memory the next image reads (``prefetching``), brought into the cache a little per output row.
    """
    regs = (32 if p.vw >= 16 else 16) - 4  # accumulators; the rest hold loads
    nv = min(2, -(-p.m // p.vw))
    taps_per_tile = p.taps if p.taps * nv <= regs else max(1, regs // (nv * p.kw)) * p.kw
    rows = [(ky, kx) for ky in range(p.kh) for kx in range(p.kw)]
    groups = [rows[i:i + taps_per_tile] for i in range(0, p.taps, taps_per_tile)]
    fetch = prefetching(ahead, p.c * p.oh) if ahead else None  # step ci * oh + oy: in the first tile's rows
    with for_range(b, 0, p.c, name="wc") as ci:
        for jlo, jhi, vecs, width in column_pieces(p.m, p.vw, nv):
            with for_range(b, jlo, jhi, vecs * width, name="wr") as r0:
                for i, group in enumerate(groups):
                    _weight_tile(b, p, pad, dyt, dwt, ci, r0, group, vecs, width, fetch if i == 0 else None)


def _weight_tile(b: ir.IRBuilder, p: Plane, pad: ir.Value, dyt: ir.Value, dwt: ir.Value, ci: ir.Value,
                 r0: ir.Value, taps: list[tuple[int, int]], vecs: int, width: int,
                 fetch: Callable[[ir.IRBuilder, ir.Value], None] | None = None) -> None:
    ty = emit.vec_type(width) if width > 1 else emit.F32
    zero_v = emit.splat(b, 0.0, width)
    accs = [[local(b, ty, zero_v) for _ in range(vecs)] for _ in taps]
    plane = index(b, (ci, p.hp * p.wp))
    with for_range(b, 0, p.oh, name="wy") as oy:
        if fetch is not None:
            fetch(b, index(b, (ci, p.oh), oy))
        with for_range(b, 0, p.ow, name="wx") as ox:
            j = index(b, (oy, p.wp), ox)
            dy0 = emit.gep(b, dyt, index(b, (j, p.m), r0))
            dys = [emit.load(b, dy0, v * width, width) for v in range(vecs)]
            x0 = emit.gep(b, pad, index(b, plane, j))
            for t, (ky, kx) in enumerate(taps):
                a = emit.broadcast(b, x0, ky * p.wp + kx, width)
                sums = [emit.fma(b, a, dy, b.load(acc)) for dy, acc in zip(dys, accs[t])]
                for acc, value in zip(accs[t], sums):
                    b.store(value, acc)
    for t, (ky, kx) in enumerate(taps):
        k = index(b, (ci, p.taps), ky * p.kw + kx)
        for v in range(vecs):
            at = index(b, (k, p.m), r0, v * width)
            emit.store(b, b.fadd(emit.load(b, dwt, at, width), b.load(accs[t][v])), dwt, at)


# --- gradient wrt the weights, for few output channels -------------------------------------------


def spread_dy(b: ir.IRBuilder, p: Plane, dy: ir.Value, dyp: ir.Value) -> None:
    """dyp[r, oy * wp + ox] = dy[r, oy, ox]: dy on the padded plane's columns (the others stay zero)."""
    with for_range(b, 0, p.m, name="sr") as r:
        with for_range(b, 0, p.oh, name="sy") as oy:
            s = index(b, (r, p.oh * p.ow), (oy, p.ow))
            d = index(b, (r, p.n), (oy, p.wp))

            def copy(b: ir.IRBuilder, t: ir.Value, width: int, s=s, d=d) -> None:
                emit.store(b, emit.load(b, dy, index(b, s, t), width), dyp, index(b, d, t))

            vector_loop(b, 0, p.ow, p.vw, copy, name="sx")


def dot_weight_product(b: ir.IRBuilder, p: Plane, pad: ir.Value, dyp: ir.Value, sums: ir.Value) -> None:
    """``sums[r, (ci, ky, kx)] += lanes of sum over j of dyp[r, j] * pad[ci, ky * wp + kx + j]`` (vectors of j).

    A tile is every output channel (at most half a vector of them) by a few taps.
    """
    regs = (32 if p.vw >= 16 else 16) - 4
    per_tile = max(1, min(p.taps, regs // p.m - 1))
    taps = [(ky, kx) for ky in range(p.kh) for kx in range(p.kw)]
    with for_range(b, 0, p.c, name="dc") as ci:
        for first in range(0, p.taps, per_tile):
            _dot_tile(b, p, pad, dyp, sums, ci, taps[first:first + per_tile], first)


def _dot_tile(b: ir.IRBuilder, p: Plane, pad: ir.Value, dyp: ir.Value, sums: ir.Value, ci: ir.Value,
              taps: list[tuple[int, int]], first: int) -> None:
    vw = p.vw
    zero_v = emit.splat(b, 0.0, vw)
    accs = [[local(b, emit.vec_type(vw), zero_v) for _ in taps] for _ in range(p.m)]
    plane = index(b, (ci, p.hp * p.wp))
    with for_range(b, 0, p.n, vw, name="dj") as j:
        dy0, x0 = emit.gep(b, dyp, j), emit.gep(b, pad, index(b, plane, j))
        dys = [emit.load(b, dy0, r * p.n, vw) for r in range(p.m)]
        for t, (ky, kx) in enumerate(taps):
            xs = emit.load(b, x0, ky * p.wp + kx, vw)
            for r in range(p.m):
                b.store(emit.fma(b, dys[r], xs, b.load(accs[r][t])), accs[r][t])
    for r in range(p.m):
        for t in range(len(taps)):
            at = index(b, (ci, p.taps * vw), r * p.c * p.taps * vw, (first + t) * vw)
            emit.store(b, b.fadd(emit.load(b, sums, at, vw), b.load(accs[r][t])), sums, at)
