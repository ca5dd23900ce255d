"""Max and average pooling, forward and backward.

Windows are walked with constant trip counts (kh x kw), so LLVM can unroll
small windows. Where a window can reach into the padding (decided per axis
from the spec, in Python), each tap's row/column is clamped into the image
and an in-bounds flag replaces the loaded value by the padding value
(-inf for max, 0 for average): no branches, no out-of-bounds loads.

Global pooling (one window covering the whole unpadded plane) is a
reduction over a contiguous run of h*w floats and uses vector loops.

Backward scatters into dx (windows may overlap, so contributions add);
dx is zeroed first unless the spec accumulates. Max routes each window's
gradient to its first maximum in row-major order, recomputed from x.
"""

from __future__ import annotations

from collections.abc import Callable

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.elementwise import (
    entry_alloca,
    fadd_of,
    fmax_of,
    image_base,
    put,
    reduce_run,
    stride_or,
    strips,
)
from cnnc.codegen.emit import F32, I64, for_range, i64
from cnnc.codegen.gemm import vector_loop
from cnnc.codegen.specs import PoolSpec
from cnnc.ops import activations

NEG_INF = float("-inf")


def _check(spec: PoolSpec) -> None:
    if spec.kind not in ("max", "avg"):
        raise ValueError(f"unknown pooling kind {spec.kind!r}")
    if min(spec.c, spec.h, spec.w, spec.oh, spec.ow, spec.kh, spec.kw, spec.sh, spec.sw) < 1:
        raise ValueError(f"pooling sizes must be positive: {spec}")
    # Every window must overlap the image (PyTorch requires padding <= kernel / 2).
    if not (0 <= spec.pt < spec.kh and 0 <= spec.pl < spec.kw
            and (spec.oh - 1) * spec.sh - spec.pt < spec.h and (spec.ow - 1) * spec.sw - spec.pl < spec.w):
        raise ValueError(f"a pooling window lies entirely in the padding: {spec}")


def _is_global(spec: PoolSpec) -> bool:
    """One window that is exactly the unpadded plane: a plain contiguous reduction."""
    return (spec.oh, spec.ow, spec.kh, spec.kw, spec.pt, spec.pl) == (1, 1, spec.h, spec.w, 0, 0)


def _strides(spec: PoolSpec) -> tuple[int, int]:
    return stride_or(spec.x_stride, spec.c * spec.h * spec.w), stride_or(spec.y_stride, spec.c * spec.oh * spec.ow)


def _over_outputs(b: ir.IRBuilder, spec: PoolSpec, body: Callable[[ir.Value, ir.Value, ir.Value, ir.Value], None]):
    """For every output (ch, oy, ox): ``body(plane, iy0, ix0, out)``.

    plane = ch*h*w is the channel's first input element, (iy0, ix0) the
    window's top-left corner (negative in the padding), out the output index.
    """
    with for_range(b, 0, spec.c, name="ch") as ch:
        plane = b.mul(ch, i64(spec.h * spec.w), name="plane")
        with for_range(b, 0, spec.oh, name="oy") as oy:
            iy0 = b.sub(b.mul(oy, i64(spec.sh)), i64(spec.pt), name="iy0")
            out_row = b.mul(b.add(b.mul(ch, i64(spec.oh)), oy), i64(spec.ow), name="out_row")
            with for_range(b, 0, spec.ow, name="ox") as ox:
                ix0 = b.sub(b.mul(ox, i64(spec.sw)), i64(spec.pl), name="ix0")
                body(plane, iy0, ix0, b.add(out_row, ox, name="out"))


def _may_pad(start: int, stride: int, count: int, k: int, size: int) -> bool:
    """Can a window along this axis reach outside [0, size)? `start` = padding before."""
    return start > 0 or (count - 1) * stride - start + k > size


def _clamped(b: ir.IRBuilder, i: ir.Value, size: int, check: bool) -> tuple[ir.Value, ir.Value | None]:
    """(index clamped into [0, size), in-bounds flag); no flag when the axis never pads."""
    if not check:
        return i, None
    inside = b.icmp_unsigned("<", i, i64(size), name="inside")
    return b.select(inside, i, i64(0)), inside


