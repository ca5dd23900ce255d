"""Batch normalization kernels: partial sums per shard, the per-channel affine maps, and folding.

A training step reduces whole-batch statistics across shards (the runtime
adds the float64 partial sums of each shard in a fixed order, see
``cnnc_runtime.batchnorm``), so the kernels split at the reduction:

- ``stats``: a shard's per-channel sum and sum of squared deviations from
  the shard's own mean (two passes: Chan's combination is then exact and
  safe from cancellation);
- ``apply``: y = x * scale + shift per channel (training, and inference when
  the batchnorm follows no conv or dense), with a fused activation;
- ``grad_sums``: a shard's per-channel sum(dy) and sum(dy * (x - mean));
- ``backward``: dx (+)= k * dy + cx * x + cc per channel (the full gradient
  through the batch statistics, its coefficients from the reduced sums);
- ``fold``: a batchnorm folded into the weight and bias of the conv or dense before it.

Each plane of ``hw`` floats is summed in float32 vector lanes, then added to
a float64 accumulator per channel, so a batch of any size sums precisely.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.elementwise import image_base, put, reduce_run, stride_or, strips
from cnnc.codegen.emit import F32, for_range, i64
from cnnc.codegen.specs import BatchNormSpec, FoldSpec
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


def _planes(b: ir.IRBuilder, a: dict, spec: BatchNormSpec, names: dict[str, int], body) -> None:
    """``body(c, {name: plane base})`` for every image of [n0, n1) and channel c, images outermost (streaming)."""
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        bases = {k: image_base(b, a[k], n, stride, f"{k}b") for k, stride in names.items()}
        with for_range(b, 0, spec.c, name="c") as c:
            at = b.mul(c, i64(spec.hw))
            body(c, {k: emit.gep(b, v, at) for k, v in bases.items()})


def emit_bn_stats(module: ir.Module, name: str, spec: BatchNormSpec, vw: int) -> ir.Function:
    """``(x, partial, n0, n1)``: partial[c] = sum of channel c over images [n0, n1) and positions,
    partial[C + c] = sum of (x - shard mean)^2; float64."""
    fn, b, a = emit.kernel(module, name, ["x", "partial", "n0", "n1"])
    c, hw = spec.c, spec.hw
    x_stride = stride_or(spec.x_stride, c * hw)
    _zero(b, a["partial"], 2 * c)
    total = lambda p: reduce_run(b, hw, vw, lambda i, w: emit.load(b, p["x"], i, w), lambda s, v: b.fadd(s, v), 0.0)
    _planes(b, a, spec, {"x": x_stride}, lambda ch, p: _add_double(b, a["partial"], ch, total(p)))
    count = b.sitofp(b.mul(b.sub(a["n1"], a["n0"]), i64(hw)), F64)

    def squares(ch: ir.Value, p: dict) -> None:
        mean = b.fptrunc(b.fdiv(b.load(_dslot(b, a["partial"], ch), typ=F64, align=8), count), F32)

        def term(i: ir.Value, w: int) -> ir.Value:
            d = b.fsub(emit.load(b, p["x"], i, w), emit.splat(b, mean, w))
            return b.fmul(d, d)

        _add_double(b, a["partial"], b.add(ch, i64(c)), reduce_run(b, hw, vw, term, lambda s, v: b.fadd(s, v), 0.0))

    _planes(b, a, spec, {"x": x_stride}, squares)
    b.ret_void()
    return fn


def emit_bn_apply(module: ir.Module, name: str, spec: BatchNormSpec, vw: int) -> ir.Function:
    """``(x, scale, shift, y, n0, n1)``: y = act(x * scale[c] + shift[c]); y may equal x."""
    fn, b, a = emit.kernel(module, name, ["x", "scale", "shift", "y", "n0", "n1"])
    c, hw = spec.c, spec.hw
    strides = {"x": stride_or(spec.x_stride, c * hw), "y": stride_or(spec.y_stride, c * hw)}

    def plane(ch: ir.Value, p: dict) -> None:
        s, t = emit.load(b, a["scale"], ch), emit.load(b, a["shift"], ch)

        def body(i: ir.Value, w: int) -> None:
            v = emit.fma(b, emit.load(b, p["x"], i, w), emit.splat(b, s, w), emit.splat(b, t, w))
            emit.store(b, activations.emit(b, v, spec.act, spec.act_args), p["y"], i)

        strips(b, hw, vw, body)

    _planes(b, a, spec, strides, plane)
    b.ret_void()
    return fn


def emit_bn_grad_sums(module: ir.Module, name: str, spec: BatchNormSpec, vw: int) -> ir.Function:
    """``(x, dy, mean, partial, n0, n1)``: partial[c] = sum(dy), partial[C + c] = sum(dy * (x - mean[c])); float64."""
    fn, b, a = emit.kernel(module, name, ["x", "dy", "mean", "partial", "n0", "n1"])
    c, hw = spec.c, spec.hw
    strides = {"x": stride_or(spec.x_stride, c * hw), "dy": stride_or(spec.y_stride, c * hw)}
    _zero(b, a["partial"], 2 * c)
    fadd = lambda s, v: b.fadd(s, v)

    def plane(ch: ir.Value, p: dict) -> None:
        mean = emit.load(b, a["mean"], ch)
        _add_double(b, a["partial"], ch, reduce_run(b, hw, vw, lambda i, w: emit.load(b, p["dy"], i, w), fadd, 0.0))

        def term(i: ir.Value, w: int) -> ir.Value:
            return b.fmul(emit.load(b, p["dy"], i, w), b.fsub(emit.load(b, p["x"], i, w), emit.splat(b, mean, w)))

        _add_double(b, a["partial"], b.add(ch, i64(c)), reduce_run(b, hw, vw, term, fadd, 0.0))

    _planes(b, a, spec, strides, plane)
    b.ret_void()
    return fn


def emit_bn_backward(module: ir.Module, name: str, spec: BatchNormSpec, vw: int) -> ir.Function:
    """``(dy, x, k, cx, cc, dx, n0, n1)``: dx (+)= k[c] * dy + cx[c] * x + cc[c]."""
    fn, b, a = emit.kernel(module, name, ["dy", "x", "k", "cx", "cc", "dx", "n0", "n1"])
    c, hw = spec.c, spec.hw
    strides = {"dy": stride_or(spec.y_stride, c * hw), "x": stride_or(spec.x_stride, c * hw),
               "dx": stride_or(spec.dx_stride, c * hw)}

    def plane(ch: ir.Value, p: dict) -> None:
        k, cx, cc = (emit.load(b, a[n], ch) for n in ("k", "cx", "cc"))

        def body(i: ir.Value, w: int) -> None:
            inner = emit.fma(b, emit.load(b, p["x"], i, w), emit.splat(b, cx, w), emit.splat(b, cc, w))
            put(b, emit.fma(b, emit.load(b, p["dy"], i, w), emit.splat(b, k, w), inner), p["dx"], i, spec.accumulate)

        strips(b, hw, vw, body)

    _planes(b, a, spec, strides, plane)
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
