"""The LLVM expressions of the activations: ``f(b, x, args)`` and its gradient ``g(b, v, dy, args)``.

Each works on a float32 scalar or vector (the conv, dense and element-wise
kernels call them in registers). ``v`` is the activation's saved output,
or its input for the activations whose ``grad_from`` is ``"input"``
(``cnnc.ops.activations``). ``args`` are the layer's arguments by name.
The op table (``cnnc.ops.activations.TABLE``) refers to these functions.
"""

from __future__ import annotations

import math

import llvmlite.ir as ir

from cnnc.codegen import emit


def const(b: ir.IRBuilder, like: ir.Value, value: float) -> ir.Value:
    """`value` as a scalar or a vector matching `like`."""
    return emit.splat(b, value, like.type.count) if isinstance(like.type, ir.VectorType) else emit.f32(value)


def relu(b: ir.IRBuilder, x: ir.Value, args: dict) -> ir.Value:
    """x < 0 ? 0 : x, so relu(NaN) = NaN as in PyTorch (one x86 max, as maxnum(x, 0) costs)."""
    return b.select(b.fcmp_ordered("<", x, const(b, x, 0.0)), const(b, x, 0.0), x)


def relu_grad(b: ir.IRBuilder, y: ir.Value, dy: ir.Value, args: dict) -> ir.Value:
    """dy where y > 0 or y is NaN, as PyTorch's threshold_backward (y <= 0 ? 0 : dy)."""
    return b.select(b.fcmp_unordered(">", y, const(b, y, 0.0)), dy, const(b, y, 0.0))


def leaky_relu(b: ir.IRBuilder, x: ir.Value, args: dict) -> ir.Value:
    return b.select(b.fcmp_ordered(">", x, const(b, x, 0.0)), x, b.fmul(x, const(b, x, args["alpha"])))


def leaky_relu_grad(b: ir.IRBuilder, y: ir.Value, dy: ir.Value, args: dict) -> ir.Value:
    return b.select(b.fcmp_ordered(">", y, const(b, y, 0.0)), dy, b.fmul(dy, const(b, y, args["alpha"])))


def sigmoid(b: ir.IRBuilder, x: ir.Value, args: dict) -> ir.Value:
    return emit.sigmoid(b, x)


def sigmoid_grad(b: ir.IRBuilder, y: ir.Value, dy: ir.Value, args: dict) -> ir.Value:
    return b.fmul(dy, b.fmul(y, b.fsub(const(b, y, 1.0), y)))


def tanh(b: ir.IRBuilder, x: ir.Value, args: dict) -> ir.Value:
    return emit.tanh(b, x)


def tanh_grad(b: ir.IRBuilder, y: ir.Value, dy: ir.Value, args: dict) -> ir.Value:
    return b.fmul(dy, b.fsub(const(b, y, 1.0), b.fmul(y, y)))


def expm1(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """e**x - 1 without the cancellation near 0: the Taylor series to x**9 for |x| < 1/2 (error below 3e-10)."""
    c = lambda v: const(b, x, v)  # noqa: E731
    p = c(1.0 / math.factorial(9))
    for k in range(8, 0, -1):
        p = emit.fma(b, p, x, c(1.0 / math.factorial(k)))
    small = b.fcmp_ordered("<", emit.intrinsic(b, "llvm.fabs", x.type, [x]), c(0.5))
    return b.select(small, b.fmul(p, x), b.fsub(emit.exp(b, x), c(1.0)))


def elu(b: ir.IRBuilder, x: ir.Value, args: dict) -> ir.Value:
    """x if x > 0 else alpha (e**x - 1); NaN stays NaN (exp's clamp would turn it into -alpha)."""
    neg = b.fmul(const(b, x, args["alpha"]), expm1(b, x))
    return b.select(b.fcmp_unordered(">", x, const(b, x, 0.0)), x, neg)


def elu_grad(b: ir.IRBuilder, y: ir.Value, dy: ir.Value, args: dict) -> ir.Value:
    """1 where y > 0, else alpha e**x = y + alpha (alpha >= 0, so y > 0 exactly when x > 0)."""
    neg = b.fmul(dy, b.fadd(y, const(b, y, args["alpha"])))
    return b.select(b.fcmp_ordered(">", y, const(b, y, 0.0)), dy, neg)


def silu(b: ir.IRBuilder, x: ir.Value, args: dict) -> ir.Value:
    """x sigmoid(x)."""
    return b.fmul(x, emit.sigmoid(b, x))


def silu_grad(b: ir.IRBuilder, x: ir.Value, dy: ir.Value, args: dict) -> ir.Value:
    """s (1 + x (1 - s)) with s = sigmoid(x), from the input x."""
    s = emit.sigmoid(b, x)
    one = const(b, x, 1.0)
    return b.fmul(dy, b.fmul(s, emit.fma(b, x, b.fsub(one, s), one)))


# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (|erf| rounds to 1 in float32 beyond): the rational approximation
# of Eigen's generic_fast_erf_float; relative error below 7e-8 in exact arithmetic, 4e-7 in float32.
_ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
          -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
_ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
          -1.45660718464996e-05)


def erf(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """erf for scalars or vectors, without libm; the clamps are written with compares so that NaN propagates.

    The result is clamped to [-1, 1], so that 1 + erf(x) is never negative (gelu keeps its sign far out).
    """
    c = lambda v: const(b, x, v)  # noqa: E731
    x = b.select(b.fcmp_ordered(">", x, c(4.0)), c(4.0), x)
    x = b.select(b.fcmp_ordered("<", x, c(-4.0)), c(-4.0), x)
    z = b.fmul(x, x)
    p = c(_ERF_P[-1])
    for coef in reversed(_ERF_P[:-1]):
        p = emit.fma(b, p, z, c(coef))
    q = c(_ERF_Q[-1])
    for coef in reversed(_ERF_Q[:-1]):
        q = emit.fma(b, q, z, c(coef))
    y = b.fdiv(b.fmul(x, p), q)
    y = b.select(b.fcmp_ordered(">", y, c(1.0)), c(1.0), y)
    return b.select(b.fcmp_ordered("<", y, c(-1.0)), c(-1.0), y)


def gelu(b: ir.IRBuilder, x: ir.Value, args: dict) -> ir.Value:
    """x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, the exact form, computed as PyTorch does in float32.

    For x far below 0, 1 + erf cancels: the absolute error is about 1e-7 |x| there (the relative error grows).
    """
    half_x = b.fmul(x, const(b, x, 0.5))
    return emit.fma(b, half_x, erf(b, b.fmul(x, const(b, x, math.sqrt(0.5)))), half_x)


def gelu_grad(b: ir.IRBuilder, x: ir.Value, dy: ir.Value, args: dict) -> ir.Value:
    """Phi(x) + x phi(x), from the input x: phi(x) = e**(-x^2/2) / sqrt(2 pi)."""
    c = lambda v: const(b, x, v)  # noqa: E731
    cdf = emit.fma(b, erf(b, b.fmul(x, c(math.sqrt(0.5)))), c(0.5), c(0.5))
    pdf = b.fmul(emit.exp(b, b.fmul(b.fmul(x, x), c(-0.5))), c(1.0 / math.sqrt(2.0 * math.pi)))
    return b.fmul(dy, emit.fma(b, x, pdf, cdf))
