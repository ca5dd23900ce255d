"""Batch normalization kernels: partial sums per shard, the per-channel affine maps, and folding.

A training step reduces whole-batch statistics across shards (the runtime
adds the float64 partial sums of each shard in a fixed order, see
``cnnc_runtime.batchnorm``), so the kernels split at the reduction:

- ``stats``: a shard's per-channel sum and sum of squared deviations from
  the shard's own mean (each plane's from its own mean, combined by Chan's
  update: safe from cancellation, and one pass over the shard);
- ``apply``: y = x * scale + shift per channel (training, and inference when
  the batchnorm follows no conv or dense), with a fused activation;
- ``grad_sums``: a shard's per-channel sum(dy) and sum(dy * (x - mean)), in one pass, after taking dy
  through a fused activation (in place);
- ``backward``: dx (+)= k * dy + cx * x + cc per channel (the full gradient
  through the batch statistics, its coefficients from the reduced sums);
- ``apply_add`` and ``grad_sums_fan_out``: a residual block's last batchnorm
  with the add after it (and the add's activation), ``apply``, the add and the
  activation in one pass forward, and the activation's gradient, the add's fan-out
  and ``grad_sums`` in one pass backward (``ResidualSpec``);
- ``fold``: a batchnorm folded into the weight and bias of the conv or dense before it.

Each plane of ``hw`` floats is summed in float32 vector lanes, then added to
a float64 accumulator per channel, so a batch of any size sums precisely.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.elementwise import entry_alloca, image_base, put, reduce_run, stride_or, strips
from cnnc.codegen.emit import F32, for_range, i64
from cnnc.codegen.specs import BatchNormSpec, FoldSpec, ResidualSpec
from cnnc.ops import activations

F64 = ir.DoubleType()


def _dslot(b: ir.IRBuilder, base: ir.Value, index: ir.Value | int) -> ir.Value:
    """Address of double `index` of `base`."""
    at = i64(index) if isinstance(index, int) else index
    return b.gep(base, [at], source_etype=F64, inbounds=True)


def _zero(b: ir.IRBuilder, partial: ir.Value, count: int) -> None:
    with for_range(b, 0, count, name="z") as i:
        b.store(ir.Constant(F64, 0.0), _dslot(b, partial, i), align=8)


def _add_double(b: ir.IRBuilder, partial: ir.Value, index: ir.Value, value: ir.Value) -> None:
    slot = _dslot(b, partial, index)
    b.store(b.fadd(b.load(slot, typ=F64, align=8), b.fpext(value, F64)), slot, align=8)


def _planes(b: ir.IRBuilder, a: dict, channels: int, hw: int, names: dict[str, int], body) -> None:
    """``body(c, {name: plane base}, n)`` for every image n of [n0, n1) and channel c (planes of `hw` floats),
    images outermost (streaming)."""
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        bases = {k: image_base(b, a[k], n, stride, f"{k}b") for k, stride in names.items()}
        with for_range(b, 0, channels, name="c") as c:
            at = b.mul(c, i64(hw))
            body(c, {k: emit.gep(b, v, at) for k, v in bases.items()}, n)


def emit_bn_stats(module: ir.Module, name: str, spec: BatchNormSpec, vw: int) -> ir.Function:
    """``(x, partial, first_i64, n0, n1)``: partial[c] = sum of channel c over images [first, n1) and positions,
    partial[C + c] = sum of (x - shard mean)^2; float64.

    One pass over the shard: each plane's sum, then (from the L1 cache) its squared deviations from its
    own mean, combined into the channel's running sums by Chan's update in float64. A shard may come in
    several calls, in order (``first``: its first image): the call from ``first`` starts the sums, the
    others add to them, with the same bits as one call.
    """
    fn, b, a = emit.kernel(module, name, ["x", "partial", "first_i64", "n0", "n1"])
    c, hw = spec.c, spec.hw
    x_stride = stride_or(spec.x_stride, c * hw)
    with b.if_then(b.icmp_signed("==", a["n0"], a["first_i64"])):
        _zero(b, a["partial"], 2 * c)
    fadd = lambda s, v: b.fadd(s, v)  # noqa: E731
    size = ir.Constant(F64, float(hw))

    def plane(ch: ir.Value, p: dict, n: ir.Value) -> None:
        total = reduce_run(b, hw, vw, lambda i, w: emit.load(b, p["x"], i, w), fadd, 0.0)
        mean32 = b.fdiv(total, emit.f32(float(hw)))

        def term(i: ir.Value, w: int) -> ir.Value:
            d = b.fsub(emit.load(b, p["x"], i, w), emit.splat(b, mean32, w))
            return b.fmul(d, d)

        m2 = b.fpext(reduce_run(b, hw, vw, term, fadd, 0.0), F64)
        total = b.fpext(total, F64)
        # Chan et al.: (count, sum, m2) of the planes so far and this plane's (hw, total, m2)
        count = b.sitofp(b.mul(b.sub(n, a["first_i64"]), i64(hw)), F64)
        sum_slot, m2_slot = _dslot(b, a["partial"], ch), _dslot(b, a["partial"], b.add(ch, i64(c)))
        before = b.load(sum_slot, typ=F64, align=8)
        seen = b.select(b.fcmp_ordered(">", count, ir.Constant(F64, 0.0)), count, ir.Constant(F64, 1.0))
        delta = b.fsub(b.fdiv(total, size), b.fdiv(before, seen))
        weight = b.fdiv(b.fmul(count, size), b.fadd(count, size))
        grown = b.fadd(b.load(m2_slot, typ=F64, align=8), b.fadd(m2, b.fmul(b.fmul(delta, delta), weight)))
        b.store(grown, m2_slot, align=8)
        b.store(b.fadd(before, total), sum_slot, align=8)

    _planes(b, a, spec.c, spec.hw, {"x": x_stride}, plane)
    b.ret_void()
    return fn


def emit_bn_apply(module: ir.Module, name: str, spec: BatchNormSpec, vw: int) -> ir.Function:
    """``(x, scale, shift, y, n0, n1)``: y = act(x * scale[c] + shift[c]); y may equal x."""
    fn, b, a = emit.kernel(module, name, ["x", "scale", "shift", "y", "n0", "n1"])
    strides = {"x": stride_or(spec.x_stride, spec.c * spec.hw), "y": stride_or(spec.y_stride, spec.c * spec.hw)}
    _apply(b, a, spec.c, spec.hw, vw, strides, spec.act, spec.act_args)
    b.ret_void()
    return fn


def emit_bn_apply_add(module: ir.Module, name: str, spec: ResidualSpec, vw: int) -> ir.Function:
    """``(x, scale, shift, r, y, n0, n1)``: y = act(x * scale[c] + shift[c] + r)."""
    fn, b, a = emit.kernel(module, name, ["x", "scale", "shift", "r", "y", "n0", "n1"])
    strides = {k: stride_or(getattr(spec, f"{k}_stride"), spec.c * spec.hw) for k in ("x", "r", "y")}
    _apply(b, a, spec.c, spec.hw, vw, strides, spec.act, spec.act_args)
    b.ret_void()
    return fn


def _apply(b: ir.IRBuilder, a: dict, c: int, hw: int, vw: int, strides: dict[str, int], act: str,
           args: tuple) -> None:
    """y = act(x * scale + shift (+ r, when `strides` has it)) over the planes."""

    def plane(ch: ir.Value, p: dict, _: ir.Value) -> None:
        s, t = emit.load(b, a["scale"], ch), emit.load(b, a["shift"], ch)

        def body(i: ir.Value, w: int) -> None:
            v = emit.fma(b, emit.load(b, p["x"], i, w), emit.splat(b, s, w), emit.splat(b, t, w))
            if "r" in p:
                v = b.fadd(v, emit.load(b, p["r"], i, w))
            emit.store(b, activations.emit(b, v, act, args), p["y"], i)

        strips(b, hw, vw, body)

    _planes(b, a, c, hw, strides, plane)


def emit_bn_grad_sums(module: ir.Module, name: str, spec: BatchNormSpec, vw: int) -> ir.Function:
    """``(x, dy, mean, partial, saved, first_i64, n0, n1)``: partial[c] = sum(dy), partial[C + c] = sum(dy * (x -
    mean[c])) over images [first, n1); float64 (a shard may come in several calls, as in ``stats``). With a
    fused activation, dy is first taken through it in place (dy = dy * act'(saved), `saved` the activation's
    output, or its input when its gradient reads that, at ``v_stride``)."""
    fn, b, a = emit.kernel(module, name, ["x", "dy", "mean", "partial", "saved", "first_i64", "n0", "n1"])
    c, hw = spec.c, spec.hw
    strides = {"x": stride_or(spec.x_stride, c * hw), "dy": stride_or(spec.y_stride, c * hw)}
    if spec.act != "none":
        strides["saved"] = stride_or(spec.v_stride or spec.y_stride, c * hw)

    def gradient(p: dict, i: ir.Value, w: int) -> ir.Value:
        dy = emit.load(b, p["dy"], i, w)
        if spec.act != "none":
            dy = activations.emit_grad(b, emit.load(b, p["saved"], i, w), dy, spec.act, spec.act_args)
            emit.store(b, dy, p["dy"], i)
        return dy

    _grad_sums(b, a, spec.c, spec.hw, vw, strides, gradient)
    b.ret_void()
    return fn


def emit_bn_grad_sums_fan_out(module: ir.Module, name: str, spec: ResidualSpec, vw: int) -> ir.Function:
    """``(x, dy, mean, partial, saved, a, b, first_i64, n0, n1)``: g = dy * act'(saved); a (+)= g, b (+)= g (each
    by its flag); partial[c] = sum(g), partial[C + c] = sum(g * (x - mean[c])), float64, as ``grad_sums`` of b."""
    fn, b, a = emit.kernel(module, name, ["x", "dy", "mean", "partial", "saved", "a", "b", "first_i64", "n0", "n1"])
    size = spec.c * spec.hw
    strides = {k: stride_or(getattr(spec, f"{k}_stride"), size) for k in ("x", "a", "b")}
    strides["dy"] = stride_or(spec.y_stride, size)
    if spec.act != "none":
        strides["saved"] = stride_or(spec.v_stride, size)

    def gradient(p: dict, i: ir.Value, w: int) -> ir.Value:
        g = emit.load(b, p["dy"], i, w)
        if spec.act != "none":
            g = activations.emit_grad(b, emit.load(b, p["saved"], i, w), g, spec.act, spec.act_args)
        put(b, g, p["a"], i, spec.accumulate_a)
        put(b, g, p["b"], i, spec.accumulate_b)
        return g

    _grad_sums(b, a, spec.c, spec.hw, vw, strides, gradient)
    b.ret_void()
    return fn


def _grad_sums(b: ir.IRBuilder, a: dict, c: int, hw: int, vw: int, strides: dict[str, int], gradient) -> None:
    """partial[c] = sum of ``gradient(planes, offset, width)`` (which may store it), partial[C + c] = sum of it
    times (x - mean[c]): each plane's float32 sums added to float64 ones, from zero in the call from ``first``."""
    with b.if_then(b.icmp_signed("==", a["n0"], a["first_i64"])):
        _zero(b, a["partial"], 2 * c)

    def plane(ch: ir.Value, p: dict, _: ir.Value) -> None:
        mean = emit.load(b, a["mean"], ch)

        def terms(i: ir.Value, w: int) -> tuple[ir.Value, ir.Value]:
            g = gradient(p, i, w)
            return g, b.fmul(g, b.fsub(emit.load(b, p["x"], i, w), emit.splat(b, mean, w)))

        first, second = _two_sums(b, hw, vw, terms)
        _add_double(b, a["partial"], ch, first)
        _add_double(b, a["partial"], b.add(ch, i64(c)), second)

    _planes(b, a, c, hw, strides, plane)


