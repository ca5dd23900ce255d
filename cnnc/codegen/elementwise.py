"""Elementwise kernels: activations, softmax, dropout, strided copies (add, concat, their gradients), sums.

Also the loop shapes that pool.py and loss.py share with these kernels:

- ``strips`` walks a contiguous run of floats whose length is a Python int:
  a loop of `vw`-wide vector steps, then a scalar loop for the remainder.
- ``fold`` and ``reduce_run`` are loops that carry an accumulator. It lives in
  an entry-block ``alloca`` that LLVM's mem2reg turns into a phi.

A per-image stride of 0 in a spec means "contiguous": the image's own size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import I64, for_range, i64
from cnnc.codegen.specs import CopySpec, DropoutSpec, ElementwiseSpec, FanOutSpec, NoiseSpec, SoftmaxSpec, SumSpec
from cnnc.ops import activations

# ---------------------------------------------------------------------------
# Shared loop shapes
# ---------------------------------------------------------------------------


def stride_or(stride: int, size: int) -> int:
    """The per-image stride in floats; a spec's 0 means the tensors are packed."""
    if stride and stride < size:
        raise ValueError(f"per-image stride {stride} is smaller than the image ({size} floats)")
    return stride or size


def image_base(b: ir.IRBuilder, ptr: ir.Value, n: ir.Value, stride: int, name: str = "") -> ir.Value:
    """Address of image `n` of a tensor whose images are `stride` floats apart."""
    return emit.gep(b, ptr, b.mul(n, i64(stride)), name=name)


def entry_alloca(b: ir.IRBuilder, ty: ir.Type, name: str = "") -> ir.Value:
    """A stack slot in the entry block, where mem2reg can promote it to registers."""
    with b.goto_entry_block():
        return b.alloca(ty, name=name)


def fold(
    b: ir.IRBuilder,
    start: ir.Value | int,
    stop: ir.Value | int,
    init: ir.Value,
    step_fn: Callable[[ir.Value, ir.Value], ir.Value],
    step: int = 1,
    name: str = "k",
) -> ir.Value:
    """``acc = init; for i in range(start, stop, step): acc = step_fn(i, acc)``; returns the final acc."""
    slot = entry_alloca(b, init.type, name=f"{name}.acc")
    b.store(init, slot)
    with for_range(b, start, stop, step, name=name) as i:
        b.store(step_fn(i, b.load(slot, typ=init.type)), slot)
    return b.load(slot, typ=init.type)


def strips(b: ir.IRBuilder, count: int, vw: int, body: Callable[[ir.Value, int], None], name: str = "i") -> None:
    """Call ``body(offset, width)`` over ``range(count)``: `vw`-wide vector steps, then scalar steps."""
    main = count - count % vw
    if main:
        with for_range(b, 0, main, vw, name=f"{name}.v") as i:
            body(i, vw)
    if main < count:
        with for_range(b, main, count, name=f"{name}.s") as i:
            body(i, 1)


def horizontal(b: ir.IRBuilder, v: ir.Value, combine: Callable[[ir.Value, ir.Value], ir.Value]) -> ir.Value:
    """Combine a vector's lanes into one scalar by halving (a scalar passes through)."""
    if not isinstance(v.type, ir.VectorType):
        return v
    while v.type.count > 2:
        half = v.type.count // 2
        lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(emit.I32, half), list(range(half))))
        hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(emit.I32, half), list(range(half, 2 * half))))
        v = combine(lo, hi)
    return combine(b.extract_element(v, ir.Constant(emit.I32, 0)), b.extract_element(v, ir.Constant(emit.I32, 1)))


def reduce_run(
    b: ir.IRBuilder,
    count: int,
    vw: int,
    term: Callable[[ir.Value, int], ir.Value],
    combine: Callable[[ir.Value, ir.Value], ir.Value],
    identity: float,
    name: str = "r",
) -> ir.Value:
    """Combine ``term(offset, width)`` over a contiguous run of `count` floats into one scalar.

    Vector partial results across `vw` lanes, then one horizontal combine,
    then the scalar remainder. `term` may also store (e.g. exp values).
    """
    main = count - count % vw
    total: ir.Value = emit.f32(identity)
    if main:
        acc = fold(b, 0, main, emit.splat(b, identity, vw), lambda i, a: combine(a, term(i, vw)), vw, f"{name}.v")
        total = horizontal(b, acc, combine)
    if main < count:
        total = fold(b, main, count, total, lambda i, a: combine(a, term(i, 1)), 1, f"{name}.s")
    return total