def _over_taps(
    b: ir.IRBuilder,
    spec: PoolSpec,
    plane: ir.Value,
    iy0: ir.Value,
    ix0: ir.Value,
    body: Callable[[ir.Value, ir.Value | None], None],
) -> None:
    """For each tap of a window in row-major order: ``body(offset, valid)``.

    `offset` always addresses an element of the plane; `valid` (None if this
    spec never pads) says whether the tap is really there or is padding.
    """
    check_y = _may_pad(spec.pt, spec.sh, spec.oh, spec.kh, spec.h)
    check_x = _may_pad(spec.pl, spec.sw, spec.ow, spec.kw, spec.w)
    with for_range(b, 0, spec.kh, name="ky") as ky:
        iy, valid_y = _clamped(b, b.add(iy0, ky), spec.h, check_y)
        row = b.add(plane, b.mul(iy, i64(spec.w)), name="row")
        with for_range(b, 0, spec.kw, name="kx") as kx:
            ix, valid_x = _clamped(b, b.add(ix0, kx), spec.w, check_x)
            flags = [f for f in (valid_y, valid_x) if f is not None]
            valid = b.and_(*flags) if len(flags) == 2 else (flags[0] if flags else None)
            body(b.add(row, ix, name="tap"), valid)


def _tap_value(b: ir.IRBuilder, xb: ir.Value, offset: ir.Value, valid: ir.Value | None, pad: float) -> ir.Value:
    v = emit.load(b, xb, offset)
    return v if valid is None else b.select(valid, v, emit.f32(pad))


def _zero(b: ir.IRBuilder, base: ir.Value, count: int, vw: int) -> None:
    strips(b, count, vw, lambda i, w: emit.store(b, emit.splat(b, 0.0, w), base, i), name="z")


def emit_pool_forward(module: ir.Module, name: str, spec: PoolSpec, vw: int) -> ir.Function:
    """``(x, y, n0, n1)``: y = max or average of each kh x kw window."""
    _check(spec)
    fn, b, a = emit.kernel(module, name, ["x", "y", "n0", "n1"], noalias=True)
    x_stride, y_stride = _strides(spec)
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        xb = image_base(b, a["x"], n, x_stride, "xb")
        yb = image_base(b, a["y"], n, y_stride, "yb")
        if _is_global(spec):
            _global_forward(b, spec, xb, yb, vw)
        elif _tiles_exactly(spec):
            _tiled_forward(b, spec, xb, yb, vw)
        else:
            _over_outputs(b, spec, _window_forward(b, spec, xb, yb))
    b.ret_void()
    return fn


def _tiled_forward(b: ir.IRBuilder, spec: PoolSpec, xb: ir.Value, yb: ir.Value, vw: int) -> None:
    """Non-overlapping windows with no padding: every tap is in the image, so no bounds checks at all.

    Windows two columns wide (the usual 2x2 / 2) take a vector of outputs at a
    time: two vector loads per window row, split into even and odd columns.
    """
    is_max = spec.kind == "max"
    with for_range(b, 0, spec.c * spec.oh, name="row") as row:  # (channel, output row) pairs
        out_row = b.mul(row, i64(spec.ow))
        in_row = b.mul(row, i64(spec.kh * spec.w))

        def window(b: ir.IRBuilder, ox: ir.Value, width: int) -> None:
            first = b.add(in_row, b.mul(ox, i64(spec.kw)))
            taps = []
            for i in range(spec.kh):  # in row-major order
                if width > 1:
                    taps.extend(emit.even_odd(b, xb, b.add(first, i64(i * spec.w)), width))
                else:
                    taps.extend(emit.load(b, xb, b.add(first, i64(i * spec.w + j))) for j in range(spec.kw))
            if is_max:
                result = emit.fmax_all(b, taps)
            else:
                result = taps[0]
                for t in taps[1:]:  # in row-major order, as the general path folds them
                    result = b.fadd(result, t)
                result = b.fmul(result, emit.splat(b, 1.0 / (spec.kh * spec.kw), width), name="mean")
            emit.store(b, result, yb, b.add(out_row, ox))

        vector_loop(b, 0, spec.ow, vw if spec.kw == 2 else 1, window, name="ox")


