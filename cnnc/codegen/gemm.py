"""Register-blocked matrix-multiply loops shared by the convolution and dense kernels.

Two shapes of product cover every kernel:

- ``gemm_nn``: ``C[i, j] = sum_k A[i, k] * B[k, j]`` where ``B``'s rows are
  contiguous in ``j``. A tile is ``mr`` rows by ``nrv`` vectors of ``j``; each
  step of ``k`` loads ``nrv`` vectors of ``B``, broadcasts ``mr`` scalars of
  ``A`` and issues ``mr * nrv`` FMAs.
- ``gemm_nt``: ``C[i, j] = sum_k A[i, k] * B[j, k]`` where both rows are
  contiguous in ``k`` (dot products). A tile is ``mr`` rows of ``A`` by ``nr``
  rows of ``B``, vectorised over ``k`` and summed across lanes at the end.

Columns (``gemm_nn``) and the reduction (``gemm_nt``) are static; the tail that
is not a multiple of the vector width is covered by narrower vectors (``vw/2``,
``vw/4`` ... down to scalars). Rows and, for ``gemm_nn``, the reduction length may
be runtime values (the batch range). Accumulators live in entry-block allocas,
which LLVM's SROA turns into registers; the multiply-adds are ``emit.fma`` (``llvm.fmuladd``).

Neither routine stores anything itself: ``epilogue(b, i, j, value, width)`` is
called for each finished ``width``-lane piece (width 1: a scalar) of row ``i``
starting at column ``j``, and decides what to do with it (bias, activation,
overwrite or accumulate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import for_range, i64

Index = int | ir.Value
Epilogue = Callable[[ir.IRBuilder, ir.Value, ir.Value, ir.Value, int], None]


@dataclass(frozen=True)
class Mat:
    """A strided 2-D view of floats: element (i, j) is ``base[i * rs + j * cs]``."""

    base: ir.Value
    rs: int
    cs: int = 1


def index(b: ir.IRBuilder, *terms: Index | tuple[Index, int]) -> ir.Value:
    """The i64 sum of `terms`, each a value or a ``(value, scale)`` pair; Python ints are folded."""
    const = 0
    parts: list[ir.Value] = []
    for term in terms:
        value, scale = term if isinstance(term, tuple) else (term, 1)
        if isinstance(value, int):
            const += value * scale
        elif scale == 1:
            parts.append(value)
        elif scale != 0:
            parts.append(b.mul(value, i64(scale)))
    total = parts[0] if parts else i64(const)
    for p in parts[1:]:
        total = b.add(total, p)
    if parts and const:
        total = b.add(total, i64(const))
    return total


def local(b: ir.IRBuilder, ty: ir.Type, init: ir.Value, name: str = "acc") -> ir.Value:
    """An entry-block stack slot holding `init` (stored at the current position)."""
    with b.goto_entry_block():
        slot = b.alloca(ty, name=name)
    b.store(init, slot)
    return slot


def widths(vw: int) -> list[int]:
    """vw, vw/2, ..., 1: the vector widths used for a tail."""
    out = []
    w = vw
    while w >= 1:
        out.append(w)
        w //= 2
    return out


def column_pieces(n: int, vw: int, nvec: int) -> list[tuple[int, int, int, int]]:
    """Cover ``[0, n)`` by ``(lo, hi, nvec, width)`` loops: blocks of `nvec` vectors, single vectors, narrower ones."""
    pieces = []
    main = n - n % (nvec * vw)
    if main:
        pieces.append((0, main, nvec, vw))
    pos = main
    for w in widths(vw):
        count = (n - pos) // w
        if count:
            pieces.append((pos, pos + count * w, 1, w))
            pos += count * w
    return pieces


def row_pieces(b: ir.IRBuilder, m: Index, mr: int) -> list[tuple[Index, Index, int]]:
    """Cover ``[0, m)`` by ``(lo, hi, rows)`` loops: blocks of `mr` rows, then single rows (m may be runtime)."""
    if isinstance(m, int):
        full = m - m % mr
        pieces = [(0, full, mr), (full, m, 1)]
        return [p for p in pieces if p[1] > p[0]]
    if mr == 1:
        return [(0, m, 1)]
    full = b.sub(m, b.srem(m, i64(mr)), name="m.full")
    return [(0, full, mr), (full, m, 1)]


def _splat_load(b: ir.IRBuilder, base: ir.Value, off: ir.Value, width: int) -> ir.Value:
    return emit.splat(b, emit.load(b, base, off), width)


def gemm_nn(
    b: ir.IRBuilder, m: Index, n: int, k: Index, a: Mat, bmat: Mat, epilogue: Epilogue, vw: int,
    mr: int = 4, nrv: int | None = None, rows_outside: bool = False,
) -> None:
    """``C = A @ B`` (A: m x k, B: k x n with unit column stride), handed to `epilogue` in vector pieces.

    The default tile is 4 x 3 vectors (12 accumulators); 4 x 2 at width 4 (SSE:
    16 registers and no FMA, so a multiply needs a temporary). ``rows_outside``:
    each tile of rows across all the columns before the next, for an epilogue
    that reads and writes a C larger than the cache (a wide dense layer's
    weight gradient): C's rows then stream in order, prefetched.
    """
    assert bmat.cs == 1
    nrv = nrv or (3 if vw > 4 else 2)
    if rows_outside:
        for ilo, ihi, rows in row_pieces(b, m, mr):
            with for_range(b, ilo, ihi, rows, name="i") as i:
                for jlo, jhi, nvec, width in column_pieces(n, vw, nrv):
                    with for_range(b, jlo, jhi, nvec * width, name="j") as j:
                        _nn_tile(b, i, j, rows, nvec, width, k, a, bmat, epilogue)
        return
    # columns outside, rows inside: one k x (nvec*width) panel of B stays in cache while every row tile uses it
    for jlo, jhi, nvec, width in column_pieces(n, vw, nrv):
        with for_range(b, jlo, jhi, nvec * width, name="j") as j:
            for ilo, ihi, rows in row_pieces(b, m, mr):
                with for_range(b, ilo, ihi, rows, name="i") as i:
                    _nn_tile(b, i, j, rows, nvec, width, k, a, bmat, epilogue)


def _nn_tile(
    b: ir.IRBuilder, i: ir.Value, j: ir.Value, rows: int, nvec: int, width: int, k: Index,
    a: Mat, bmat: Mat, epilogue: Epilogue,
) -> None:
    ty = emit.vec_type(width) if width > 1 else emit.F32
    zero = emit.splat(b, 0.0, width)
    accs = [[local(b, ty, zero) for _ in range(nvec)] for _ in range(rows)]
    with for_range(b, 0, k, name="k") as kk:
        b_row = index(b, (kk, bmat.rs), j)
        bv = [emit.load(b, bmat.base, index(b, b_row, v * width), width) for v in range(nvec)]
        for r in range(rows):
            av = _splat_load(b, a.base, index(b, (i, a.rs), r * a.rs, (kk, a.cs)), width)
            for v in range(nvec):
                b.store(emit.fma(b, av, bv[v], b.load(accs[r][v])), accs[r][v])
    for r in range(rows):
        row = index(b, i, r)
        for v in range(nvec):
            epilogue(b, row, index(b, j, v * width), b.load(accs[r][v]), width)


def gemm_nt(
    b: ir.IRBuilder, m: Index, n: int, k: int, a: Mat, bmat: Mat, epilogue: Epilogue, vw: int,
    mr: int | None = None, nr: int = 4, b_outside: bool = False,
) -> None:
    """``C = A @ B.T`` (A: m x k, B: n x k, both with unit column stride), handed to `epilogue` as scalars.

    The default tile is 3 x 4 dot products (2 x 4 at width 4, for SSE's 16 registers). Rows of A outside:
    B is read once per tile of A's rows; ``b_outside``: the other way round, for a B much larger than the
    cache that A fits in (a wide dense layer's weights: read once per call, not once per few images).
    """
    assert a.cs == 1 and bmat.cs == 1
    mr = mr or (3 if vw > 4 else 2)
    if b_outside:
        for jlo, jhi, cols in row_pieces(b, n, nr):
            with for_range(b, jlo, jhi, cols, name="j") as j:
                for ilo, ihi, rows in row_pieces(b, m, mr):
                    with for_range(b, ilo, ihi, rows, name="i") as i:
                        _nt_tile(b, i, j, rows, cols, k, a, bmat, epilogue, vw)
        return
    for ilo, ihi, rows in row_pieces(b, m, mr):
        with for_range(b, ilo, ihi, rows, name="i") as i:
            for jlo, jhi, cols in row_pieces(b, n, nr):
                with for_range(b, jlo, jhi, cols, name="j") as j:
                    _nt_tile(b, i, j, rows, cols, k, a, bmat, epilogue, vw)


def _nt_tile(
    b: ir.IRBuilder, i: ir.Value, j: ir.Value, rows: int, cols: int, k: int,
    a: Mat, bmat: Mat, epilogue: Epilogue, vw: int,
) -> None:
    totals: list[list[ir.Value | None]] = [[None] * cols for _ in range(rows)]
    for klo, khi, _, width in column_pieces(k, vw, 1):
        ty = emit.vec_type(width) if width > 1 else emit.F32
        zero = emit.splat(b, 0.0, width)
        accs = [[local(b, ty, zero) for _ in range(cols)] for _ in range(rows)]
        with for_range(b, klo, khi, width, name="k") as kk:
            av = [emit.load(b, a.base, index(b, (i, a.rs), r * a.rs, kk), width) for r in range(rows)]
            bv = [emit.load(b, bmat.base, index(b, (j, bmat.rs), c * bmat.rs, kk), width) for c in range(cols)]
            for r in range(rows):
                for c in range(cols):
                    b.store(emit.fma(b, av[r], bv[c], b.load(accs[r][c])), accs[r][c])
        for r in range(rows):
            for c in range(cols):
                part = emit.hsum(b, b.load(accs[r][c]))
                totals[r][c] = part if totals[r][c] is None else b.fadd(totals[r][c], part)
    for r in range(rows):
        for c in range(cols):
            value = totals[r][c] if totals[r][c] is not None else emit.f32(0.0)
            epilogue(b, index(b, i, r), index(b, j, c), value, 1)


def vector_loop(
    b: ir.IRBuilder, lo: Index, hi: Index, vw: int, body: Callable[[ir.IRBuilder, ir.Value, int], None],
    name: str = "v",
) -> None:
    """Run ``body(b, t, width)`` over ``[lo, hi)`` in `vw`-wide steps, then narrower or scalar steps for the rest."""
    if isinstance(lo, int) and isinstance(hi, int):
        for plo, phi, _, width in column_pieces(hi - lo, vw, 1):
            with for_range(b, lo + plo, lo + phi, width, name=name) as t:
                body(b, t, width)
        return
    lo_v = i64(lo) if isinstance(lo, int) else lo
    hi_v = i64(hi) if isinstance(hi, int) else hi
    if vw == 1:
        with for_range(b, lo_v, hi_v, 1, name=name) as t:
            body(b, t, 1)
        return
    count = b.sub(hi_v, lo_v)
    count = b.select(b.icmp_signed("<", count, i64(0)), i64(0), count)
    mid = b.add(lo_v, b.sub(count, b.srem(count, i64(vw))), name=f"{name}.mid")
    with for_range(b, lo_v, mid, vw, name=name) as t:
        body(b, t, vw)
    with for_range(b, mid, hi_v, 1, name=f"{name}.tail") as t:
        body(b, t, 1)



def transpose(b: ir.IRBuilder, src: ir.Value, rows: int, cols: int, dst: ir.Value, vw: int,
              src_rs: int | None = None, dst_rs: int | None = None) -> None:
    """``dst[j * dst_rs + i] = src[i * src_rs + j]`` for i < rows, j < cols (row strides default to cols, rows).

    Square blocks of a vector's width go through registers: `w` row loads, ``log2(w)`` rounds of `w`
    interleaving shuffles (round after round, rows i and i + w/2 interleaved into rows 2i and 2i + 1 give
    the transpose), `w` column stores; the ragged edges are copied one float at a time.
    """
    src_rs, dst_rs = src_rs or cols, dst_rs or rows
    w = vw
    while w > 1 and w > min(rows, cols):
        w //= 2
    full_r, full_c = (rows - rows % w, cols - cols % w) if w > 1 else (0, 0)

    def scalar(i_lo: int, i_hi: int, j_lo: int, j_hi: int) -> None:
        if i_hi > i_lo and j_hi > j_lo:
            with for_range(b, i_lo, i_hi, name="ti") as i:
                with for_range(b, j_lo, j_hi, name="tj") as j:
                    emit.store(b, emit.load(b, src, index(b, (i, src_rs), j)), dst, index(b, (j, dst_rs), i))

    if full_r and full_c:
        with for_range(b, 0, full_r, w, name="tbi") as i0:
            with for_range(b, 0, full_c, w, name="tbj") as j0:
                vecs = [emit.load(b, src, index(b, (i0, src_rs), r * src_rs, j0), w) for r in range(w)]
                for _ in range(w.bit_length() - 1):
                    half = w // 2
                    pairs = [emit.interleave(b, vecs[i], vecs[i + half], w) for i in range(half)]
                    vecs = [v for pair in pairs for v in pair]
                for c, v in enumerate(vecs):
                    emit.store(b, v, dst, index(b, (j0, dst_rs), c * dst_rs, i0))
    scalar(0, rows, full_c, cols)
    scalar(full_r, rows, 0, full_c)