def put(b: ir.IRBuilder, value: ir.Value, base: ir.Value, offset: ir.Value, accumulate: bool) -> None:
    """``base[offset] = value``, or ``+=`` when accumulating; scalar or vector by `value`'s type."""
    if accumulate:
        width = value.type.count if isinstance(value.type, ir.VectorType) else 1
        value = b.fadd(emit.load(b, base, offset, width), value)
    emit.store(b, value, base, offset)


def fadd_of(b: ir.IRBuilder) -> Callable[[ir.Value, ir.Value], ir.Value]:
    return lambda acc, v: b.fadd(acc, v)


def fmax_of(b: ir.IRBuilder) -> Callable[[ir.Value, ir.Value], ir.Value]:
    return lambda acc, v: emit.fmax(b, acc, v)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def emit_activation_forward(module: ir.Module, name: str, spec: ElementwiseSpec, vw: int) -> ir.Function:
    """``(x, y, n0, n1)``: y = act(x) over `size` floats per image; x may equal y."""
    fn, b, a = emit.kernel(module, name, ["x", "y", "n0", "n1"])
    x_stride, y_stride = stride_or(spec.x_stride, spec.size), stride_or(spec.y_stride, spec.size)
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        xb = image_base(b, a["x"], n, x_stride, "xb")
        yb = image_base(b, a["y"], n, y_stride, "yb")

        def body(i: ir.Value, width: int) -> None:
            emit.store(b, activations.emit(b, emit.load(b, xb, i, width), spec.act, spec.act_args), yb, i)

        strips(b, spec.size, vw, body)
    b.ret_void()
    return fn


def emit_activation_backward(module: ir.Module, name: str, spec: ElementwiseSpec, vw: int) -> ir.Function:
    """``(y, dy, dx, n0, n1)``: dx (+)= dy * act'(y); y and dy use y_stride, dx x_stride; dx may equal dy.

    For an activation whose gradient reads its input, ``y`` is the saved input x (at ``v_stride``).
    """
    fn, b, a = emit.kernel(module, name, ["y", "dy", "dx", "n0", "n1"])
    x_stride, y_stride = stride_or(spec.x_stride, spec.size), stride_or(spec.y_stride, spec.size)
    v_stride = stride_or(spec.v_stride, spec.size) if spec.v_stride else y_stride
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        yb = image_base(b, a["y"], n, v_stride, "yb")
        dyb = image_base(b, a["dy"], n, y_stride, "dyb")
        dxb = image_base(b, a["dx"], n, x_stride, "dxb")

        def body(i: ir.Value, width: int) -> None:
            y, dy = emit.load(b, yb, i, width), emit.load(b, dyb, i, width)
            put(b, activations.emit_grad(b, y, dy, spec.act, spec.act_args), dxb, i, spec.accumulate)

        strips(b, spec.size, vw, body)
    b.ret_void()
    return fn


# ---------------------------------------------------------------------------
# Softmax over channels
# ---------------------------------------------------------------------------


def emit_softmax_forward(module: ir.Module, name: str, spec: SoftmaxSpec, vw: int) -> ir.Function:
    """``(x, y, n0, n1)``: y[ch, p] = exp(x[ch, p] - m[p]) / sum_ch exp(x[ch, p] - m[p]), m = max over ch.

    With hw == 1 the channels are one contiguous run, reduced with vectors;
    otherwise `vw` neighbouring positions are processed at once, looping over
    channels (the remainder positions one at a time).
    """
    fn, b, a = emit.kernel(module, name, ["x", "y", "n0", "n1"])
    c, hw = spec.c, spec.hw
    x_stride, y_stride = stride_or(spec.x_stride, c * hw), stride_or(spec.y_stride, c * hw)
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        xb = image_base(b, a["x"], n, x_stride, "xb")
        yb = image_base(b, a["y"], n, y_stride, "yb")
        if hw == 1:
            m = reduce_run(b, c, vw, lambda i, w: emit.load(b, xb, i, w), fmax_of(b), float("-inf"), "max")

            def exp_term(i: ir.Value, width: int) -> ir.Value:
                e = emit.exp(b, b.fsub(emit.load(b, xb, i, width), emit.splat(b, m, width)))
                emit.store(b, e, yb, i)
                return e

            total = reduce_run(b, c, vw, exp_term, fadd_of(b), 0.0, "sum")
            inv = b.fdiv(emit.f32(1.0), total, name="inv")
            strips(b, c, vw, lambda i, w: emit.store(b, b.fmul(emit.load(b, yb, i, w), emit.splat(b, inv, w)), yb, i))
        else:

            def positions(p: ir.Value, width: int) -> None:
                at = lambda ch: b.add(b.mul(ch, i64(hw)), p)
                m = fold(b, 0, c, emit.splat(b, float("-inf"), width),
                         lambda ch, acc: emit.fmax(b, acc, emit.load(b, xb, at(ch), width)), name="max")

                def exp_step(ch: ir.Value, acc: ir.Value) -> ir.Value:
                    e = emit.exp(b, b.fsub(emit.load(b, xb, at(ch), width), m))
                    emit.store(b, e, yb, at(ch))
                    return b.fadd(acc, e)

                total = fold(b, 0, c, emit.splat(b, 0.0, width), exp_step, name="sum")
                inv = b.fdiv(emit.splat(b, 1.0, width), total, name="inv")
                with for_range(b, 0, c, name="ch") as ch:
                    emit.store(b, b.fmul(emit.load(b, yb, at(ch), width), inv), yb, at(ch))

            strips(b, hw, vw, positions, name="p")
    b.ret_void()
    return fn


