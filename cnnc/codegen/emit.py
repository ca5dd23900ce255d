"""Small building blocks every kernel emitter uses, so kernels read like C.

- ``for_range(b, start, stop, step)`` emits a counted loop (a context manager
  yielding the induction variable), after numba's ``cgutils.for_range``.
- Constants, typed pointer arithmetic on float buffers, vector load/store,
  broadcast, horizontal sum, fused multiply-add.
- The elementary functions the activations use (``cnnc.codegen.activations``),
  for scalars and vectors alike. A polynomial ``exp`` is used because
  ``llvm.exp`` on vectors becomes scalar ``expf`` calls.

Kernels take opaque pointers (``ptr``) and ``i64`` arguments only. Every tensor
is float32; per-image strides and all loop bounds are Python ints baked into
the code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import llvmlite.ir as ir

F32 = ir.FloatType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()

def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, int(v))


def f32(v: float) -> ir.Constant:
    return ir.Constant(F32, float(v))


def vec_type(width: int) -> ir.VectorType:
    return ir.VectorType(F32, width)


class _Written(ir.Constant):
    """A constant whose value llvmlite keeps (its shuffle masks are checked) but that is written as `text`:
    llvmlite writes out every lane of a vector (``<float 0.0, float 0.0, ...>``), text that Python formats and
    LLVM parses again at each use."""

    def __init__(self, ty: ir.Type, value: Any, text: str) -> None:
        super().__init__(ty, value)
        self._text = text

    def _get_reference(self) -> str:
        return self._text


@functools.cache
def zeros(ty: ir.Type) -> ir.Constant:
    """The all-zero constant of `ty`, written ``zeroinitializer``."""
    return _Written(ty, None, "zeroinitializer")


@functools.cache
def undef(ty: ir.Type) -> ir.Constant:
    """The undefined constant of `ty`, written ``undef`` (with ``zeros``: a sixth of LeNet-5's IR text when
    written out lane by lane)."""
    return _Written(ty, ir.Undefined, "undef")


def lane0_mask(width: int) -> ir.Constant:
    """The shuffle mask that copies lane 0 to all `width` lanes: broadcasts are a seventh of a conv kernel's
    IR text when each of its 16 lanes is written out, and the text is what LLVM parses."""
    return zeros(ir.VectorType(I32, width))


def splat(b: ir.IRBuilder, value: ir.Value | float, width: int) -> ir.Value:
    """A vector with `value` in every lane (constant-folded for Python floats)."""
    if width == 1:
        return f32(value) if isinstance(value, (int, float)) else value
    if isinstance(value, (int, float)):
        return zeros(vec_type(width)) if value == 0 else ir.Constant(vec_type(width), [float(value)] * width)
    v = b.insert_element(undef(vec_type(width)), value, ir.Constant(I32, 0))
    return b.shuffle_vector(v, undef(vec_type(width)), lane0_mask(width))


def broadcast(b: ir.IRBuilder, base: ir.Value, offset: ir.Value | int, width: int) -> ir.Value:
    """The float at `offset` in every lane: a one-lane load and a shuffle, fewer instructions than splat(load)."""
    if width == 1:
        return load(b, base, offset)
    one = b.load(gep(b, base, offset), typ=ir.VectorType(F32, 1), align=4)
    return b.shuffle_vector(one, undef(ir.VectorType(F32, 1)), lane0_mask(width))


def even_odd(b: ir.IRBuilder, base: ir.Value, at: ir.Value, width: int) -> tuple[ir.Value, ir.Value]:
    """The floats at at, at + 2, ... and at at + 1, at + 3, ...: `width` of each (two scalars for width 1).

    Two vector loads split by shuffles: how 2-wide windows (pooling, Winograd tiles) take a vector of windows.
    """
    if width == 1:
        return load(b, base, at), load(b, base, b.add(at, i64(1)))
    lo, hi = load(b, base, at, width), load(b, base, b.add(at, i64(width)), width)
    pick = lambda first: ir.Constant(ir.VectorType(I32, width), list(range(first, 2 * width, 2)))  # noqa: E731
    return b.shuffle_vector(lo, hi, pick(0)), b.shuffle_vector(lo, hi, pick(1))


def interleave(b: ir.IRBuilder, even: ir.Value, odd: ir.Value, width: int) -> tuple[ir.Value, ir.Value]:
    """(e0 o0 e1 o1 ...) as two vectors of `width`: what ``even_odd`` split, put back together."""
    lanes = [i // 2 + (width if i % 2 else 0) for i in range(2 * width)]
    pick = lambda part: ir.Constant(ir.VectorType(I32, width), part)  # noqa: E731
    return b.shuffle_vector(even, odd, pick(lanes[:width])), b.shuffle_vector(even, odd, pick(lanes[width:]))


def _arg_type(name: str) -> ir.Type:
    if name in ("n0", "n1") or name.endswith("_i64"):
        return I64
    if name.endswith("_f32"):
        return F32
    return PTR


def kernel(
    module: ir.Module, name: str, args: list[str], noalias: bool = False
) -> tuple[ir.Function, ir.IRBuilder, dict[str, ir.Argument]]:
    """Declare ``void name(...)``: ``n0``, ``n1`` and ``*_i64`` arguments are i64, ``*_f32`` float, the rest pointers.

    `noalias` promises that no two pointer arguments overlap (only for kernels
    the runtime never calls in place). Returns the function, a builder at its
    entry, and the arguments by name.
    """
    types = [_arg_type(a) for a in args]
    fn = ir.Function(module, ir.FunctionType(VOID, types), name=name)
    for arg, a in zip(fn.args, args):
        arg.name = a
        if noalias and arg.type == PTR:
            arg.add_attribute("noalias")
    fn.attributes.add("nounwind")
    if _declaring.get() == (id(module), name):
        raise _Declared(fn.ftype)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    return fn, b, {a: arg for arg, a in zip(fn.args, args)}


class _Declared(Exception):  # noqa: N818 - not an error: how `signature` stops an emitter at its declaration
    def __init__(self, ftype: ir.FunctionType) -> None:
        self.ftype = ftype


_declaring: ContextVar[tuple[int, str] | None] = ContextVar("_declaring", default=None)  # (id(module), kernel name)


def signature(emitter: Callable[..., Any], name: str, spec: Any, width: int) -> ir.FunctionType:
    """The type of kernel `name` as `emitter` declares it, without its body.

    The entry points need only the kernels' declarations; each body is built
    by the process that compiles it (``cnnc.codegen.target``), so two processes
    share the work of building them. The emitter runs up to its ``kernel``
    call for `name` (not a helper's it declares first), which stops it.
    """
    module = ir.Module(name=name)
    token = _declaring.set((id(module), name))
    try:
        emitter(module, name, spec, width)
    except _Declared as declared:
        return declared.ftype
    finally:
        _declaring.reset(token)
    return module.get_global(name).ftype  # (an emitter that declares its function without ``kernel``)


@contextmanager
def for_range(
    b: ir.IRBuilder, start: ir.Value | int, stop: ir.Value | int, step: int = 1, name: str = "i"
) -> Iterator[ir.Value]:
    """Emit ``for (i = start; i < stop; i += step) { body }``; the body is the with-block."""
    start = i64(start) if isinstance(start, int) else start
    stop = i64(stop) if isinstance(stop, int) else stop
    pre = b.block
    head = b.append_basic_block(f"{name}.head")
    body = b.append_basic_block(f"{name}.body")
    done = b.append_basic_block(f"{name}.end")
    b.branch(head)
    b.position_at_end(head)
    idx = b.phi(I64, name=name)
    idx.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", idx, stop), body, done)
    b.position_at_end(body)
    yield idx
    nxt = b.add(idx, i64(step), name=f"{name}.next")
    idx.add_incoming(nxt, b.block)
    b.branch(head)
    b.position_at_end(done)


def gep(b: ir.IRBuilder, base: ir.Value, offset: ir.Value | int, name: str = "") -> ir.Value:
    """Address of float element `offset` of `base`."""
    off = i64(offset) if isinstance(offset, int) else offset
    return b.gep(base, [off], source_etype=F32, inbounds=True, name=name)


def load(b: ir.IRBuilder, base: ir.Value, offset: ir.Value | int, width: int = 1) -> ir.Value:
    """Load one float (width 1) or `width` consecutive floats as a vector (unaligned)."""
    p = gep(b, base, offset)
    if width == 1:
        return b.load(p, typ=F32, align=4)
    return b.load(p, typ=vec_type(width), align=4)


def store(b: ir.IRBuilder, value: ir.Value, base: ir.Value, offset: ir.Value | int) -> None:
    b.store(value, gep(b, base, offset), align=4)


def intrinsic(b: ir.IRBuilder, name: str, ty: ir.Type, args: list[ir.Value], nargs: int | None = None) -> ir.Value:
    """Call an overloaded LLVM intrinsic such as ``llvm.fma`` on scalar or vector `ty`."""
    module = b.module
    suffix = f"v{ty.count}f32" if isinstance(ty, ir.VectorType) else "f32"
    full = f"{name}.{suffix}"
    fn = module.globals.get(full)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ty, [ty] * (nargs or len(args))), name=full)
    return b.call(fn, args)


def prefetch(b: ir.IRBuilder, base: ir.Value, offset: ir.Value | int) -> None:
    """Ask the cache for the line holding float `offset` of `base`, for reading soon (no fault, no effect on
    the results: the address may lie past the data)."""
    module = b.module
    fn = module.globals.get("llvm.prefetch.p0")
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, I32, I32, I32]), name="llvm.prefetch.p0")
    b.call(fn, [b.gep(base, [i64(offset) if isinstance(offset, int) else offset], source_etype=F32),
                ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def fma(b: ir.IRBuilder, x: ir.Value, y: ir.Value, acc: ir.Value) -> ir.Value:
    """x * y + acc: one fused instruction where the CPU has FMA, a multiply and an add where it has not.

    ``llvm.fmuladd`` rather than ``llvm.fma``: the latter must round once even
    on SSE2-only CPUs, where it becomes a call to ``fmaf`` per lane.
    """
    return intrinsic(b, "llvm.fmuladd", x.type, [x, y, acc])


def fmax(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """max(x, y), NaN when either is NaN, as PyTorch's max and max pooling (maxnum would return the other).

    x86's max instruction (``x > y ? x : y``: y when either is NaN) and a select of x where x is NaN: the
    three instructions x86 needs for ``llvm.maxnum`` too.
    """
    larger = b.select(b.fcmp_ordered(">", x, y), x, y)
    return b.select(b.fcmp_unordered("uno", x, x), x, larger)


def fmax_all(b: ir.IRBuilder, values: list[ir.Value]) -> ir.Value:
    """The largest of `values` (folded in order), NaN when any is NaN: fewer instructions than a fmax chain.

    x86 max instructions (each ``v > m ? v : m``) fold the values, the taps are compared for NaN in pairs
    (one unordered compare covers two), and one select puts the NaN back.
    """
    if len(values) == 1:
        return values[0]
    m = values[0]
    for v in values[1:]:
        m = b.select(b.fcmp_ordered(">", m, v), m, v)
    nan = None
    for i in range(0, len(values), 2):
        pair = b.fcmp_unordered("uno", values[i], values[min(i + 1, len(values) - 1)])
        nan = pair if nan is None else b.or_(nan, pair)
    return b.select(nan, _like(b, m, math.nan), m)


def clamp(b: ir.IRBuilder, x: ir.Value, lo: float, hi: float) -> ir.Value:
    """x limited to [lo, hi], NaN staying NaN: one x86 max and one min (maxnum/minnum would turn NaN into lo)."""
    x = b.select(b.fcmp_ordered("<", x, _like(b, x, lo)), _like(b, x, lo), x)
    return b.select(b.fcmp_ordered(">", x, _like(b, x, hi)), _like(b, x, hi), x)


def hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Sum of a vector's lanes (a scalar passes through): halves added pairwise, log2(width) vector adds."""
    if not isinstance(v.type, ir.VectorType):
        return v
    width = v.type.count
    while width > 1:
        half = width // 2
        lanes = [ir.Constant(ir.VectorType(I32, half), list(range(start, start + half))) for start in (0, half)]
        v = b.fadd(b.shuffle_vector(v, undef(v.type), lanes[0]), b.shuffle_vector(v, undef(v.type), lanes[1]))
        width = half
    return b.extract_element(v, ir.Constant(I32, 0))


def _like(b: ir.IRBuilder, v: ir.Value, c: float) -> ir.Value:
    return splat(b, c, v.type.count) if isinstance(v.type, ir.VectorType) else f32(c)


def _int_like(v: ir.Value) -> ir.Type:
    return ir.VectorType(I32, v.type.count) if isinstance(v.type, ir.VectorType) else I32


def exp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """e**x for float32 scalars or vectors, relative error about 2e-7 (Cephes expf).

    x = n ln2 + r with |r| <= ln2/2; e**r by a degree-6 polynomial; 2**n built
    in the exponent bits. Inputs are clamped to [-87.3, 88.7] (no inf, no denormals); NaN gives NaN.
    """
    c = lambda v: _like(b, x, v)  # noqa: E731
    x = clamp(b, x, -87.33654, 88.72283)
    n = intrinsic(b, "llvm.rint", x.type, [b.fmul(x, c(1.44269504088896341))])
    r = b.fsub(x, b.fmul(n, c(0.693359375)))
    r = b.fsub(r, b.fmul(n, c(-2.12194440e-4)))
    p = c(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = fma(b, p, r, c(coef))
    r2 = b.fmul(r, r)
    p = fma(b, p, r2, b.fadd(r, c(1.0)))
    ity = _int_like(x)
    # n as an integer without fptosi (poison for NaN): n + 1.5 * 2**23 holds n in its low mantissa bits
    ni = b.sub(b.bitcast(b.fadd(n, c(12582912.0)), ity), _iconst(ity, 0x4B400000))
    scale = b.bitcast(b.shl(b.add(ni, _iconst(ity, 127)), _iconst(ity, 23)), x.type)
    return b.fmul(p, scale)


def _iconst(ity: ir.Type, value: int) -> ir.Constant:
    return ir.Constant(ity, [value] * ity.count) if isinstance(ity, ir.VectorType) else ir.Constant(ity, value)


# log(1 + f) ~ f - f^2/2 + f^3 * P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes logf coefficients).
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


def log(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Natural log of positive, normal float32 scalars or vectors (relative error about 1e-7), without libm.

    x = 2**e * m with m in [sqrt(1/2), sqrt(2)); log x = e ln2 + log(1 + f), f = m - 1.
    """
    c = lambda v: _like(b, x, v)  # noqa: E731
    ity = _int_like(x)
    bits = b.bitcast(x, ity)
    e = b.sub(b.ashr(bits, _iconst(ity, 23)), _iconst(ity, 126))  # x = 2**e * m0, m0 in [0.5, 1)
    m0 = b.bitcast(b.or_(b.and_(bits, _iconst(ity, 0x807FFFFF)), _iconst(ity, 0x3F000000)), x.type)
    small = b.fcmp_ordered("<", m0, c(0.7071067811865476), name="small")
    e = b.select(small, b.sub(e, _iconst(ity, 1)), e)
    f = b.fsub(b.select(small, b.fadd(m0, m0), m0), c(1.0), name="f")
    ef = b.sitofp(e, x.type)
    f2 = b.fmul(f, f)
    p = c(_LOG_POLY[0])
    for coef in _LOG_POLY[1:]:
        p = fma(b, p, f, c(coef))
    r = b.fmul(b.fmul(p, f), f2)
    r = fma(b, ef, c(-2.12194440e-4), r)
    r = fma(b, f2, c(-0.5), r)
    return fma(b, ef, c(0.693359375), b.fadd(f, r))


def cos_2pi(b: ir.IRBuilder, u: ir.Value) -> ir.Value:
    """cos(2 pi u) for scalars or vectors: u reduced to [-1/2, 1/2], then the even Taylor series to x^18.

    The truncation error is below 2e-8 on [-pi, pi].
    """
    c = lambda v: _like(b, u, v)  # noqa: E731
    t = b.fsub(u, intrinsic(b, "llvm.rint", u.type, [u]))
    x = b.fmul(t, c(6.283185307179586))
    x2 = b.fmul(x, x)
    p = c(0.0)
    fact = 1.0
    terms = []
    for k in range(10):  # cos x = sum (-1)^k x^2k / (2k)!
        if k:
            fact *= (2 * k - 1) * (2 * k)
        terms.append((-1) ** k / fact)
    for coef in reversed(terms):
        p = fma(b, p, x2, c(coef))
    return p


# tanh(x) ~ x P(x^2) / Q(x^2) on [-8, 8], fitted for this project (a least-squares fit reweighted towards
# minimax); relative error below 1.6e-6 in float32, and |tanh(x)| > 1 - 2.3e-7 beyond 8, where it is clamped.
_TANH_P = (1.0, 0.12763893604278564, 0.002748541533946991, 7.547754648840055e-06, -6.819717679462656e-09)
_TANH_Q = (1.0, 0.4609718918800354, 0.023073269054293633, 0.0002033949422184378)


def tanh(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """tanh for scalars or vectors: a rational function, about a third of the work of one through exp.

    The clamp is written with compares so that NaN propagates (maxnum/minnum would turn it into -1).
    """
    c = lambda v: _like(b, x, v)  # noqa: E731
    x = b.select(b.fcmp_ordered(">", x, c(8.0)), c(8.0), x)
    x = b.select(b.fcmp_ordered("<", x, c(-8.0)), c(-8.0), x)
    z = b.fmul(x, x)
    p = c(_TANH_P[-1])
    for coef in reversed(_TANH_P[:-1]):
        p = fma(b, p, z, c(coef))
    q = c(_TANH_Q[-1])
    for coef in reversed(_TANH_Q[:-1]):
        q = fma(b, q, z, c(coef))
    return b.fdiv(b.fmul(x, p), q)


def sigmoid(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """1 / (1 + e**-x)."""
    one = _like(b, x, 1.0)
    return b.fdiv(one, b.fadd(one, exp(b, b.fsub(_like(b, x, 0.0), x))))
