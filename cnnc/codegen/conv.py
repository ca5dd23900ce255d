"""2-D convolution kernels: forward, gradient wrt the input, gradient wrt the weights.

Design: per image, im2col into the workspace and a register-blocked GEMM
(``cnnc.codegen.gemm``). With ``K = c/groups * kh * kw`` and ``P = oh * ow``, the
column matrix ``col`` is ``(c * kh * kw) x P``: row ``(ci, ky, kx)`` holds, for
every output position, the input pixel that kernel tap reads (zero in the
padding). Group ``g`` uses rows ``g*K .. (g+1)*K`` of it and rows
``g*og .. (g+1)*og`` of the weight ``(o, K)``.

- forward: ``y_g = W_g @ col_g`` (``gemm_nn``, vectorised over output
  positions), bias and activation applied in registers before the store.
- backward data: ``dcol_g = W_g^T @ dy_g`` (``gemm_nn``) into the workspace,
  then col2im adds every column entry back onto the input pixel it came from.
- backward weights: ``dW_g += dy_g @ col_g^T`` (``gemm_nt``, dot products over
  output positions); ``db += row sums of dy``.

A 1x1 convolution with unit stride and no padding needs no im2col: the image
itself is the column matrix (and dx is dcol). Any other stride-1 convolution
with one group runs all three kernels without im2col, on a zero-padded copy
of the image (``cnnc.codegen.conv_direct``); im2col remains for strided and
grouped convolutions, and for dilated ones (tap ``(ky, kx)`` reads input row
``oy*sh - pt + ky*dh``: im2col and col2im step the taps by the dilation).

Connect tables: on the padded path, forward and backward data leave out the
multiply-adds of (o, c) pairs outside the table (the tiles are unrolled per
table entry), and an unpadded convolution's weight gradient runs with images
in the vector lanes (``cnnc.codegen.conv_lanes``), every lane of its
multiply-adds a pair in the table, as do its input gradient
(``conv_lanes_data``) and whole groups of images of its forward
(``conv_lanes_fwd``) where rows of dx and shifted copies would waste lanes;
on the im2col path the GEMM stays dense, with the weights copied
into the workspace and every pair outside the table replaced by zeros. Either
way the weights outside the table are never read, and backward weights adds
only table entries to ``dw`` (its table is a constant ``o x c`` byte mask).

Columns two apart (stride-2 convolutions without dilation, ResNet's down
blocks) are gathered from a zero-padded copy of the image, a row's run of a
tap at a time, as the even lanes of pairs of vector loads (``_im2col_pairs``).

Workspace (floats): ``[col or dcol: c*kh*kw*P unless 1x1] [connect only: o*K] [backward weights: dy^T of one
group] [stride 2: the padded image]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import llvmlite.ir as ir

from cnnc.codegen import (
    conv_direct,
    conv_dot,
    conv_lanes,
    conv_lanes_data,
    conv_lanes_fwd,
    conv_rows,
    conv_winograd,
    conv_winograd4,
    conv_winograd4o,
    conv_winograd_grad,
    emit,
)
from cnnc.codegen.conv_direct import GradSpace, Plane
from cnnc.codegen.emit import for_range, i64, kernel
from cnnc.codegen.gemm import Mat, column_pieces, gemm_nn, gemm_nt, index, local, transpose, vector_loop
from cnnc.codegen.plan import aligned
from cnnc.codegen.specs import ConvSpec
from cnnc.ops import activations
from cnnc_runtime.artifact import connect_mask

I8 = ir.IntType(8)


@dataclass(frozen=True)
class _Geom:
    """Sizes derived from a ConvSpec."""

    spec: ConvSpec

    @property
    def cg(self) -> int:
        return self.spec.c // self.spec.groups

    @property
    def og(self) -> int:
        return self.spec.o // self.spec.groups

    @property
    def taps(self) -> int:
        return self.spec.kh * self.spec.kw

    @property
    def k(self) -> int:
        """Reduction length of one output: input channels per group times kernel taps."""
        return self.cg * self.taps

    @property
    def p(self) -> int:
        return self.spec.oh * self.spec.ow

    @property
    def x_stride(self) -> int:
        return self.spec.x_stride or self.spec.c * self.spec.h * self.spec.w

    @property
    def y_stride(self) -> int:
        return self.spec.y_stride or self.spec.o * self.p

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded convolution: the image is its own column matrix (no im2col)."""
        s = self.spec
        return (s.kh, s.kw, s.sh, s.sw, s.pt, s.pl) == (1, 1, 1, 1, 0, 0) and (s.oh, s.ow) == (s.h, s.w)

    @property
    def col_floats(self) -> int:
        return 0 if self.pointwise else self.spec.c * self.taps * self.p

    @property
    def pairs(self) -> bool:
        """Whether im2col reads a row's columns as the even lanes of vector pairs (stride 2, no dilation)."""
        return self.spec.sw == 2 and self.spec.dw == 1 and not self.pointwise

    def paired_plane(self, vw: int) -> Plane:
        """The zero-padded copy `_im2col_pairs` reads: every tap's rows in it (and a float past each row's last
        pair, which the odd lanes read and drop)."""
        s = self.spec
        hp = max(s.h + s.pt, (s.oh - 1) * s.sh + (s.kh - 1) * s.dh + 1)
        wp = max(s.w + s.pl, (s.ow - 1) * s.sw + s.kw) + 1
        return Plane(s.c, hp, wp, s.kh, s.kw, 1, vw)

    def paired_floats(self, vw: int) -> int:
        if not self.pairs:
            return 0
        p = self.paired_plane(vw)
        return aligned(self.spec.c * p.hp * p.wp + 2 * vw)

    @property
    def table_floats(self) -> int:
        return self.spec.o * self.k if self.spec.connect is not None else 0

    def transposed_dw(self, vw: int) -> bool:
        """Whether backward weights vectorises over output channels (dW^T = col @ dy^T) instead of positions.

        With at least a vector of output channels per group this keeps a whole
        tile of accumulators busy with no reduction across lanes; it needs dy of
        one group transposed (p x og) in the workspace.
        """
        return self.og >= vw

    def dyt_floats(self) -> int:
        return self.p * self.og

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """Zero padding (top, left, bottom, right); bottom and right follow from the output size."""
        s = self.spec
        span_h, span_w = (s.kh - 1) * s.dh + 1, (s.kw - 1) * s.dw + 1
        return s.pt, s.pl, (s.oh - 1) * s.sh + span_h - s.h - s.pt, (s.ow - 1) * s.sw + span_w - s.w - s.pl

    @property
    def padded(self) -> bool:
        """Whether forward and backward data run on a padded copy of the image (conv_direct), not im2col.

        That needs stride 1, one group and no dilation; a padding as large as the kernel would
        need negative padding of dy for the input gradient.
        """
        s = self.spec
        top, left, bottom, right = self.pads
        return ((s.sh, s.sw, s.groups, s.dh, s.dw) == (1, 1, 1, 1, 1) and not self.pointwise
                and 0 <= min(self.pads) and max(top, bottom) < s.kh and max(left, right) < s.kw)

    def table_pairs(self) -> frozenset[tuple[int, int]] | None:
        """The (output, input) channel pairs of a connect table; None without one."""
        connect = self.spec.connect
        return None if connect is None else frozenset((o, c) for o, row in enumerate(connect) for c in row)


    def forward_plane(self, vw: int) -> Plane:
        s = self.spec
        top, left, bottom, right = self.pads
        return Plane(s.c, s.h + top + bottom, s.w + left + right, s.kh, s.kw, s.o, vw)

    def backward_plane(self, vw: int) -> Plane:
        """dx as a convolution of dy padded to (h + kh - 1) x (w + kw - 1)."""
        s = self.spec
        return Plane(s.o, s.h + s.kh - 1, s.w + s.kw - 1, s.kh, s.kw, s.c, vw)


