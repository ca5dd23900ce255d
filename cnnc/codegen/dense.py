"""Fully connected kernels: y = act(x W^T + b) with weight ``(o, f)``, and its two gradients.

All three are GEMMs over the batch range (``cnnc.codegen.gemm``), rows of a
batch operand being ``x_stride``/``y_stride`` apart:

- forward: ``y = x @ W^T`` (``gemm_nt``: dot products over f, vectorised over
  f, ``3 x 4`` (image, output) tiles), bias and activation before the store;
  weights larger than the cache are read once per call (every image's tile
  of an output group before the next group);
- backward data: ``dx (+)= dy @ W`` (``gemm_nn``, vectorised over f);
- backward weights: ``dW += dy^T @ x`` (``gemm_nn`` with the batch as the
  reduction, vectorised over f; weights larger than the cache row tile by
  row tile, so that dW streams through in order) and ``db += sum over images
  of dy``.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import for_range, kernel
from cnnc.codegen.gemm import Mat, column_pieces, gemm_nn, gemm_nt, index, local
from cnnc.codegen.specs import DenseSpec
from cnnc.ops import activations

# floats (512 KB): larger weights are read once per call (gemm_nt's b_outside), in tiles of 4 images by 4
# outputs where there are 32 registers; their gradient row tile by row tile. CIFAR's 4096 -> 256 layer on one
# Zen 4 core: forward 50 -> 64 GFLOP/s, weight gradient 33 -> ~48
WEIGHTS_IN_CACHE = 1 << 17


def _strides(spec: DenseSpec) -> tuple[int, int]:
    return spec.x_stride or spec.f, spec.y_stride or spec.o


def emit_dense_forward(module: ir.Module, name: str, spec: DenseSpec, vw: int) -> ir.Function:
    """``(x, w, b, y, n0, n1)``: y[n] = act(W x[n] + b)."""
    xs, ys = _strides(spec)
    fn, b, args = kernel(module, name, ["x", "w", "b", "y", "n0", "n1"])
    n0 = args["n0"]
    images = b.sub(args["n1"], n0, name="images")
    x = Mat(emit.gep(b, args["x"], index(b, (n0, xs)), name="x.first"), rs=xs)
    y = emit.gep(b, args["y"], index(b, (n0, ys)), name="y.first")
    weights = Mat(args["w"], rs=spec.f)
    bias = args["b"] if spec.bias else None

    def store(b: ir.IRBuilder, i: ir.Value, j: ir.Value, value: ir.Value, width: int) -> None:
        if bias is not None and spec.scale_at:  # a folded batchnorm's scale, then the bias
            value = emit.fma(b, value, emit.load(b, bias, b.add(j, emit.i64(spec.scale_at)), width),
                             emit.load(b, bias, j, width))
        elif bias is not None:
            value = b.fadd(value, emit.load(b, bias, j, width))
        emit.store(b, activations.emit(b, value, spec.act, spec.act_args), y, index(b, (i, ys), j))

    big = spec.o * spec.f > WEIGHTS_IN_CACHE  # read once per call, each tile of 4 outputs by all the images
    gemm_nt(b, images, spec.o, spec.f, x, weights, store, vw, b_outside=big, mr=4 if big and vw >= 16 else None)
    b.ret_void()
    return fn


def emit_dense_backward_data(module: ir.Module, name: str, spec: DenseSpec, vw: int) -> ir.Function:
    """``(dy, w, dx, n0, n1)``: dx[n] (+)= dy[n] W, dy taken before the activation."""
    xs, ys = _strides(spec)
    fn, b, args = kernel(module, name, ["dy", "w", "dx", "n0", "n1"])
    n0 = args["n0"]
    images = b.sub(args["n1"], n0, name="images")
    dy = Mat(emit.gep(b, args["dy"], index(b, (n0, ys)), name="dy.first"), rs=ys)
    dx = emit.gep(b, args["dx"], index(b, (n0, xs)), name="dx.first")

    def store(b: ir.IRBuilder, i: ir.Value, j: ir.Value, value: ir.Value, width: int) -> None:
        at = index(b, (i, xs), j)
        if spec.accumulate:
            value = b.fadd(emit.load(b, dx, at, width), value)
        emit.store(b, value, dx, at)

    gemm_nn(b, images, spec.f, spec.o, dy, Mat(args["w"], rs=spec.f), store, vw)
    b.ret_void()
    return fn


def emit_dense_backward_weights(module: ir.Module, name: str, spec: DenseSpec, vw: int) -> ir.Function:
    """``(x, dy, dw, db, n0, n1)``: dw += sum_n dy[n] x[n]^T, db += sum_n dy[n] (dy before the activation)."""
    xs, ys = _strides(spec)
    fn, b, args = kernel(module, name, ["x", "dy", "dw", "db", "n0", "n1"])
    n0 = args["n0"]
    images = b.sub(args["n1"], n0, name="images")
    x = Mat(emit.gep(b, args["x"], index(b, (n0, xs)), name="x.first"), rs=xs)
    dy_first = emit.gep(b, args["dy"], index(b, (n0, ys)), name="dy.first")
    dw = args["dw"]

    def add(b: ir.IRBuilder, i: ir.Value, j: ir.Value, value: ir.Value, width: int) -> None:
        at = index(b, (i, spec.f), j)
        emit.store(b, b.fadd(emit.load(b, dw, at, width), value), dw, at)

    # A[o, n] = dy[n, o]: the batch is the reduction
    gemm_nn(b, spec.o, spec.f, images, Mat(dy_first, rs=1, cs=ys), x, add, vw,
            rows_outside=spec.o * spec.f > WEIGHTS_IN_CACHE)

    if spec.bias:
        db = args["db"]
        for lo, hi, _, width in column_pieces(spec.o, vw, 1):
            with for_range(b, lo, hi, width, name="o") as oi:
                acc = local(b, emit.vec_type(width) if width > 1 else emit.F32, emit.splat(b, 0.0, width), name="db")
                with for_range(b, 0, images, name="n") as n:
                    row = emit.load(b, dy_first, index(b, (n, ys), oi), width)
                    b.store(b.fadd(b.load(acc), row), acc)
                emit.store(b, b.fadd(emit.load(b, db, oi, width), b.load(acc)), db, oi)
    b.ret_void()
    return fn