def _two_sums(b: ir.IRBuilder, count: int, vw: int, terms) -> tuple[ir.Value, ir.Value]:
    """The sums of both of ``terms(offset, width)`` over a run of `count` floats, in one pass: vector partial
    sums, one reduction across lanes each, then the scalar remainder."""
    main = count - count % vw
    totals = [emit.f32(0.0), emit.f32(0.0)]
    if main:
        slots = [entry_alloca(b, emit.vec_type(vw), name="sum2") for _ in totals]
        for slot in slots:
            b.store(emit.splat(b, 0.0, vw), slot)
        with for_range(b, 0, main, vw, name="s2.v") as i:
            for slot, value in zip(slots, terms(i, vw)):
                b.store(b.fadd(b.load(slot), value), slot)
        totals = [emit.hsum(b, b.load(slot)) for slot in slots]
    if main < count:
        slots = [entry_alloca(b, F32, name="sum2.s") for _ in totals]
        for slot, total in zip(slots, totals):
            b.store(total, slot)
        with for_range(b, main, count, name="s2.s") as i:
            for slot, value in zip(slots, terms(i, 1)):
                b.store(b.fadd(b.load(slot), value), slot)
        totals = [b.load(slot) for slot in slots]
    return totals[0], totals[1]


def emit_bn_backward(module: ir.Module, name: str, spec: BatchNormSpec, vw: int) -> ir.Function:
    """``(dy, x, k, cx, cc, dx, n0, n1)``: dx (+)= k[c] * dy + cx[c] * x + cc[c]."""
    fn, b, a = emit.kernel(module, name, ["dy", "x", "k", "cx", "cc", "dx", "n0", "n1"])
    c, hw = spec.c, spec.hw
    strides = {"dy": stride_or(spec.y_stride, c * hw), "x": stride_or(spec.x_stride, c * hw),
               "dx": stride_or(spec.dx_stride, c * hw)}

    def plane(ch: ir.Value, p: dict, _: ir.Value) -> None:
        k, cx, cc = (emit.load(b, a[n], ch) for n in ("k", "cx", "cc"))

        def body(i: ir.Value, w: int) -> None:
            inner = emit.fma(b, emit.load(b, p["x"], i, w), emit.splat(b, cx, w), emit.splat(b, cc, w))
            put(b, emit.fma(b, emit.load(b, p["dy"], i, w), emit.splat(b, k, w), inner), p["dx"], i, spec.accumulate)

        strips(b, hw, vw, body)

    _planes(b, a, spec.c, spec.hw, strides, plane)
    b.ret_void()
    return fn