def _global_forward(b: ir.IRBuilder, spec: PoolSpec, xb: ir.Value, yb: ir.Value, vw: int) -> None:
    """y[ch] = max or mean of the contiguous plane ch, with vector loads."""
    plane_size = spec.h * spec.w
    with for_range(b, 0, spec.c, name="ch") as ch:
        plane = emit.gep(b, xb, b.mul(ch, i64(plane_size)), name="plane")
        term = lambda i, w: emit.load(b, plane, i, w)  # noqa: B023
        if spec.kind == "max":
            result = reduce_run(b, plane_size, vw, term, fmax_of(b), NEG_INF, "max")
        else:
            total = reduce_run(b, plane_size, vw, term, fadd_of(b), 0.0, "sum")
            result = b.fmul(total, emit.f32(1.0 / plane_size), name="mean")
        emit.store(b, result, yb, ch)


def _window_forward(b: ir.IRBuilder, spec: PoolSpec, xb: ir.Value, yb: ir.Value):
    """Window body: fold the taps with max (padding -inf) or sum (padding 0, divisor kh*kw)."""
    is_max = spec.kind == "max"
    pad = NEG_INF if is_max else 0.0
    acc = entry_alloca(b, F32, "acc")

    def window(plane: ir.Value, iy0: ir.Value, ix0: ir.Value, out: ir.Value) -> None:
        b.store(emit.f32(pad), acc)

        def tap(offset: ir.Value, valid: ir.Value | None) -> None:
            v = _tap_value(b, xb, offset, valid, pad)
            old = b.load(acc, typ=F32)
            b.store(emit.fmax(b, old, v) if is_max else b.fadd(old, v), acc)

        _over_taps(b, spec, plane, iy0, ix0, tap)
        result = b.load(acc, typ=F32)
        if not is_max:
            result = b.fmul(result, emit.f32(1.0 / (spec.kh * spec.kw)), name="mean")
        emit.store(b, result, yb, out)

    return window


def emit_pool_backward(module: ir.Module, name: str, spec: PoolSpec, vw: int) -> ir.Function:
    """``(x, y, dy, dx, n0, n1)``: dx (+)= the pooling's gradient; y is not needed (max is recomputed from x)."""
    _check(spec)
    if spec.act != "none" and not takes_activation_grad(spec):
        raise ValueError("a pool's backward applies an activation's gradient only where it stores each dx once")
    fn, b, a = emit.kernel(module, name, ["x", "y", "dy", "dx", "n0", "n1"], noalias=True)
    x_stride, y_stride = _strides(spec)
    inv_area = 1.0 / (spec.kh * spec.kw)
    plane_size = spec.h * spec.w
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        xb = image_base(b, a["x"], n, x_stride, "xb")
        dyb = image_base(b, a["dy"], n, y_stride, "dyb")
        dxb = image_base(b, a["dx"], n, x_stride, "dxb")
        if spec.kind == "avg" and _is_global(spec):
            # Every element of a plane receives dy / (h*w): a broadcast store, no scatter.
            with for_range(b, 0, spec.c, name="ch") as ch:
                g = b.fmul(emit.load(b, dyb, ch), emit.f32(inv_area), name="g")
                plane = emit.gep(b, dxb, b.mul(ch, i64(plane_size)), name="plane")
                strips(b, plane_size, vw, lambda i, w: put(b, emit.splat(b, g, w), plane, i, spec.accumulate))  # noqa: B023
        elif _tiles_exactly(spec) and not spec.accumulate and spec.kind == "avg":
            _avg_spread(b, spec, xb, dyb, dxb, inv_area, vw)
        elif _tiles_exactly(spec) and not spec.accumulate:
            _max_route(b, spec, xb, dyb, dxb, vw)
        else:
            if not spec.accumulate:
                _zero(b, dxb, spec.c * plane_size, vw)
            if spec.kind == "avg":
                _over_outputs(b, spec, _avg_scatter(b, spec, dyb, dxb, inv_area))
            else:
                _over_outputs(b, spec, _max_scatter(b, spec, xb, dyb, dxb))
    b.ret_void()
    return fn