def _check(spec: ConvSpec) -> _Geom:
    if spec.c % spec.groups or spec.o % spec.groups:
        raise ValueError(f"channels {spec.c}->{spec.o} not divisible by groups={spec.groups}")
    if spec.connect is not None:
        if spec.groups != 1:
            raise ValueError("a connect table needs groups=1")
        if len(spec.connect) != spec.o or any(not 0 <= ci < spec.c for row in spec.connect for ci in row):
            raise ValueError("connect table does not match the channel counts")
    return _Geom(spec)


def conv_workspace_floats(spec: ConvSpec, vw: int) -> int:
    """Scratch floats one call of any of the three kernels needs (the maximum over them).

    Layout for im2col: [col or dcol] [connect: full weight or its gradient]
    [backward weights: dy^T of one group]; conv_direct has its own.
    """
    g = _check(spec)
    im2col = g.col_floats + g.table_floats + g.dyt_floats() + g.paired_floats(vw)
    if not g.padded:
        return im2col
    plane, back = g.forward_plane(vw), g.backward_plane(vw)
    weights = GradSpace(plane).floats
    wino = [conv_winograd.workspace_floats(q) for q in (plane, back) if _winograd(spec, q)]
    if _winograd4(spec, plane):
        wino.append(conv_winograd4.workspace_floats(plane))
    if _winograd4o(spec, plane):
        wino.append(conv_winograd4o.workspace_floats(plane))
    if _winograd4_data(spec, back):  # (U in the workspace too)
        wino.append(conv_winograd4.workspace_floats(back) + _u4_floats(back))
    if _winograd_grad(spec, plane):
        wino.append(conv_winograd_grad.workspace_floats(plane))
    rows = [conv_rows.Rows(spec, vw).floats] if _rows_backward(spec, back) else []
    dot = _dot_shifted(spec, plane)
    rows += [conv_dot.Space(dot).floats] if dot is not None else []
    rows += [conv_lanes.Space(spec, vw).floats] if _lanes(spec, plane) else []
    rows += [conv_lanes_data.Space(spec, vw).floats] if _lanes_data(spec, back) else []
    rows += [conv_lanes_fwd.floats(spec, vw)] if _lanes_forward(spec, _forward_plane(spec, plane)) else []
    shifted = [_forward_plane(spec, plane).pad_floats]  # (product_shifted needs no out section)
    return max(plane.floats, back.floats, weights, *wino, *rows, *shifted)


# --- helpers ---------------------------------------------------------------------------------------


def _winograd(spec: ConvSpec, p: Plane) -> bool:
    """Whether the convolution on the padded plane `p` (forward or input gradient) runs by Winograd."""
    return spec.winograd and conv_winograd.applies(p, spec.connect)


def _winograd4(spec: ConvSpec, p: Plane) -> bool:
    """Whether the forward on the padded plane `p` runs by Winograd F(4x4, 3x3): at inference (its U kept
    between calls, ``spec.cached``) where ``conv_winograd4.applies``. Training's forward keeps F(2x2): its
    rounding error, about ten times F(2x2)'s, comes back amplified by the batchnorms after it (ResNet-20 at
    initialisation: the median weight gradient 5e-3 off the float64 one, against 4e-4)."""
    return spec.winograd and spec.cached and conv_winograd4.applies(p, spec.connect)


def _winograd4o(spec: ConvSpec, p: Plane) -> bool:
    """Whether the forward on the padded plane `p` runs by F(4x4, 3x3) with output channels in the lanes (small
    maps, at inference: ``conv_winograd4o.applies``)."""
    return spec.winograd and spec.cached and conv_winograd4o.applies(p, spec.connect)


def _winograd4_data(spec: ConvSpec, p: Plane) -> bool:
    """Whether the input gradient on the padded plane `p` (of dy) runs by Winograd F(4x4, 3x3), its U transformed
    from the flipped weights on every call: where ``conv_winograd4.applies``. Its rounding leaves ResNet-20's
    weight gradients as close to the float64 ones as F(2x2)'s (measured: the same median and worst error)."""
    return spec.winograd and conv_winograd4.applies(p, spec.connect)


def _u4_floats(p: Plane) -> int:
    """F(4x4)'s transformed weights U of the convolution on `p`, kept in the workspace."""
    return aligned(conv_winograd4.XI * p.m * p.c)


def row_tile(spec: ConvSpec, vw: int) -> int:
    """The output rows of a Winograd tile (4 or 2) where the forward of `spec` runs by Winograd on blocks of
    tile rows, so that a share of whole tile rows (``spec.rows``) can run alone; 0 where it does not."""
    g = _check(spec)
    if not g.padded:
        return 0
    p = _forward_plane(spec, g.forward_plane(vw))
    if _winograd4o(spec, p):
        return 0
    if _winograd4(spec, p):
        return 4
    return 2 if _winograd(spec, p) and not conv_winograd.whole_images(p, spec.h, spec.w) else 0


def _winograd_grad(spec: ConvSpec, p: Plane) -> bool:
    """Whether the weight gradient on the padded forward plane `p` runs by Winograd."""
    return spec.winograd and conv_winograd_grad.applies(p, spec.connect)


def _rows_backward(spec: ConvSpec, p: Plane) -> bool:
    """Whether the input gradient runs as rows of dx (``conv_rows``) rather than on the padded plane `p`."""
    return not _winograd(spec, p) and not _winograd4_data(spec, p) and conv_rows.applies(spec, p.n, p.vw)


def _lanes_data(spec: ConvSpec, p: Plane) -> bool:
    """Whether the input gradient runs with images in the vector lanes (``conv_lanes_data``): where it would run as
    rows of dx (``conv_rows``) and needs at most conv_lanes_data.GAIN of that form's vector multiply-adds (LeNet's
    C3: 0.625, its 14-column rows in vectors of 16 and every dx row stepping over whole rows of taps)."""
    if not _rows_backward(spec, p):
        return False
    rows = conv_rows.Rows(spec, p.vw)
    pairs = sum(len(cs) for _, cs in rows.pairs())
    theirs = rows.valid_rows() * spec.kw * pairs * rows.vectors
    return conv_lanes_data.applies(spec, p.vw, pairs, theirs)