def emit_softmax_backward(module: ir.Module, name: str, spec: SoftmaxSpec, vw: int) -> ir.Function:
    """``(y, dy, dx, n0, n1)``: dx[ch, p] (+)= y[ch, p] * (dy[ch, p] - sum_ch dy[ch, p] * y[ch, p]).

    y and dy use y_stride, dx x_stride; dx may equal dy.
    """
    fn, b, a = emit.kernel(module, name, ["y", "dy", "dx", "n0", "n1"])
    c, hw = spec.c, spec.hw
    x_stride, y_stride = stride_or(spec.x_stride, c * hw), stride_or(spec.y_stride, c * hw)
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        yb = image_base(b, a["y"], n, y_stride, "yb")
        dyb = image_base(b, a["dy"], n, y_stride, "dyb")
        dxb = image_base(b, a["dx"], n, x_stride, "dxb")

        def grad(at: ir.Value, width: int, dot: ir.Value) -> None:
            y, dy = emit.load(b, yb, at, width), emit.load(b, dyb, at, width)
            put(b, b.fmul(y, b.fsub(dy, dot)), dxb, at, spec.accumulate)

        if hw == 1:
            dot = reduce_run(b, c, vw, lambda i, w: b.fmul(emit.load(b, dyb, i, w), emit.load(b, yb, i, w)),
                             fadd_of(b), 0.0, "dot")
            strips(b, c, vw, lambda i, w: grad(i, w, emit.splat(b, dot, w)))
        else:

            def positions(p: ir.Value, width: int) -> None:
                at = lambda ch: b.add(b.mul(ch, i64(hw)), p)
                dot = fold(b, 0, c, emit.splat(b, 0.0, width),
                           lambda ch, acc: emit.fma(b, emit.load(b, dyb, at(ch), width),
                                                    emit.load(b, yb, at(ch), width), acc), name="dot")
                with for_range(b, 0, c, name="ch") as ch:
                    grad(at(ch), width, dot)

            strips(b, hw, vw, positions, name="p")
    b.ret_void()
    return fn


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_U_BITS = 24  # u = (hash >> 40) / 2**24, exactly representable as float32


def _int_const(ty: ir.Type, value: int) -> ir.Constant:
    """An i64 (or <w x i64>) constant from an unsigned 64-bit Python int."""
    value &= (1 << 64) - 1
    if value >= 1 << 63:
        value -= 1 << 64
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [value] * ty.count)
    return ir.Constant(ty, value)


def mix64(b: ir.IRBuilder, z: ir.Value) -> ir.Value:
    """splitmix64's finaliser on an i64 or a vector of i64: a bijection that scrambles all bits."""
    c = lambda v: _int_const(z.type, v)  # noqa: E731
    z = b.mul(b.xor(z, b.lshr(z, c(30))), c(_MIX1))
    z = b.mul(b.xor(z, b.lshr(z, c(27))), c(_MIX2))
    return b.xor(z, b.lshr(z, c(31)))


def counter_hash(b: ir.IRBuilder, counter: ir.Value, key: ir.Value) -> ir.Value:
    """splitmix64's output for `counter` under `key` (both i64, or vectors of i64): random bits per element or
    image that depend on nothing but the seed and the counter (not on how a batch is split across threads)."""
    return mix64(b, b.add(b.mul(counter, _int_const(counter.type, _GOLDEN)), key))


def _splat_int(b: ir.IRBuilder, value: ir.Value, width: int) -> ir.Value:
    """An i64 broadcast to `width` lanes (width 1: the value itself)."""
    if width == 1:
        return value
    lanes = ir.VectorType(I64, width)
    v = b.insert_element(ir.Constant(lanes, ir.Undefined), value, ir.Constant(emit.I32, 0))
    return b.shuffle_vector(v, ir.Constant(lanes, ir.Undefined), emit.lane0_mask(width))