def takes_activation_grad(spec: PoolSpec) -> bool:
    """Whether the backward pass can apply the gradient of the activation before the pool as it stores dx:
    each element of dx is stored once (windows that tile the input, nothing to add to)."""
    return _tiles_exactly(spec) and not spec.accumulate and not (spec.kind == "avg" and _is_global(spec))


def _store_dx(b: ir.IRBuilder, spec: PoolSpec, xb: ir.Value, dxb: ir.Value, at: ir.Value, value: ir.Value,
              width: int) -> None:
    """dx[at:at + width] = value, times the gradient of the fused activation whose output is x (if any)."""
    if spec.act != "none":
        value = activations.emit_grad(b, emit.load(b, xb, at, width), value, spec.act, spec.act_args)
    emit.store(b, value, dxb, at)


def _tiles_exactly(spec: PoolSpec) -> bool:
    """Windows that do not overlap, need no padding and cover the whole input (LeNet's 2x2 / 2 pooling)."""
    return ((spec.kh, spec.kw) == (spec.sh, spec.sw) and (spec.pt, spec.pl) == (0, 0)
            and (spec.h, spec.w) == (spec.oh * spec.kh, spec.ow * spec.kw))


def _avg_spread(b: ir.IRBuilder, spec: PoolSpec, xb: ir.Value, dyb: ir.Value, dxb: ir.Value, inv_area: float,
                vw: int) -> None:
    """Each input element belongs to exactly one window: dx = dy / (kh*kw), stored once, no zeroing, no adds.

    Windows two columns wide take a vector of dy at a time, each lane stored twice per window row.
    """
    with for_range(b, 0, spec.c * spec.oh, name="row") as row:  # (channel, output row) pairs
        out_row = b.mul(row, i64(spec.ow))
        in_row = b.mul(row, i64(spec.kh * spec.w))

        def window(b: ir.IRBuilder, ox: ir.Value, width: int) -> None:
            g = b.fmul(emit.load(b, dyb, b.add(out_row, ox), width), emit.splat(b, inv_area, width), name="g")
            first = b.add(in_row, b.mul(ox, i64(spec.kw)))
            for i in range(spec.kh):
                at = b.add(first, i64(i * spec.w))
                if width > 1:
                    lo, hi = emit.interleave(b, g, g, width)
                    _store_dx(b, spec, xb, dxb, at, lo, width)
                    _store_dx(b, spec, xb, dxb, b.add(at, i64(width)), hi, width)
                else:
                    for j in range(spec.kw):
                        _store_dx(b, spec, xb, dxb, b.add(at, i64(j)), g, 1)

        vector_loop(b, 0, spec.ow, vw if spec.kw == 2 else 1, window, name="ox")