def _lanes_forward(spec: ConvSpec, p: Plane) -> bool:
    """Whether the forward runs whole groups of images in the vector lanes (``conv_lanes_fwd``) in place of
    product_shifted on `p` (LeNet's C3: 9,375 vector multiply-adds an image for 10,500, and no tap loop); not
    with a residual (its groups store images in the lanes, where the residual's layout has none)."""
    if not p.shifted or spec.residual:
        return False
    table = _Geom(spec).table_pairs()
    pairs = spec.o * spec.c if table is None else len(table)
    return conv_lanes_fwd.applies(spec, p.vw, pairs, pairs * p.taps * (p.n // p.vw))


def images_in_lanes(emitter: str, spec: ConvSpec, vw: int) -> bool:
    """Whether kernel `emitter` (its name) of `spec` runs `vw` images at a time: a training step then gives it
    chunks of a multiple of `vw` images, where a smaller last group would leave lanes empty."""
    if emitter not in ("emit_conv_forward", "emit_conv_backward_data") or spec.groups != 1 or not _Geom(spec).padded:
        return False
    if emitter == "emit_conv_forward":
        return _lanes_forward(spec, _forward_plane(spec, _Geom(spec).forward_plane(vw)))
    return _lanes_data(spec, _Geom(spec).backward_plane(vw))


def _dot_shifted(spec: ConvSpec, p: Plane) -> Plane | None:
    """The shifted plane the weight gradient runs on as dot products over positions (``conv_dot``), else None.

    That takes fewer output channels than half a vector (else conv_direct vectorises over them) and at most
    conv_dot.GAIN of the vector multiply-adds of conv_direct's dot products for `p` (LeNet's C1: 0.875).
    A table's unrolled pairs made LeNet's C3 only 3-9% faster this way than over its 16 output channels
    (which computes the 36 pairs outside the table too) for 2.5 times the compile time: not taken.
    """
    if _winograd_grad(spec, p) or not conv_direct.shifts_fit(p) or GradSpace(p).over_channels:
        return None
    shifted = dataclasses.replace(p, shifted=True)
    if conv_dot.Space(shifted).sum_floats > conv_dot.MAX_SUMS:
        return None
    table = _Geom(spec).table_pairs()
    pairs = spec.o * spec.c if table is None else len(table)
    theirs = spec.o * spec.c * p.taps * (p.n // p.vw)
    return shifted if conv_dot.vector_fmas(shifted, pairs) <= conv_dot.GAIN * theirs else None


def _lanes(spec: ConvSpec, p: Plane) -> bool:
    """Whether the weight gradient runs with images in the vector lanes (``conv_lanes``): in place of the form
    vectorised over output channels, where that needs more than conv_lanes.GAIN of its vector multiply-adds (a
    connect table, whose pairs outside it waste lanes: LeNet's C3 needs 0.625 of them; output channels that
    leave a vector part empty)."""
    if _winograd_grad(spec, p) or not GradSpace(p).over_channels or not conv_lanes.fits(spec, p.vw):
        return False
    table = _Geom(spec).table_pairs()
    pairs = spec.o * spec.c if table is None else len(table)
    theirs = spec.c * p.taps * spec.oh * spec.ow * -(-spec.o // p.vw)
    return conv_lanes.vector_fmas(spec, pairs, p.vw) <= conv_lanes.GAIN * theirs


def _forward_plane(spec: ConvSpec, p: Plane) -> Plane:
    """The plane the forward convolution runs on: `p` (the padded plane), or its shifted copies when the
    rows are not whole vectors (conv_direct.shifts_fit) and Winograd does not apply."""
    if (_winograd(spec, p) or _winograd4(spec, p) or _winograd4o(spec, p) or conv_direct.rows_fit(p)
            or not conv_direct.shifts_fit(p)):
        return p
    return dataclasses.replace(p, shifted=True)


def _winograd_weights(b: ir.IRBuilder, p: Plane, ws: ir.Value, weights: ir.Value,
                      cache: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """`weights` transformed into the workspace after conv_direct's part, once per call (or kept between calls in
    `cache`: ``conv_winograd.cached_weights``): (U, the rest for V and M)."""
    u = emit.gep(b, ws, p.floats, name="wino.u")
    if cache is not None:
        return conv_winograd.cached_weights(b, p, weights, cache), emit.gep(b, u, conv_winograd.Blocks(p).u_floats)
    conv_winograd.transform_weights(b, p, weights, u)
    return u, emit.gep(b, u, conv_winograd.Blocks(p).u_floats, name="wino.vm")


def weight_cache_floats(spec: ConvSpec, vw: int) -> int:
    """The floats of the `cache` region a cached forward (``spec.cached``) keeps its Winograd weights in (0: it
    runs no Winograd, the region is not read)."""
    g = _check(spec)
    if not (spec.cached and g.padded):
        return 0
    p = _forward_plane(spec, g.forward_plane(vw))
    if _winograd4(spec, p) or _winograd4o(spec, p):
        return conv_winograd.cache_floats(p, conv_winograd4.XI)
    return conv_winograd.cache_floats(p) if _winograd(spec, p) else 0


def _affine(b: ir.IRBuilder, spec: ConvSpec, bias: ir.Value | None, r: ir.Value, value: ir.Value,
            width: int) -> ir.Value:
    """Output channel r's sums plus its bias, scaled first by a folded batchnorm's scale (``spec.scale_at``)."""
    if bias is None:
        return value
    shift = emit.splat(b, emit.load(b, bias, r), width)
    if not spec.scale_at:
        return b.fadd(value, shift)
    return emit.fma(b, value, emit.splat(b, emit.load(b, bias, b.add(r, i64(spec.scale_at))), width), shift)


def _residual_image(b: ir.IRBuilder, spec: ConvSpec, args: dict, n: ir.Value) -> ir.Value | None:
    """Image n's residual (``spec.residual``: floats laid out as its outputs), else None."""
    return emit.gep(b, args["r"], index(b, (n, spec.r_stride)), name="r.img") if spec.residual else None


def _smax(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    return b.select(b.icmp_signed(">", x, y), x, y)


def _smin(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    return b.select(b.icmp_signed("<", x, y), x, y)


def _valid_range(
    b: ir.IRBuilder, tap: ir.Value, stride: int, pad: int, size: int, out: int
) -> tuple[ir.Value, ir.Value]:
    """``[lo, hi)``: the outputs ``o`` whose input ``o * stride - pad + tap`` lies in ``[0, size)``."""
    first = b.sub(i64(pad + stride - 1), tap)  # floor(first / stride) = ceil((pad - tap) / stride) when first >= 0
    lo = _smin(b, b.sdiv(_smax(b, first, i64(0)), i64(stride)), i64(out))
    last = b.sub(i64(size - 1 + pad), tap)  # the largest o satisfies o * stride <= last
    hi = b.select(b.icmp_signed("<", last, i64(0)), i64(0), b.add(b.sdiv(last, i64(stride)), i64(1)))
    hi = _smax(b, _smin(b, hi, i64(out)), lo)
    return lo, hi


def _mask_table(module: ir.Module, name: str, spec: ConvSpec) -> ir.GlobalVariable:
    """A constant ``o x c`` byte array: 1 where output channel o reads input channel c."""
    ty = ir.ArrayType(I8, spec.o * spec.c)
    mask = ir.GlobalVariable(module, ty, name=f"{name}.connect")
    mask.global_constant = True
    mask.linkage = "internal"
    mask.initializer = ir.Constant(ty, connect_mask(spec.connect, (spec.o, spec.c)).astype(int).ravel().tolist())
    return mask


def _each_connected(b: ir.IRBuilder, module: ir.Module, name: str, spec: ConvSpec, body, otherwise=None) -> None:
    """Call ``body(b, offset, o, c)`` for each (o, c) pair in the table, else ``otherwise``; offset: w[o, c, 0, 0]."""
    mask = _mask_table(module, name, spec)
    taps = spec.kh * spec.kw
    with for_range(b, 0, spec.o, name="co") as oi:
        with for_range(b, 0, spec.c, name="cc") as ci:
            flag = b.load(b.gep(mask, [index(b, (oi, spec.c), ci)], source_etype=I8, inbounds=True), typ=I8)
            offset = index(b, (oi, spec.c * taps), (ci, taps))
            connected = b.icmp_unsigned("!=", flag, ir.Constant(I8, 0), name="connected")
            if otherwise is None:
                with b.if_then(connected):
                    body(b, offset, oi, ci)
            else:
                with b.if_else(connected) as (then, other):
                    with then:
                        body(b, offset, oi, ci)
                    with other:
                        otherwise(b, offset, oi, ci)


def _dense_weights(b: ir.IRBuilder, module: ir.Module, name: str, g: _Geom, args: dict, vw: int) -> ir.Value:
    """The weights for the im2col GEMM: `w` itself, or with a connect table a workspace copy in which the
    (o, c) blocks outside the table are zero (the weights there are never read)."""
    spec, w = g.spec, args["w"]
    if spec.connect is None:
        return w
    out = emit.gep(b, args["ws"], g.col_floats, name="w.masked")
    taps = g.taps

    def copy(b: ir.IRBuilder, offset: ir.Value, *_: ir.Value) -> None:
        def step(b: ir.IRBuilder, t: ir.Value, width: int) -> None:
            at = index(b, offset, t)
            emit.store(b, emit.load(b, w, at, width), out, at)

        vector_loop(b, 0, taps, vw, step, name="r")

    def zero(b: ir.IRBuilder, offset: ir.Value, *_: ir.Value) -> None:
        conv_direct.zero(b, out, offset, b.add(offset, i64(taps)), vw)

    _each_connected(b, module, name, spec, copy, zero)
    return out


def _tap(b: ir.IRBuilder, k: ir.Value, dilation: int) -> ir.Value:
    """The input offset of kernel tap `k` (in rows or columns): k * dilation."""
    return k if dilation == 1 else b.mul(k, i64(dilation))


def _im2col(b: ir.IRBuilder, g: _Geom, x: ir.Value, col: ir.Value, vw: int) -> None:
    """col[(ci, ky, kx), (oy, ox)] = x[ci, oy*sh - pt + ky*dh, ox*sw - pl + kx*dw], zero outside the image."""
    s = g.spec
    with for_range(b, 0, s.c, name="ci") as ci:
        with for_range(b, 0, s.kh, name="ky") as ky:
            oy_lo, oy_hi = _valid_range(b, _tap(b, ky, s.dh), s.sh, s.pt, s.h, s.oh)
            with for_range(b, 0, s.kw, name="kx") as kx:
                ox_lo, ox_hi = _valid_range(b, _tap(b, kx, s.dw), s.sw, s.pl, s.w, s.ow)
                row = index(b, (ci, g.taps * g.p), (ky, s.kw * g.p), (kx, g.p))
                conv_direct.zero(b, col, row, b.add(row, b.mul(oy_lo, i64(s.ow))), vw)
                with for_range(b, oy_lo, oy_hi, name="oy") as oy:
                    dst = index(b, row, (oy, s.ow))
                    # input offset of output column ox is src + ox * sw
                    src = index(b, (ci, s.h * s.w), (oy, s.sh * s.w), (ky, s.dh * s.w), (kx, s.dw),
                                -s.pt * s.w - s.pl)

                    def copy(b: ir.IRBuilder, ox: ir.Value, width: int, dst=dst, src=src) -> None:
                        emit.store(b, emit.load(b, x, index(b, src, ox), width), col, index(b, dst, ox))

                    def gather(b: ir.IRBuilder, ox: ir.Value, width: int, shift: int = 0, dst=dst, src=src) -> None:
                        at = index(b, src, (ox, s.sw))
                        if width == 1:
                            value = emit.load(b, x, at)
                        else:  # shifted: the odd floats of the span from one float earlier
                            value = emit.even_odd(b, x, b.sub(at, i64(shift)), width)[shift]
                        emit.store(b, value, col, index(b, dst, ox))

                    conv_direct.zero(b, col, dst, b.add(dst, ox_lo), vw)
                    if s.sw == 1:
                        vector_loop(b, ox_lo, ox_hi, vw, copy, name="ox")
                    else:
                        _strided_loop(b, g, kx, ox_lo, ox_hi, vw, gather)
                    conv_direct.zero(b, col, b.add(dst, ox_hi), index(b, dst, s.ow), vw)
                conv_direct.zero(b, col, index(b, row, (oy_hi, s.ow)), index(b, row, g.p), vw)


def _im2col_pairs(b: ir.IRBuilder, g: _Geom, x: ir.Value, col: ir.Value, pad: ir.Value, vw: int) -> None:
    """im2col of a stride-2 convolution: the image into the zero-padded plane `pad` (whose border was zeroed
    once per call), then each tap's run of a row, the even lanes of pairs of vector loads."""
    s = g.spec
    p = g.paired_plane(vw)
    conv_direct.fill(b, p, x, s.h, s.w, s.pt, s.pl, pad)
    with for_range(b, 0, s.c, name="ci") as ci:
        with for_range(b, 0, s.oh, name="oy") as oy:
            for ky in range(s.kh):
                for kx in range(s.kw):
                    src = index(b, (ci, p.hp * p.wp), (oy, s.sh * p.wp), ky * s.dh * p.wp + kx)
                    dst = index(b, (ci, g.taps * g.p), (ky * s.kw + kx) * g.p, (oy, s.ow))

                    def copy(b: ir.IRBuilder, ox: ir.Value, width: int, src=src, dst=dst) -> None:
                        at = index(b, src, (ox, 2))
                        even = emit.even_odd(b, pad, at, width)[0] if width > 1 else emit.load(b, pad, at)
                        emit.store(b, even, col, index(b, dst, ox))

                    vector_loop(b, 0, s.ow, vw, copy, name="ox")


def _column_matrix(b: ir.IRBuilder, g: _Geom, x_img: ir.Value, ws: ir.Value, vw: int) -> ir.Value:
    """The image's column matrix: the image itself for a 1x1 convolution, else im2col into the workspace."""
    if g.pointwise:
        return x_img
    if g.pairs:
        _im2col_pairs(b, g, x_img, ws, _paired_pad(b, g, ws, vw), vw)
    else:
        _im2col(b, g, x_img, ws, vw)
    return ws


def _strided_loop(b: ir.IRBuilder, g: _Geom, kx: ir.Value, lo: ir.Value, hi: ir.Value, vw: int, body) -> None:
    """``body(b, ox, width, shift)`` over the outputs [lo, hi) of one row of kernel column `kx`, in vectors
    where the stride is 2, one at a time otherwise.

    A vector of outputs spans 2 * width input floats: from its first tap (shift 0) while the float after its
    last tap still lies in the row, then from the float before its first tap (shift 1) while that one does.
    """
    s = g.spec
    if s.sw != 2 or s.ow < vw:  # (a row shorter than a vector: the loop of one float at a time alone is faster)
        vector_loop(b, lo, hi, 1, body, name="ox")
        return
    tap = _tap(b, kx, s.dw)
    # input column of output ox: 2 * ox - pl + tap; unshifted vectors need 2 * ox - pl + tap + 1 <= w - 1
    room = b.sub(i64(s.w - 2 + s.pl), tap)
    last = b.select(b.icmp_signed("<", room, i64(0)), i64(-1), b.sdiv(room, i64(2)))
    fits = b.sub(_smax(b, _smin(b, b.add(last, i64(1)), hi), lo), lo)
    mid = b.add(lo, b.sub(fits, b.srem(fits, i64(vw))), name="ox.mid")  # after the whole unshifted vectors
    with for_range(b, lo, mid, vw, name="ox") as ox:
        body(b, ox, vw, 0)
    first = b.add(b.sub(b.mul(mid, i64(2)), i64(s.pl + 1)), tap)  # the float before mid's first tap
    with b.if_else(b.icmp_signed(">=", first, i64(0))) as (shifted, single):
        with shifted:
            vector_loop(b, mid, hi, vw, lambda b, ox, width: body(b, ox, width, 1), name="ox.shift")
        with single:
            vector_loop(b, mid, hi, 1, body, name="ox.rest")


def _paired_pad(b: ir.IRBuilder, g: _Geom, ws: ir.Value, vw: int) -> ir.Value:
    """Where `_im2col_pairs`' padded image lives: after the rest of the im2col workspace."""
    return emit.gep(b, ws, g.col_floats + g.table_floats + g.dyt_floats(), name="paired")


def _zero_paired(b: ir.IRBuilder, g: _Geom, ws: ir.Value, vw: int) -> None:
    """The padded image's border (and the floats past it) zeroed, once per call: the images fill the rest."""
    if g.pairs:
        conv_direct.zero(b, _paired_pad(b, g, ws, vw), 0, g.paired_floats(vw), vw)


def _col2im(b: ir.IRBuilder, g: _Geom, col: ir.Value, dx: ir.Value, vw: int) -> None:
    """dx[ci, oy*sh - pt + ky*dh, ox*sw - pl + kx*dw] += col[(ci, ky, kx), (oy, ox)] for every in-image tap."""
    s = g.spec
    with for_range(b, 0, s.c, name="ci") as ci:
        with for_range(b, 0, s.kh, name="ky") as ky:
            oy_lo, oy_hi = _valid_range(b, _tap(b, ky, s.dh), s.sh, s.pt, s.h, s.oh)
            with for_range(b, 0, s.kw, name="kx") as kx:
                ox_lo, ox_hi = _valid_range(b, _tap(b, kx, s.dw), s.sw, s.pl, s.w, s.ow)
                row = index(b, (ci, g.taps * g.p), (ky, s.kw * g.p), (kx, g.p))
                with for_range(b, oy_lo, oy_hi, name="oy") as oy:
                    src = index(b, row, (oy, s.ow))
                    dst = index(b, (ci, s.h * s.w), (oy, s.sh * s.w), (ky, s.dh * s.w), (kx, s.dw),
                                -s.pt * s.w - s.pl)

                    def add(b: ir.IRBuilder, ox: ir.Value, width: int, shift: int = 0, dst=dst, src=src) -> None:
                        at = index(b, dst, (ox, s.sw))
                        value = emit.load(b, col, index(b, src, ox), width)
                        if s.sw == 1 or width == 1:
                            emit.store(b, b.fadd(emit.load(b, dx, at, width), value), dx, at)
                            return
                        # stride 2: the values go to every other float of 2 * width (the odd ones of the span
                        # from one float earlier when shifted); the others get + 0
                        zero = emit.splat(b, 0.0, width)
                        pair = (zero, value) if shift else (value, zero)
                        for half, part in enumerate(emit.interleave(b, *pair, width)):
                            there = b.add(at, i64(half * width - shift))
                            emit.store(b, b.fadd(emit.load(b, dx, there, width), part), dx, there)

                    if s.sw == 1:
                        vector_loop(b, ox_lo, ox_hi, vw, add, name="ox")
                    else:
                        _strided_loop(b, g, kx, ox_lo, ox_hi, vw, add)


def _row_sum(b: ir.IRBuilder, base: ir.Value, start: ir.Value, length: int, vw: int) -> ir.Value:
    """sum(base[start : start + length]) as a scalar: vector partial sums, reduced across lanes once per piece."""
    total = emit.f32(0.0)
    for lo, hi, _, width in column_pieces(length, vw, 1):
        acc = local(b, emit.vec_type(width) if width > 1 else emit.F32, emit.splat(b, 0.0, width), name="rsum")
        with for_range(b, lo, hi, width, name="p") as t:
            b.store(b.fadd(b.load(acc), emit.load(b, base, index(b, start, t), width)), acc)
        total = b.fadd(total, emit.hsum(b, b.load(acc)))
    return total


CLAIM_TAIL = 2  # images at the end of a claimed range cut into bands of output rows
CLAIM_BANDS = 8  # bands of a tail image (at most)


def claim_bands(spec: ConvSpec, vw: int) -> tuple[int, int] | None:
    """(bands per tail image, output rows per band) where the forward of `spec` can take its work from a counter
    shared by the threads of a call (``ConvSpec.claim``), else None.

    The direct product over whole output rows (``product_rows``) only: its
    tiles are bands of output rows, each output the same sum whichever band
    holds it, so a thread that claims a unit (a whole image, or near the end
    of the range a band of an image) computes it bit for bit as any other
    would. The middle bands must read no padded row outside the image (their
    copy takes rows known only at run time, and writes no zeros above or below)."""
    g = _check(spec)
    if not g.padded or spec.rows is not None or spec.connect is not None:
        return None
    p = _forward_plane(spec, g.forward_plane(vw))
    if _winograd(spec, p) or _winograd4(spec, p) or _winograd4o(spec, p) or p.shifted or not conv_direct.rows_fit(p):
        return None
    down = conv_direct.row_tile_shape(p)[2]
    if p.oh % down or p.oh // down < 2:
        return None
    rows = down * -(-(p.oh // down) // CLAIM_BANDS)
    bands = -(-p.oh // rows)
    top = g.pads[0]
    if any(k * rows < top or (k + 1) * rows + spec.kh - 1 - top > spec.h for k in range(1, bands - 1)):
        return None
    return bands, rows


def _claimed(b: ir.IRBuilder, g: _Geom, p: Plane, args: dict, pad: ir.Value, finish_of) -> None:
    """The claim form of the direct forward (``claim_bands``): until the counter passes the range's units, take
    the next one; units are the range's images but the last ``CLAIM_TAIL``, then each of those in bands."""
    spec, (top, _, _, _) = g.spec, g.pads
    bands, rows = claim_bands(spec, p.vw)
    n0, n1, weights = args["n0"], args["n1"], args["w"]
    count = b.sub(n1, n0)
    tail = b.select(b.icmp_signed("<", count, i64(CLAIM_TAIL)), count, i64(CLAIM_TAIL))
    whole = b.sub(count, tail)
    units = b.add(whole, b.mul(tail, i64(bands)))
    loop, work, done = (b.append_basic_block(f"claim.{k}") for k in ("next", "work", "done"))
    b.branch(loop)
    b.position_at_end(loop)
    u = b.atomic_rmw("add", args["counter"], i64(1), "monotonic")
    b.cbranch(b.icmp_signed("<", u, units), work, done)
    b.position_at_end(work)
    is_whole = b.icmp_signed("<", u, whole)
    k = b.sub(u, whole)
    n = b.select(is_whole, b.add(n0, u), b.add(b.add(n0, whole), b.sdiv(k, i64(bands))))
    band = b.srem(k, i64(bands))
    oy0 = b.select(is_whole, i64(0), b.mul(band, i64(rows)))
    oy1 = b.select(is_whole, i64(p.oh), b.select(b.icmp_signed("<", b.add(oy0, i64(rows)), i64(p.oh)),
                                                 b.add(oy0, i64(rows)), i64(p.oh)))
    x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")

    def fill(rows_read=None) -> None:
        conv_direct.fill(b, p, x_img, spec.h, spec.w, top, g.pads[1], pad, rows_read, borders=True)

    last = (bands - 1) * rows
    with b.if_else(is_whole) as (then, otherwise):
        with then:
            fill()
        with otherwise:
            first_band, last_band = b.icmp_signed("==", band, i64(0)), b.icmp_signed("==", band, i64(bands - 1))
            with b.if_else(first_band) as (top_band, rest):
                with top_band:
                    fill((0, min(spec.h, rows + spec.kh - 1 - top)))
                with rest:
                    with b.if_else(last_band) as (bottom_band, middle):
                        with bottom_band:
                            fill((max(0, last - top), min(spec.h, p.oh + spec.kh - 1 - top)))
                        with middle:
                            fill((b.sub(oy0, i64(top)), b.add(oy1, i64(spec.kh - 1 - top))))
    conv_direct.product_rows(b, p, pad, weights, finish_of(b, n), oy_range=(oy0, oy1))
    b.branch(loop)
    b.position_at_end(done)


def _direct_forward(b: ir.IRBuilder, module: ir.Module, name: str, g: _Geom, args: dict, vw: int) -> None:
    spec = g.spec
    p = _forward_plane(spec, g.forward_plane(vw))
    top, left, _, _ = g.pads
    bias = args["b"] if spec.bias else None

    def finish_of(b: ir.IRBuilder, n: ir.Value):
        """Image n's outputs: bias, a folded batchnorm's scale, the residual, the activation, stored."""
        y_img = emit.gep(b, args["y"], index(b, (n, g.y_stride)), name="y.img")
        r_img = _residual_image(b, spec, args, n)

        def finish(b: ir.IRBuilder, r: ir.Value, at: ir.Value, value: ir.Value, width: int) -> None:
            value = _affine(b, spec, bias, r, value, width)
            if r_img is not None:
                value = b.fadd(value, emit.load(b, r_img, at, width))
            emit.store(b, activations.emit(b, value, spec.act, spec.act_args), y_img, at)

        return finish

    cache = args.get("cache")
    if _winograd(spec, p) and conv_winograd.whole_images(p, spec.h, spec.w) and not _winograd4o(spec, p):
        u, wino_ws = _winograd_weights(b, p, args["ws"], args["w"], cache)
        conv_winograd.product_images(b, p, (spec.h, spec.w, top, left), args["x"], g.x_stride, u, wino_ws, finish_of,
                                     args["n0"], args["n1"])
        b.ret_void()
        return
    pad, out, _ = conv_direct.sections(b, p, args["ws"])
    lanes = _lanes_forward(spec, p)  # (its groups write over the pad: zeroed after them, below)
    # each image writes the planes' rows it reads, border and all; shifted copies: the border is zeroed once
    borders = not p.shifted
    if borders:
        conv_direct.zero_tail(b, p, pad)
    elif not lanes:
        conv_direct.zero(b, pad, 0, p.pad_floats, vw)
    if spec.claim:
        _claimed(b, g, p, args, pad, finish_of)
        b.ret_void()
        return
    weights = args["w"]  # a connect table's tiles never read the weights outside it
    tile = row_tile(spec, vw)
    assert spec.rows is None or (tile and spec.rows[0] % tile == 0 and spec.rows[1] % tile == 0), spec.rows
    reads = tile_rows = None
    if spec.rows is not None:  # (stride 1: output rows [r0, r1) read padded rows [r0, r1 + kh - 1))
        r0, r1 = spec.rows
        reads, tile_rows = (max(0, r0 - top), min(spec.h, r1 + spec.kh - 1 - top)), (r0 // tile, r1 // tile)
    if _winograd4o(spec, p):
        u = conv_winograd.cached_weights(b, p, weights, cache, conv_winograd4o.transform_weights, conv_winograd4.XI)
        with for_range(b, args["n0"], args["n1"], name="n") as n:
            x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")
            conv_direct.fill(b, p, x_img, spec.h, spec.w, top, left, pad, None, borders)
            conv_winograd4o.product(b, p, pad, u, emit.gep(b, args["ws"], p.floats), finish_of(b, n))
        b.ret_void()
        return
    if _winograd4(spec, p):
        u = conv_winograd.cached_weights(b, p, weights, cache, conv_winograd4.transform_weights, conv_winograd4.XI)
        with for_range(b, args["n0"], args["n1"], name="n") as n:
            x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")
            conv_direct.fill(b, p, x_img, spec.h, spec.w, top, left, pad, reads, borders)
            conv_winograd4.product(b, p, pad, u, emit.gep(b, args["ws"], p.floats), finish_of(b, n), tile_rows)
        b.ret_void()
        return
    winograd = _winograd(spec, p)
    if winograd:
        u, wino_ws = _winograd_weights(b, p, args["ws"], weights, cache)
    start = args["n0"]
    if lanes:  # whole groups of vw images in the lanes, the rest one at a time below
        def lanes_finish(b: ir.IRBuilder, r: ir.Value, value: ir.Value, width: int) -> ir.Value:
            return activations.emit(b, _affine(b, spec, bias, r, value, width), spec.act, spec.act_args)

        start = b.sub(args["n1"], b.srem(b.sub(args["n1"], args["n0"]), i64(vw)), name="lanes.end")
        live = [(o, sorted(set(spec.connect[o])) if spec.connect else list(range(spec.c))) for o in range(spec.o)]
        with for_range(b, args["n0"], start, vw, name="lg") as n:
            conv_lanes_fwd.group(b, module, name, spec, args, n, vw, live, lanes_finish, g.x_stride, g.y_stride)
        conv_direct.zero(b, pad, 0, p.pad_floats, vw)  # (the shifted copies' border, over the lanes' workspace)
    with for_range(b, start, args["n1"], name="n") as n:
        x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")
        if p.shifted:
            conv_direct.fill_shifted(b, p, x_img, spec.h, spec.w, top, left, pad)
        else:
            conv_direct.fill(b, p, x_img, spec.h, spec.w, top, left, pad, reads, borders)
        finish = finish_of(b, n)

        if winograd:
            conv_winograd.product(b, p, pad, u, wino_ws, finish, tile_rows)
        elif p.shifted:
            # the sums stored as they are, then bias and activation in a pass over the image's outputs: one
            # copy of the activation's code rather than one per accumulator (a tanh tripled LeNet's compile)
            y_img = emit.gep(b, args["y"], index(b, (n, g.y_stride)), name="y.raw")

            def raw(b: ir.IRBuilder, r: ir.Value, at: ir.Value, value: ir.Value, width: int, y_img=y_img) -> None:
                emit.store(b, value, y_img, at)

            conv_direct.product_shifted(b, p, pad, weights, raw, g.table_pairs())
            with for_range(b, 0, spec.o, name="fr") as r:
                first = index(b, (r, g.p))

                def out(b: ir.IRBuilder, t: ir.Value, width: int, r=r, first=first, y_img=y_img,
                        finish=finish) -> None:
                    at = index(b, first, t)
                    finish(b, r, at, emit.load(b, y_img, at, width), width)

                vector_loop(b, 0, g.p, vw, out, name="fx")
        elif conv_direct.rows_fit(p):
            conv_direct.product_rows(b, p, pad, weights, finish, g.table_pairs())
        else:
            conv_direct.product(b, p, pad, weights, out, g.table_pairs())
            conv_direct.each_output(b, p, out, finish)
    b.ret_void()


def _direct_backward_data(b: ir.IRBuilder, module: ir.Module, name: str, g: _Geom, args: dict, vw: int) -> None:
    spec = g.spec
    p = g.backward_plane(vw)
    if _lanes_data(spec, p):
        live = conv_lanes.live_pairs(g.table_pairs(), spec.c, spec.o)
        conv_lanes_data.backward_data(b, module, name, spec, args, vw, live, g.x_stride, g.y_stride)
        b.ret_void()
        return
    if _rows_backward(spec, p):
        conv_rows.backward_data(b, spec, args, vw, g.x_stride, g.y_stride)
        b.ret_void()
        return
    pad, out, wt = conv_direct.sections(b, p, args["ws"])
    conv_direct.zero_tail(b, p, pad)  # each image writes the planes, border and all
    top, left, _, _ = g.pads
    winograd, winograd4 = _winograd(spec, p), _winograd4_data(spec, p)
    if winograd4:
        conv_direct.flipped(b, spec.o, spec.c, spec.kh, spec.kw, args["w"], wt)
        u, wino_ws = emit.gep(b, args["ws"], p.floats), emit.gep(b, args["ws"], p.floats + _u4_floats(p))
        conv_winograd4.transform_weights(b, p, wt, u)
    elif winograd:  # (the direct tiles read the weights in place: conv_direct.Weights.transposed)
        conv_direct.flipped(b, spec.o, spec.c, spec.kh, spec.kw, args["w"], wt)
        u, wino_ws = _winograd_weights(b, p, args["ws"], wt)
    layout = conv_direct.Weights.transposed(p)
    with for_range(b, args["n0"], args["n1"], name="n") as n:
        dy_img = emit.gep(b, args["dy"], index(b, (n, g.y_stride)), name="dy.img")
        dx_img = emit.gep(b, args["dx"], index(b, (n, g.x_stride)), name="dx.img")
        conv_direct.fill(b, p, dy_img, spec.oh, spec.ow, spec.kh - 1 - top, spec.kw - 1 - left, pad, borders=True)
        table = g.table_pairs()
        table = None if table is None else frozenset((c, o) for o, c in table)

        def finish(b: ir.IRBuilder, r: ir.Value, at: ir.Value, value: ir.Value, width: int, dx_img=dx_img) -> None:
            if spec.accumulate:
                value = b.fadd(emit.load(b, dx_img, at, width), value)
            emit.store(b, value, dx_img, at)

        if winograd4:
            conv_winograd4.product(b, p, pad, u, wino_ws, finish)
        elif winograd:
            conv_winograd.product(b, p, pad, u, wino_ws, finish)
        elif conv_direct.rows_fit(p):  # (a connect table's tiles never read the weights outside it)
            conv_direct.product_rows(b, p, pad, args["w"], finish, table, layout)
        else:
            conv_direct.product(b, p, pad, args["w"], out, table, layout)
            conv_direct.each_output(b, p, out, finish)
    b.ret_void()


def _padded_backward_weights(b: ir.IRBuilder, module: ir.Module, name: str, g: _Geom, args: dict, vw: int) -> None:
    """dW from the padded image: vectorised over output channels, or over positions when there are few."""
    spec = g.spec
    p = g.forward_plane(vw)
    top, left, _, _ = g.pads
    if _winograd_grad(spec, p):
        def fill(b: ir.IRBuilder, n: ir.Value, pad: ir.Value, dyt: ir.Value) -> None:
            x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")
            conv_direct.fill(b, p, x_img, spec.h, spec.w, top, left, pad)
            transpose(b, emit.gep(b, args["dy"], index(b, (n, g.y_stride)), name="dy.img"), spec.o, g.p, dyt, vw)

        def bias(b: ir.IRBuilder, n: ir.Value) -> None:
            _bias_grad(b, g, emit.gep(b, args["dy"], index(b, (n, g.y_stride))), args["db"], vw)

        conv_winograd_grad.weight_gradient(b, p, args["ws"], (args["n0"], args["n1"]), fill, bias, args["dw"])
        b.ret_void()
        return
    dot = _dot_shifted(spec, p)
    if _lanes(spec, p):
        over_channels = False  # the sums: a vector of partial sums per weight, laid out like dW
        space = conv_lanes.Space(spec, vw)
        conv_lanes.clear(b, space, args["ws"])
        live = conv_lanes.live_pairs(g.table_pairs(), spec.c, spec.o)
        n0, n1 = args["n0"], args["n1"]
        with for_range(b, n0, n1, vw, name="lg") as n:
            left = b.sub(n1, n)
            count = b.select(b.icmp_signed("<", left, i64(vw)), left, i64(vw), name="group")
            conv_lanes.fill(b, space, args["ws"], args["x"], args["dy"], n, count, g.x_stride, g.y_stride)
            conv_lanes.product(b, module, name, space, args["ws"], live)
        with for_range(b, n0, n1, name="n") as n:
            _bias_grad(b, g, emit.gep(b, args["dy"], index(b, (n, g.y_stride))), args["db"], vw)
        sums = space.sections(b, args["ws"])[2]
    elif dot is not None:
        over_channels = False  # the sums: a vector of partial sums per weight, as conv_direct's dot products
        space = conv_dot.Space(dot)
        conv_dot.clear(b, space, args["ws"])
        table = g.table_pairs()
        live = None if table is None else conv_direct.channel_rows(table, spec.c, 0, spec.o)
        with for_range(b, args["n0"], args["n1"], name="n") as n:
            x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")
            dy_img = emit.gep(b, args["dy"], index(b, (n, g.y_stride)), name="dy.img")
            dy_rows = conv_dot.fill(b, space, args["ws"], x_img, dy_img, (spec.h, spec.w, top, left))
            conv_dot.product(b, space, args["ws"], dy_rows, live)
            _bias_grad(b, g, dy_img, args["db"], vw)
        sums = space.sums(b, args["ws"])
    else:
        form = GradSpace(p)
        over_channels = form.over_channels  # else over positions (few output channels)
        pad, dy_ws, sums = form.sections(b, args["ws"])
        # pad borders, the unused rows or columns of the dy copy, and the sums: zeroed once per call
        conv_direct.zero(b, args["ws"], 0, form.floats, vw)
        with for_range(b, args["n0"], args["n1"], name="n") as n:
            x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")
            dy_img = emit.gep(b, args["dy"], index(b, (n, g.y_stride)), name="dy.img")
            conv_direct.fill(b, p, x_img, spec.h, spec.w, top, left, pad)
            if over_channels:
                conv_direct.transpose_dy(b, p, dy_img, dy_ws)
                conv_direct.weight_product(b, p, pad, dy_ws, sums, _next_images(b, g, args, n, ("x", "dy")))
            else:
                conv_direct.spread_dy(b, p, dy_img, dy_ws)
                conv_direct.dot_weight_product(b, p, pad, dy_ws, sums)
            _bias_grad(b, g, dy_img, args["db"], vw)

    dw = args["dw"]

    def add_block(b: ir.IRBuilder, offset: ir.Value, oi: ir.Value, ci: ir.Value) -> None:
        with for_range(b, 0, g.taps, name="t") as t:  # a loop: the reduction across lanes is a dozen instructions
            at = index(b, offset, t)
            if over_channels:  # dW[oi, ci, t] += dW^T[ci * taps + t, oi]
                total = emit.load(b, sums, index(b, (ci, g.taps * spec.o), (t, spec.o), oi))
            else:  # the lanes of a vector of partial sums per weight, laid out like dW
                total = emit.hsum(b, emit.load(b, sums, index(b, (at, vw)), vw))
            emit.store(b, b.fadd(emit.load(b, dw, at), total), dw, at)

    if spec.connect is not None:
        _each_connected(b, module, name, spec, add_block)
    else:
        with for_range(b, 0, spec.o, name="ao") as oi:
            with for_range(b, 0, spec.c, name="ac") as ci:
                add_block(b, index(b, (oi, spec.c * g.taps), (ci, g.taps)), oi, ci)
    b.ret_void()


def _next_images(b: ir.IRBuilder, g: _Geom, args: dict, n: ir.Value, names: tuple[str, ...]) -> list:
    """The next image's regions of arrays `names` (``x`` and/or ``dy``), to prefetch (``conv_direct.prefetching``):
    image n + 1, or n itself when it is the last of the range."""
    following = b.add(n, i64(1))
    nxt = b.select(b.icmp_signed("<", following, args["n1"]), following, n)
    sizes = {"x": (g.x_stride, g.spec.c * g.spec.h * g.spec.w), "dy": (g.y_stride, g.spec.o * g.p)}
    return [(emit.gep(b, args[a], index(b, (nxt, sizes[a][0]))), sizes[a][1]) for a in names]


def _bias_grad(b: ir.IRBuilder, g: _Geom, dy_img: ir.Value, db: ir.Value, vw: int) -> None:
    """db += each output channel's sum of dy over one image (nothing without a bias)."""
    if not g.spec.bias:
        return
    with for_range(b, 0, g.spec.o, name="o") as oi:
        total = _row_sum(b, dy_img, index(b, (oi, g.p)), g.p, vw)
        emit.store(b, b.fadd(emit.load(b, db, oi), total), db, oi)


# --- kernels -----------------------------------------------------------------------------------------


def emit_conv_forward(module: ir.Module, name: str, spec: ConvSpec, vw: int) -> ir.Function:
    """``(x, w, b, y, ws, n0, n1)``: y[n] = act(conv(x[n], w) + b) for n0 <= n < n1; ``spec.residual``: ``(x, w, b,
    y, r, ws, ...)``, y[n] = act(conv(x[n], w) + b + r[n]); ``spec.cached``: ``(x, w, b, y, ws, cache, n0, n1)``,
    `cache` a zeroed region of ``weight_cache_floats`` floats (kept for the next call);
    ``spec.claim``: ``(x, w, b, y, ws, counter, n0, n1)``, run by every thread of a call at once on the same range,
    each taking units of it from the int64 at `counter` (zero before the call) until none is left (``_claimed``)."""
    g = _check(spec)
    fn, b, args = kernel(module, name, ["x", "w", "b", "y", *(["r"] if spec.residual else []), "ws",
                                        *(["cache"] if spec.cached else []),
                                        *(["counter"] if spec.claim else []), "n0", "n1"])
    if g.padded:
        _direct_forward(b, module, name, g, args, vw)
        return fn
    ws = args["ws"]
    _zero_paired(b, g, ws, vw)
    weights = _dense_weights(b, module, name, g, args, vw)
    bias = args["b"] if spec.bias else None

    with for_range(b, args["n0"], args["n1"], name="n") as n:
        x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")
        y_img = emit.gep(b, args["y"], index(b, (n, g.y_stride)), name="y.img")
        r_img = _residual_image(b, spec, args, n)
        col = _column_matrix(b, g, x_img, ws, vw)
        with for_range(b, 0, spec.groups, name="g") as gi:
            first_out = index(b, (gi, g.og))
            w_g = Mat(emit.gep(b, weights, index(b, (first_out, g.k))), rs=g.k)
            col_g = Mat(emit.gep(b, col, index(b, (gi, g.k * g.p))), rs=g.p)
            y_g = emit.gep(b, y_img, index(b, (first_out, g.p)), name="y.g")
            r_g = emit.gep(b, r_img, index(b, (first_out, g.p)), name="r.g") if r_img is not None else None

            def store(b: ir.IRBuilder, r: ir.Value, j: ir.Value, value: ir.Value, width: int,
                      first_out=first_out, y_g=y_g, r_g=r_g) -> None:
                value = _affine(b, spec, bias, b.add(first_out, r), value, width)
                if r_g is not None:
                    value = b.fadd(value, emit.load(b, r_g, index(b, (r, g.p), j), width))
                value = activations.emit(b, value, spec.act, spec.act_args)
                emit.store(b, value, y_g, index(b, (r, g.p), j))

            gemm_nn(b, g.og, g.p, g.k, w_g, col_g, store, vw)
    b.ret_void()
    return fn


def emit_conv_backward_data(module: ir.Module, name: str, spec: ConvSpec, vw: int) -> ir.Function:
    """``(dy, w, dx, ws, n0, n1)``: dx[n] (+)= conv^T(dy[n], w), dy taken before the activation."""
    g = _check(spec)
    fn, b, args = kernel(module, name, ["dy", "w", "dx", "ws", "n0", "n1"])
    if g.padded:
        _direct_backward_data(b, module, name, g, args, vw)
        return fn
    ws = args["ws"]
    weights = _dense_weights(b, module, name, g, args, vw)
    # the direct (1x1) form writes dx itself, so it follows `accumulate`; dcol is always overwritten
    accumulate = spec.accumulate and g.pointwise

    with for_range(b, args["n0"], args["n1"], name="n") as n:
        dy_img = emit.gep(b, args["dy"], index(b, (n, g.y_stride)), name="dy.img")
        dx_img = emit.gep(b, args["dx"], index(b, (n, g.x_stride)), name="dx.img")
        dcol = dx_img if g.pointwise else ws
        with for_range(b, 0, spec.groups, name="g") as gi:
            first_out = index(b, (gi, g.og))
            w_t = Mat(emit.gep(b, weights, index(b, (first_out, g.k))), rs=1, cs=g.k)
            dy_g = Mat(emit.gep(b, dy_img, index(b, (first_out, g.p))), rs=g.p)
            dcol_g = emit.gep(b, dcol, index(b, (gi, g.k * g.p)), name="dcol.g")

            def store(b: ir.IRBuilder, r: ir.Value, j: ir.Value, value: ir.Value, width: int, dcol_g=dcol_g) -> None:
                at = index(b, (r, g.p), j)
                if accumulate:
                    value = b.fadd(emit.load(b, dcol_g, at, width), value)
                emit.store(b, value, dcol_g, at)

            gemm_nn(b, g.k, g.p, g.og, w_t, dy_g, store, vw)
        if not g.pointwise:
            if not spec.accumulate:
                conv_direct.zero(b, dx_img, 0, spec.c * spec.h * spec.w, vw)
            _col2im(b, g, dcol, dx_img, vw)
    b.ret_void()
    return fn


def emit_conv_backward_weights(module: ir.Module, name: str, spec: ConvSpec, vw: int) -> ir.Function:
    """``(x, dy, dw, db, ws, n0, n1)``: dw += sum_n dy[n] (x) x[n]; db += sum of dy (dy before the activation)."""
    g = _check(spec)
    fn, b, args = kernel(module, name, ["x", "dy", "dw", "db", "ws", "n0", "n1"])
    if g.padded:
        _padded_backward_weights(b, module, name, g, args, vw)
        return fn
    ws = args["ws"]
    _zero_paired(b, g, ws, vw)
    grad = args["dw"]
    if spec.connect is not None:
        grad = emit.gep(b, ws, g.col_floats, name="dw.full")
        conv_direct.zero(b, grad, 0, g.table_floats, vw)

    with for_range(b, args["n0"], args["n1"], name="n") as n:
        x_img = emit.gep(b, args["x"], index(b, (n, g.x_stride)), name="x.img")
        dy_img = emit.gep(b, args["dy"], index(b, (n, g.y_stride)), name="dy.img")
        col = _column_matrix(b, g, x_img, ws, vw)
        with for_range(b, 0, spec.groups, name="g") as gi:
            first_out = index(b, (gi, g.og))
            dy_g = Mat(emit.gep(b, dy_img, index(b, (first_out, g.p))), rs=g.p)
            col_g = Mat(emit.gep(b, col, index(b, (gi, g.k * g.p))), rs=g.p)
            dw_g = emit.gep(b, grad, index(b, (first_out, g.k)), name="dw.g")
            if g.transposed_dw(vw):
                dyt = emit.gep(b, ws, g.col_floats + g.table_floats, name="dyt")
                transpose(b, dy_g.base, g.og, g.p, dyt, vw)

                def add_t(b: ir.IRBuilder, r: ir.Value, j: ir.Value, value: ir.Value, width: int,
                          dw_g=dw_g) -> None:
                    for lane in range(width):  # dW^T[r, j + lane] lives at dW[j + lane, r]
                        at = index(b, (j, g.k), lane * g.k, r)
                        v = value if width == 1 else b.extract_element(value, ir.Constant(ir.IntType(32), lane))
                        emit.store(b, b.fadd(emit.load(b, dw_g, at), v), dw_g, at)

                gemm_nn(b, g.k, g.og, g.p, col_g, Mat(dyt, rs=g.og), add_t, vw, mr=4, nrv=max(1, min(3, g.og // vw)))
            else:
                def add(b: ir.IRBuilder, r: ir.Value, j: ir.Value, value: ir.Value, width: int, dw_g=dw_g) -> None:
                    at = index(b, (r, g.k), j)
                    emit.store(b, b.fadd(emit.load(b, dw_g, at, width), value), dw_g, at)

                gemm_nt(b, g.og, g.k, g.p, dy_g, col_g, add, vw)
        _bias_grad(b, g, dy_img, args["db"], vw)

    if spec.connect is not None:
        taps = g.taps
        dw = args["dw"]

        def add_block(b: ir.IRBuilder, offset: ir.Value, *_: ir.Value) -> None:
            def step(b: ir.IRBuilder, t: ir.Value, width: int) -> None:
                at = index(b, offset, t)
                emit.store(b, b.fadd(emit.load(b, dw, at, width), emit.load(b, grad, at, width)), dw, at)

            vector_loop(b, 0, taps, vw, step, name="r")

        _each_connected(b, module, name, spec, add_block)
    b.ret_void()
    return fn