def dropout_keep_threshold(p: float) -> int:
    """Keep an element iff ``hash >> 40 >= threshold``, i.e. iff u = (hash >> 40) / 2**24 >= p."""
    return min(max(0, math.ceil(p * (1 << _U_BITS))), 1 << _U_BITS)


def emit_dropout_forward(module: ir.Module, name: str, spec: DropoutSpec, vw: int) -> ir.Function:
    """``(x, y, mask, seed_i64, image0_i64, n0, n1)``: mask = 1/(1-p) if u >= p else 0; y = x * mask.

    u comes from element counter ``(image0 + n) * size + i`` alone (splitmix64
    output ``mix64(mix64(seed) + counter * golden)``, top 24 bits), so the mask
    does not depend on how [n0, n1) is split across threads, nor on the strides;
    `image0` is image 0's index in the whole batch, so a batch cut into calls
    (chunks, MPI ranks) gets each image the mask the whole batch would give it.
    p = 1 drops everything (mask 0). x may equal y.
    """
    if not 0.0 <= spec.p <= 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1]: {spec.p}")
    fn, b, a = emit.kernel(module, name, ["x", "y", "mask", "seed_i64", "image0_i64", "n0", "n1"])
    size = spec.size
    x_stride, y_stride = stride_or(spec.x_stride, size), stride_or(spec.y_stride, size)
    m_stride = stride_or(spec.mask_stride, size)
    threshold = dropout_keep_threshold(spec.p)
    keep_value = 1.0 / (1.0 - spec.p) if spec.p < 1.0 else 0.0
    key = mix64(b, a["seed_i64"])
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        xb = image_base(b, a["x"], n, x_stride, "xb")
        yb = image_base(b, a["y"], n, y_stride, "yb")
        mb = image_base(b, a["mask"], n, m_stride, "mb")
        first = b.mul(b.add(a["image0_i64"], n), i64(size), name="first")  # counter of element 0 of this image

        def body(i: ir.Value, width: int) -> None:
            counter = b.add(first, i)
            if width > 1:
                lanes = ir.VectorType(I64, width)
                counter = b.add(_splat_int(b, counter, width), ir.Constant(lanes, list(range(width))))
            h = counter_hash(b, counter, _splat_int(b, key, width))
            bits = b.lshr(h, _int_const(h.type, 64 - _U_BITS))
            keep = b.icmp_unsigned(">=", bits, _int_const(bits.type, threshold))
            mask = b.select(keep, emit.splat(b, keep_value, width), emit.splat(b, 0.0, width), name="mask")
            emit.store(b, mask, mb, i)
            emit.store(b, b.fmul(emit.load(b, xb, i, width), mask), yb, i)

        strips(b, size, vw, body)
    b.ret_void()
    return fn


def emit_dropout_backward(module: ir.Module, name: str, spec: DropoutSpec, vw: int) -> ir.Function:
    """``(mask, dy, dx, n0, n1)``: dx (+)= dy * mask; dy uses y_stride, dx x_stride; dx may equal dy."""
    fn, b, a = emit.kernel(module, name, ["mask", "dy", "dx", "n0", "n1"])
    size = spec.size
    x_stride, y_stride = stride_or(spec.x_stride, size), stride_or(spec.y_stride, size)
    m_stride = stride_or(spec.mask_stride, size)
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        mb = image_base(b, a["mask"], n, m_stride, "mb")
        dyb = image_base(b, a["dy"], n, y_stride, "dyb")
        dxb = image_base(b, a["dx"], n, x_stride, "dxb")

        def body(i: ir.Value, width: int) -> None:
            put(b, b.fmul(emit.load(b, dyb, i, width), emit.load(b, mb, i, width)), dxb, i, spec.accumulate)

        strips(b, size, vw, body)
    b.ret_void()
    return fn


