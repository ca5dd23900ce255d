"""A training batch gathered from the stored set in native code: the input rule of ``cnnc_runtime.inputs``.

``gather_u8(src, rows, x, geometry, norm, n0, n1)`` and ``gather_f32(...)``
write images ``[n0, n1)`` of the batch ``x`` (network inputs, contiguous):
image ``n`` is stored image ``rows[n]`` (int64) of the set at ``src``, uint8
(divided by 255) or float32, zero-padded into the input and normalized:

    x[n, c, y, x] = (v - mean[c]) / std[c],  v = src[rows[n], c, y - top, x - left] (/ 255), 0 outside it

``geometry`` (int64) is ``[h, w, top, left, s_n, s_c, s_y, s_x]``: the stored
image's size, where it sits in the input, and its element strides (a
channels-last set is read through its strides, never copied); ``norm``
(float32) is ``mean[0..C)`` then ``std[0..C)`` (0 and 1 without
``normalize``, which change no bit). The float32 operations are numpy's for
the same rule, in the same order, so a batch is the same bits either way; a
pool thread gathers the images it then trains on, without the GIL.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import F32, I64, for_range, i64
from cnnc.codegen.gemm import vector_loop
from cnnc.codegen.specs import GatherSpec

ARGS = ["src", "rows", "x", "geometry", "norm", "n0", "n1"]
GEOMETRY = ("h", "w", "top", "left", "s_n", "s_c", "s_y", "s_x")
I8 = ir.IntType(8)


def _load_stored(b: ir.IRBuilder, src: ir.Value, at: ir.Value, width: int, byte: bool) -> ir.Value:
    """`width` stored values from element `at` as float32 (uint8 scaled by 1/255, as numpy's ``/= 255``)."""
    if not byte:
        return emit.load(b, src, at, width)
    ptr = b.gep(src, [at], source_etype=I8, inbounds=True)
    raw = b.load(ptr, typ=I8 if width == 1 else ir.VectorType(I8, width), align=1)
    value = b.uitofp(raw, F32 if width == 1 else emit.vec_type(width))
    return b.fdiv(value, emit.splat(b, 255.0, width))


def emit_gather(module: ir.Module, name: str, spec: GatherSpec, vw: int) -> ir.Function:
    """The gather kernel for inputs of `spec` (see the module docstring)."""
    fn, b, a = emit.kernel(module, name, ARGS)
    g = {key: b.load(b.gep(a["geometry"], [i64(i)], source_etype=I64, inbounds=True), typ=I64, name=key)
         for i, key in enumerate(GEOMETRY)}
    c_, h_, w_ = spec.channels, spec.height, spec.width
    lo, hi = g["left"], b.add(g["left"], g["w"], name="hi")
    unit = b.icmp_signed("==", g["s_x"], i64(1), name="unit")  # a row of the stored image is contiguous
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        row = b.load(b.gep(a["rows"], [n], source_etype=I64, inbounds=True), typ=I64, name="row")
        image = b.mul(row, g["s_n"], name="image")
        with for_range(b, 0, c_, name="c") as c:
            mean, std = emit.load(b, a["norm"], c), emit.load(b, a["norm"], b.add(c, i64(c_)))
            border = b.fdiv(b.fsub(emit.f32(0.0), mean), std, name="border")
            plane = b.add(image, b.mul(c, g["s_c"]), name="plane")
            with for_range(b, 0, h_, name="y") as y:
                out = b.add(b.mul(n, i64(spec.size)), b.add(b.mul(c, i64(h_ * w_)), b.mul(y, i64(w_))), name="out")
                sy = b.sub(y, g["top"], name="sy")
                inside = b.and_(b.icmp_signed(">=", sy, i64(0)), b.icmp_signed("<", sy, g["h"]))
                first = b.select(inside, lo, i64(w_))  # a row outside the stored image is all border
                last = b.select(inside, hi, i64(w_))
                start = b.sub(b.add(plane, b.mul(sy, g["s_y"])), b.mul(lo, g["s_x"]), name="start")

                def fill(b: ir.IRBuilder, t: ir.Value, width: int, out=out, mean=mean, std=std, border=border) -> None:
                    emit.store(b, emit.splat(b, border, width), a["x"], b.add(out, t))

                def copy(width_max: int, out=out, start=start, mean=mean, std=std):
                    def body(b: ir.IRBuilder, t: ir.Value, width: int) -> None:
                        at = b.add(start, t if width_max > 1 else b.mul(t, g["s_x"]))
                        v = _load_stored(b, a["src"], at, width, spec.byte)
                        v = b.fdiv(b.fsub(v, emit.splat(b, mean, width)), emit.splat(b, std, width))
                        emit.store(b, v, a["x"], b.add(out, t))
                    return body

                vector_loop(b, 0, first, vw, fill, name="bl")
                with b.if_else(unit) as (contiguous, strided):
                    with contiguous:
                        vector_loop(b, first, last, vw, copy(vw), name="cx")
                    with strided:
                        vector_loop(b, first, last, 1, copy(1), name="sx")
                vector_loop(b, last, w_, vw, fill, name="br")
    b.ret_void()
    return fn
