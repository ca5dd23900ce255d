"""Loss kernels: per-image loss value and the scaled gradient with respect to the network output.

``(x, target, dx, loss, scale_f32, smooth_f32, n0, n1)``: loss[n] is one float
per image, dx[n * dx_stride + j] = scale * dLoss_n / dx_j. The runtime passes
scale (1/N for cross entropy, 1/(N*k) for mse) and averages loss[] itself.

- cross_entropy: target holds one int32 label per image (validated by the
  runtime). With label smoothing e (PyTorch's ``label_smoothing``) the target
  distribution is q = (1 - e) onehot(label) + e / k, so
  loss = logsumexp(x) - (1 - e) x[label] - (e / k) sum(x), with the maximum
  subtracted first, and dx = scale * (softmax(x) - q). exp(x - max) is stored
  into dx on the way and rescaled afterwards, so exp runs once per element.
  With e = 0 the operations give the same bits as the plain formulas.
- mse: target is float32, k contiguous floats per image. loss = sum (x - t)^2,
  dx = 2 * scale * (x - t).

x[label] is read before dx is written, so the kernel is also correct when the
runtime reuses the logits buffer for dx (pointers are not marked noalias).
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.elementwise import fadd_of, fmax_of, image_base, reduce_run, stride_or, strips
from cnnc.codegen.emit import I32, for_range
from cnnc.codegen.specs import LossSpec


def emit_loss(module: ir.Module, name: str, spec: LossSpec, vw: int) -> ir.Function:
    """``(x, target, dx, loss, scale_f32, smooth_f32, n0, n1)``: loss[n] and dx = scale * dLoss_n/dx."""
    if spec.kind not in KERNELS or spec.k < 1:
        raise ValueError(f"unsupported loss {spec}")
    fn, b, a = emit.kernel(module, name, ["x", "target", "dx", "loss", "scale_f32", "smooth_f32", "n0", "n1"])
    x_stride, dx_stride = stride_or(spec.x_stride, spec.k), stride_or(spec.dx_stride, spec.k)
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        xb = image_base(b, a["x"], n, x_stride, "xb")
        dxb = image_base(b, a["dx"], n, dx_stride, "dxb")
        value = KERNELS[spec.kind](b, spec.k, vw, xb, dxb, a, n)
        emit.store(b, value, a["loss"], n)
    b.ret_void()
    return fn


def _cross_entropy(b: ir.IRBuilder, k: int, vw: int, xb: ir.Value, dxb: ir.Value, a: dict[str, ir.Value],
                   n: ir.Value) -> ir.Value:
    labels, scale, smooth = a["target"], a["scale_f32"], a["smooth_f32"]
    label_ptr = b.gep(labels, [n], source_etype=I32, inbounds=True)
    label = b.sext(b.load(label_ptr, typ=I32, align=4), emit.I64, name="label")
    x_label = emit.load(b, xb, label)
    top = reduce_run(b, k, vw, lambda i, w: emit.load(b, xb, i, w), fmax_of(b), float("-inf"), "max")
    spread = b.fmul(smooth, emit.f32(1.0 / k), name="spread")  # e / k: every class's share of the target
    hit = b.fsub(emit.f32(1.0), smooth, name="hit")  # 1 - e: the label's extra share

    def exp_term(i: ir.Value, width: int) -> ir.Value:
        e = emit.exp(b, b.fsub(emit.load(b, xb, i, width), emit.splat(b, top, width)))
        emit.store(b, e, dxb, i)
        return e

    total = reduce_run(b, k, vw, exp_term, fadd_of(b), 0.0, "sum")  # >= 1: the max term is exp(0)
    logits = reduce_run(b, k, vw, lambda i, w: emit.load(b, xb, i, w), fadd_of(b), 0.0, "logits")
    ratio = b.fdiv(scale, total, name="ratio")
    floor = b.fmul(scale, spread, name="floor")

    def gradient(i: ir.Value, w: int) -> None:
        p = b.fmul(emit.load(b, dxb, i, w), emit.splat(b, ratio, w))
        emit.store(b, b.fsub(p, emit.splat(b, floor, w)), dxb, i)

    strips(b, k, vw, gradient)
    emit.store(b, b.fsub(emit.load(b, dxb, label), b.fmul(scale, hit)), dxb, label)
    target_term = b.fsub(b.fsub(top, b.fmul(x_label, hit)), b.fmul(logits, spread))
    return b.fadd(target_term, emit.log(b, total), name="ce")


def _mse(b: ir.IRBuilder, k: int, vw: int, xb: ir.Value, dxb: ir.Value, a: dict[str, ir.Value],
         n: ir.Value) -> ir.Value:
    tb = image_base(b, a["target"], n, k, "tb")
    two_scale = b.fmul(a["scale_f32"], emit.f32(2.0), name="two_scale")

    def term(i: ir.Value, width: int) -> ir.Value:
        d = b.fsub(emit.load(b, xb, i, width), emit.load(b, tb, i, width), name="d")
        emit.store(b, b.fmul(d, emit.splat(b, two_scale, width)), dxb, i)
        return b.fmul(d, d)

    return reduce_run(b, k, vw, term, fadd_of(b), 0.0, "sq")


# One kernel body per loss of ``cnnc_runtime.losses.LOSSES``: (builder, k, vector width, x, dx, the kernel's
# arguments by name, image index) -> that image's loss, dx written.
KERNELS = {"cross_entropy": _cross_entropy, "mse": _mse}