def emit_gaussian_noise(module: ir.Module, name: str, spec: NoiseSpec, vw: int) -> ir.Function:
    """``(x, seed_i64, image0_i64, sigma_f32, n0, n1)``: x += sigma * z with z ~ N(0, 1), in place.

    Box-Muller on two 24-bit uniforms from one splitmix64 hash of the element
    counter ``(image0 + n) * size + i`` (like dropout, so the noise does not
    depend on how the batch is split, across threads or processes):
    z = sqrt(-2 ln u1) cos(2 pi u2), u1 in (0, 1).
    """
    fn, b, a = emit.kernel(module, name, ["x", "seed_i64", "image0_i64", "sigma_f32", "n0", "n1"])
    size = spec.size
    x_stride = stride_or(spec.x_stride, size)
    key = mix64(b, a["seed_i64"])
    scale = 1.0 / (1 << _U_BITS)
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        xb = image_base(b, a["x"], n, x_stride, "xb")
        first = b.mul(b.add(a["image0_i64"], n), i64(size), name="first")

        def body(i: ir.Value, width: int) -> None:
            counter = b.add(first, i)
            if width > 1:
                lanes = ir.VectorType(I64, width)
                counter = b.add(_splat_int(b, counter, width), ir.Constant(lanes, list(range(width))))
            h = counter_hash(b, counter, _splat_int(b, key, width))
            top = b.lshr(h, _int_const(h.type, 64 - _U_BITS))
            low = b.and_(b.lshr(h, _int_const(h.type, 16)), _int_const(h.type, (1 << _U_BITS) - 1))
            fty = emit.vec_type(width) if width > 1 else emit.F32
            u1 = b.fmul(b.fadd(b.uitofp(top, fty), emit.splat(b, 0.5, width)), emit.splat(b, scale, width))
            u2 = b.fmul(b.uitofp(low, fty), emit.splat(b, scale, width))
            radius = emit.intrinsic(b, "llvm.sqrt", fty, [b.fmul(emit.log(b, u1), emit.splat(b, -2.0, width))])
            z = b.fmul(radius, emit.cos_2pi(b, u2))
            sigma = emit.splat(b, a["sigma_f32"], width)
            emit.store(b, emit.fma(b, z, sigma, emit.load(b, xb, i, width)), xb, i)

        strips(b, size, vw, body)
    b.ret_void()
    return fn


# ---------------------------------------------------------------------------
# Copy (add, concat), sum and fan-out (add of two tensors, its gradient)
# ---------------------------------------------------------------------------


def emit_copy(module: ir.Module, name: str, spec: CopySpec, vw: int) -> ir.Function:
    """``(src, dst, n0, n1)``: dst[n, dst_offset + i] (+)= src[n, src_offset + i] for i < count."""
    fn, b, a = emit.kernel(module, name, ["src", "dst", "n0", "n1"])
    if spec.src_offset + spec.count > spec.src_stride or spec.dst_offset + spec.count > spec.dst_stride:
        raise ValueError(f"copy range does not fit in the per-image strides: {spec}")
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        src = emit.gep(b, image_base(b, a["src"], n, spec.src_stride), i64(spec.src_offset), name="src")
        dst = emit.gep(b, image_base(b, a["dst"], n, spec.dst_stride), i64(spec.dst_offset), name="dst")
        strips(b, spec.count, vw, lambda i, w: put(b, emit.load(b, src, i, w), dst, i, spec.accumulate))
    b.ret_void()
    return fn


def emit_sum(module: ir.Module, name: str, spec: SumSpec, vw: int) -> ir.Function:
    """``(a, b, y, n0, n1)``: y = act(a + b) over `count` floats per image."""
    fn, bld, args = emit.kernel(module, name, ["a", "b", "y", "n0", "n1"])
    with for_range(bld, args["n0"], args["n1"], name="n") as n:
        a, b, y = (image_base(bld, args[k], n, stride, k) for k, stride in
                   (("a", spec.a_stride), ("b", spec.b_stride), ("y", spec.y_stride)))

        def body(i: ir.Value, w: int) -> None:
            total = bld.fadd(emit.load(bld, a, i, w), emit.load(bld, b, i, w))
            emit.store(bld, activations.emit(bld, total, spec.act, spec.act_args), y, i)

        strips(bld, spec.count, vw, body)
    bld.ret_void()
    return fn


def emit_fan_out(module: ir.Module, name: str, spec: FanOutSpec, vw: int) -> ir.Function:
    """``(dy, a, b, n0, n1)``: a (+)= dy and b (+)= dy over `count` floats per image (each by its flag)."""
    fn, bld, args = emit.kernel(module, name, ["dy", "a", "b", "n0", "n1"])
    with for_range(bld, args["n0"], args["n1"], name="n") as n:
        dy, a, b = (image_base(bld, args[k], n, stride, k) for k, stride in
                    (("dy", spec.dy_stride), ("a", spec.a_stride), ("b", spec.b_stride)))

        def body(i: ir.Value, w: int) -> None:
            value = emit.load(bld, dy, i, w)
            put(bld, value, a, i, spec.accumulate_a)
            put(bld, value, b, i, spec.accumulate_b)

        strips(bld, spec.count, vw, body)
    bld.ret_void()
    return fn