def emit_bn_fold(module: ir.Module, name: str, spec: FoldSpec, vw: int) -> ir.Function:
    """``(b, gamma, beta, mean, var, scale, shift, n0, n1)``, the image range unused: per channel o,
    scale[o] = gamma[o] / sqrt(var[o] + eps) and shift[o] = (b[o] - mean[o]) * scale[o] + beta[o] (b taken
    as 0 without a bias). Inference multiplies a conv's or dense layer's sums by the scale before adding
    the shift as its bias (``ConvSpec.scale_at``), or applies both as an unfolded batchnorm."""
    fn, b, a = emit.kernel(module, name, ["b", "gamma", "beta", "mean", "var", "scale", "shift", "n0", "n1"])

    def channels(o: ir.Value, width: int) -> None:
        ty = emit.vec_type(width) if width > 1 else F32
        var = b.fadd(emit.load(b, a["var"], o, width), emit.splat(b, spec.eps, width))
        s = b.fdiv(emit.load(b, a["gamma"], o, width), emit.intrinsic(b, "llvm.sqrt", ty, [var]), name="s")
        emit.store(b, s, a["scale"], o)
        bias = emit.load(b, a["b"], o, width) if spec.bias else emit.splat(b, 0.0, width)
        shifted = b.fsub(bias, emit.load(b, a["mean"], o, width))
        emit.store(b, emit.fma(b, shifted, s, emit.load(b, a["beta"], o, width)), a["shift"], o)

    strips(b, spec.o, vw, channels)
    b.ret_void()
    return fn