def _max_route(b: ir.IRBuilder, spec: PoolSpec, xb: ir.Value, dyb: ir.Value, dxb: ir.Value, vw: int) -> None:
    """Non-overlapping windows: each tap is stored once, dy at the window's first maximum and 0 elsewhere.

    Windows two columns wide take a vector of windows at a time, their taps
    split into even and odd columns as in the forward pass, and the routed
    gradients interleaved back.
    """
    with for_range(b, 0, spec.c * spec.oh, name="row") as row:  # (channel, output row) pairs
        out_row = b.mul(row, i64(spec.ow))
        in_row = b.mul(row, i64(spec.kh * spec.w))

        def window(b: ir.IRBuilder, ox: ir.Value, width: int) -> None:
            first = b.add(in_row, b.mul(ox, i64(spec.kw)))
            rows = [b.add(first, i64(i * spec.w)) for i in range(spec.kh)]
            if width > 1:
                values = [v for at in rows for v in emit.even_odd(b, xb, at, width)]
            else:
                values = [emit.load(b, xb, b.add(at, i64(j))) for at in rows for j in range(spec.kw)]
            i32 = emit.I32
            index = (lambda k: ir.Constant(ir.VectorType(i32, width), [k] * width)) if width > 1 else i32
            best, where = values[0], index(0)
            for k, v in enumerate(values[1:], start=1):  # strict >: ties stay with the earlier tap
                greater = _takes_over(b, v, best)
                best = b.select(greater, v, best)
                where = b.select(greater, index(k), where)
            g = emit.load(b, dyb, b.add(out_row, ox), width)
            zero = emit.splat(b, 0.0, width)
            routed = [b.select(b.icmp_unsigned("==", where, index(k)), g, zero) for k in range(len(values))]
            for i, at in enumerate(rows):
                if width > 1:
                    lo, hi = emit.interleave(b, routed[2 * i], routed[2 * i + 1], width)
                    _store_dx(b, spec, xb, dxb, at, lo, width)
                    _store_dx(b, spec, xb, dxb, b.add(at, i64(width)), hi, width)
                else:
                    for j in range(spec.kw):
                        _store_dx(b, spec, xb, dxb, b.add(at, i64(j)), routed[i * spec.kw + j], 1)

        vector_loop(b, 0, spec.ow, vw if spec.kw == 2 else 1, window, name="ox")


def _avg_scatter(b: ir.IRBuilder, spec: PoolSpec, dyb: ir.Value, dxb: ir.Value, inv_area: float):
    """Window body: every real tap of the window gets dy / (kh*kw)."""

    def window(plane: ir.Value, iy0: ir.Value, ix0: ir.Value, out: ir.Value) -> None:
        g = b.fmul(emit.load(b, dyb, out), emit.f32(inv_area), name="g")

        def tap(offset: ir.Value, valid: ir.Value | None) -> None:
            share = g if valid is None else b.select(valid, g, emit.f32(0.0))
            emit.store(b, b.fadd(emit.load(b, dxb, offset), share), dxb, offset)

        _over_taps(b, spec, plane, iy0, ix0, tap)

    return window


def _max_scatter(b: ir.IRBuilder, spec: PoolSpec, xb: ir.Value, dyb: ir.Value, dxb: ir.Value):
    """Window body: find the first maximum (strict >, padding is -inf) and add dy there."""
    best = entry_alloca(b, F32, "best")
    where = entry_alloca(b, I64, "where")

    def window(plane: ir.Value, iy0: ir.Value, ix0: ir.Value, out: ir.Value) -> None:
        # Start at the window's first real tap, so a window of -inf still has a valid target.
        y0 = _clamp_low(b, iy0, spec.pt > 0)
        x0 = _clamp_low(b, ix0, spec.pl > 0)
        b.store(emit.f32(NEG_INF), best)
        b.store(b.add(plane, b.add(b.mul(y0, i64(spec.w)), x0)), where)

        def tap(offset: ir.Value, valid: ir.Value | None) -> None:
            v = _tap_value(b, xb, offset, valid, NEG_INF)
            old = b.load(best, typ=F32)
            greater = _takes_over(b, v, old)
            b.store(b.select(greater, v, old), best)
            b.store(b.select(greater, offset, b.load(where, typ=I64)), where)

        _over_taps(b, spec, plane, iy0, ix0, tap)
        at = b.load(where, typ=I64)
        emit.store(b, b.fadd(emit.load(b, dxb, at), emit.load(b, dyb, out)), dxb, at)

    return window


def _takes_over(b: ir.IRBuilder, v: ir.Value, best: ir.Value) -> ir.Value:
    """Whether tap v becomes the window's maximum: v > best, or v is NaN (PyTorch's rule: the forward is NaN then,
    and the gradient goes to the window's last NaN)."""
    return b.or_(b.fcmp_ordered(">", v, best), b.fcmp_unordered("uno", v, v), name="greater")


def _clamp_low(b: ir.IRBuilder, i: ir.Value, may_be_negative: bool) -> ir.Value:
    if not may_be_negative:
        return i
    return b.select(b.icmp_signed("<", i, i64(0)), i64(0), i)
