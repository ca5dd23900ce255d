"""Convolution kernels against straightforward numpy references (float64), on the host, AVX2 and generic x86-64.

Every tensor lives in a per-image arena slot: image n of a tensor starts at
n * stride and the slot may be longer than the image. Inputs carry NaN in the
gaps between images, in images outside the batch range, in weights outside a
connect table and in the workspace, so reading any of them shows up in the
result; outputs carry a sentinel there that must survive.

Tolerance: rtol=1e-5, atol=1e-5 * max(1, max|reference|).
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from cnnc.codegen.conv import (
    CLAIM_TAIL,
    claim_bands,
    conv_workspace_floats,
    emit_conv_backward_data,
    emit_conv_backward_weights,
    emit_conv_forward,
    row_tile,
    weight_cache_floats,
)
from cnnc.codegen.specs import ConvSpec
from tests.codegen.buffers import ACTS, act_args_of, act_ref

SENTINEL = np.float32(1234.5)
N_IMAGES, N0, N1 = 4, 1, 3
WS_GUARD = 37


def make_spec(c, h, w, o, kh, kw, stride=(1, 1), pad=(0, 0, 0, 0), gap=0, **options) -> ConvSpec:
    """A ConvSpec from (top, left, bottom, right) padding; `gap` floats of garbage after each image."""
    sh, sw = stride
    pt, pl, pb, pr = pad
    span_h, span_w = (kh - 1) * options.get("dh", 1) + 1, (kw - 1) * options.get("dw", 1) + 1
    oh = (h + pt + pb - span_h) // sh + 1  # floor((in + 2p - d(k-1) - 1)/s) + 1
    ow = (w + pl + pr - span_w) // sw + 1
    spec = ConvSpec(c=c, h=h, w=w, o=o, oh=oh, ow=ow, kh=kh, kw=kw, sh=sh, sw=sw, pt=pt, pl=pl, **options)
    return dataclasses.replace(spec, x_stride=c * h * w + gap, y_stride=o * oh * ow + gap)


LENET_C3 = ((0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5), (0, 1, 2, 3), (1, 2, 3, 4),
            (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5), (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
            (0, 1, 2, 3, 4, 5))

CASES = {
    "3x3_same": make_spec(3, 8, 8, 5, 3, 3, pad=(1, 1, 1, 1)),
    "3x5_stride2_odd": make_spec(2, 7, 9, 4, 3, 5, stride=(2, 2), pad=(1, 2, 1, 2), gap=5, accumulate=True),
    "stride3_floor": make_spec(3, 11, 10, 3, 3, 3, stride=(3, 3)),
    "groups2": make_spec(4, 6, 7, 6, 3, 3, pad=(1, 1, 1, 1), groups=2, gap=3, accumulate=True),
    "groups3_even_same": make_spec(6, 5, 5, 3, 2, 2, pad=(0, 0, 1, 1), groups=3),
    "1x1": make_spec(5, 6, 7, 4, 1, 1, gap=11, accumulate=True),
    "1x1_groups2": make_spec(4, 5, 3, 6, 1, 1, groups=2, gap=2),
    "1x1_stride2": make_spec(3, 7, 7, 2, 1, 1, stride=(2, 2)),
    "connect": make_spec(4, 6, 6, 5, 3, 3, pad=(1, 1, 1, 1), gap=4, accumulate=True,
                         connect=((0,), (0, 1), (1, 2, 3), (), (0, 1, 2, 3))),
    "connect_1x1": make_spec(4, 5, 5, 3, 1, 1, connect=((0, 2), (1,), (0, 1, 2, 3)), bias=False),
    "nobias_pad2": make_spec(3, 5, 5, 4, 3, 3, pad=(2, 2, 2, 2), bias=False),
    "big_20x20": make_spec(3, 20, 20, 9, 3, 3, pad=(1, 1, 1, 1), gap=7),
    "4x2_mixed_stride": make_spec(2, 9, 8, 3, 4, 2, stride=(2, 1), pad=(2, 0, 1, 0)),
    "kernel_over_image": make_spec(2, 3, 3, 3, 5, 5, pad=(2, 2, 2, 2), gap=1),
    # output rows of whole vectors on every target: tiles of several rows, no columns thrown away
    "rows_32_wide_odd_height": make_spec(4, 7, 32, 5, 3, 3, pad=(1, 1, 1, 1), gap=2, accumulate=True),
    "rows_16_wide_connect": make_spec(3, 6, 16, 4, 3, 3, pad=(1, 1, 1, 1),
                                      connect=((0,), (1, 2), (0, 2), (0, 1, 2))),
    # uneven padding on the padded path: bottom/right follow from the output size, dy is padded by kh-1-top
    "2x2_same_stride1": make_spec(3, 7, 9, 4, 2, 2, pad=(0, 0, 1, 1)),
    "3x3_pad_bottom_right": make_spec(2, 6, 7, 5, 3, 3, pad=(0, 0, 2, 2)),
    "3x3_pad_top_left": make_spec(2, 6, 7, 5, 3, 3, pad=(2, 2, 0, 0), accumulate=True),
    # more than 16 taps (a loop over kernel rows): LeNet's C3 with its table, and rows of whole vectors
    "lenet_c3": make_spec(6, 14, 14, 16, 5, 5, connect=LENET_C3),
    "5x5_rows_32_wide": make_spec(2, 6, 32, 3, 5, 5, pad=(2, 2, 2, 2), gap=1),
    # few output channels with a table and no bias: the weight gradient as dot products over positions
    "connect_few_outputs": make_spec(4, 6, 7, 3, 3, 3, pad=(1, 1, 1, 1), connect=((0, 1), (2,), (1, 3)), bias=False),
    # padding as large as the kernel: stride 1, but through im2col
    "3x3_pad_3": make_spec(2, 4, 5, 3, 3, 3, pad=(3, 3, 3, 3)),
    # one output channel: on every target, backward weights runs as dot products over positions
    "one_output": make_spec(3, 9, 11, 1, 3, 3, pad=(1, 1, 1, 1), gap=3),
    # a vector or more of output channels per group: backward weights runs as col @ dy^T
    "wide_out_19": make_spec(3, 6, 5, 19, 3, 3, pad=(1, 1, 1, 1), gap=2),
    "wide_groups2_36": make_spec(4, 5, 5, 36, 3, 3, stride=(2, 1), groups=2, accumulate=True),
    "wide_connect_17": make_spec(3, 5, 6, 17, 2, 3, connect=tuple((i % 3, (i + 1) % 3) for i in range(17))),
    # dilation (im2col): taps dh/dw apart, with padding, strides, groups and a table; a 1x1 kernel ignores it
    "dilated_2_same": make_spec(3, 9, 9, 4, 3, 3, pad=(2, 2, 2, 2), dh=2, dw=2),
    "dilated_3x2_stride": make_spec(2, 11, 10, 5, 3, 2, stride=(2, 1), pad=(1, 0, 2, 1), dh=3, dw=2, gap=3,
                                    accumulate=True),
    "dilated_groups2": make_spec(4, 8, 9, 6, 2, 3, pad=(1, 1, 1, 1), groups=2, dh=2, dw=3, gap=1),
    "dilated_connect": make_spec(4, 7, 7, 3, 3, 3, connect=((0, 1), (2,), (1, 3)), dh=2, dw=1, bias=False),
    "dilated_1x1": make_spec(3, 5, 6, 4, 1, 1, dh=2, dw=2),
    "dilated_like_winograd": make_spec(16, 12, 12, 16, 3, 3, pad=(2, 2, 2, 2), dh=2, dw=2, gap=2),
    # 3x3 with enough channels and even output sizes: Winograd F(2x2, 3x3), forward and input gradient
    "winograd_same": make_spec(16, 16, 16, 20, 3, 3, pad=(1, 1, 1, 1), gap=3),
    "winograd_valid_accumulate": make_spec(17, 18, 18, 16, 3, 3, accumulate=True),
    "winograd_blocks": make_spec(16, 10, 34, 16, 3, 3, pad=(1, 1, 1, 1), bias=False),  # 5 rows of 17 tiles
    "winograd_wide_rows": make_spec(16, 4, 160, 18, 3, 3, pad=(1, 1, 1, 1), gap=2, accumulate=True),  # 80 a row
    # the weight gradient by Winograd takes blocks of whole images when an image has fewer tiles than a block:
    # 12 tiles an image, 5 images a block (of which the batch range fills 2)
    "winograd_images_per_block": make_spec(16, 6, 8, 17, 3, 3, pad=(1, 1, 1, 1), gap=3),
    # stride 2 on rows of whole vectors of outputs: im2col and col2im take every other float by shuffles, up to
    # the vector whose span would pass the row's end; plain, and dilated with padding
    "stride2_wide_rows": make_spec(3, 6, 40, 4, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1), gap=3, accumulate=True),
    "stride2_dilated_wide": make_spec(2, 5, 37, 3, 3, 3, stride=(2, 2), pad=(2, 2, 2, 2), dh=2, dw=2, bias=False),
    # ResNet's 32 -> 16 rows: the last kernel column's vectors start a float early (their last tap ends the row)
    "stride2_shifted": make_spec(3, 4, 32, 2, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1), gap=1, accumulate=True),
    # 16 tiles an image: the products of the forward and input gradient take a vector of tiles at a time
    "winograd_8x8": make_spec(16, 8, 8, 24, 3, 3, pad=(1, 1, 1, 1), gap=1, accumulate=True),
    # 8 to 15 output channels (half of ResNet's 16 when two threads share an image): the forward by Winograd;
    # 12 input channels: the input gradient (12 outputs from 16) by Winograd
    "winograd_8_outputs": make_spec(16, 12, 16, 8, 3, 3, pad=(1, 1, 1, 1), gap=2),
    "winograd_12_inputs": make_spec(12, 12, 16, 16, 3, 3, pad=(1, 1, 1, 1), bias=False),
    # rows narrower than a vector, whole vectors of outputs: the forward on kw shifted copies (product_shifted)
    "shifted_6_wide": make_spec(9, 8, 6, 5, 3, 3, pad=(1, 1, 1, 1), gap=2),
    # ResNet's stage 3 shape (which runs by Winograd unless that is off)
    "shifted_8x8": make_spec(16, 8, 8, 20, 3, 3, pad=(1, 1, 1, 1), accumulate=True, winograd=False),
    "shifted_5x5_valid": make_spec(8, 12, 10, 3, 5, 5, bias=False),  # more than 16 taps: a loop over rows
    "shifted_uneven_pad": make_spec(8, 8, 6, 4, 3, 3, pad=(2, 1, 0, 1), gap=1),
    # outputs not in whole vectors (49): the last vector's store in narrower pieces; LeNet's C1 (one channel)
    "shifted_partial_vector": make_spec(2, 9, 9, 5, 3, 3, gap=1, accumulate=True),
    # 25 outputs a channel in 2, 4 or 7 vectors: the forward runs whole groups of images in lanes at every width
    "lanes_5x5_outputs": make_spec(3, 7, 7, 4, 3, 3, gap=2, connect=((0,), (0, 1), (1, 2), (0, 1, 2))),
    "lenet_c1": make_spec(1, 32, 32, 6, 5, 5),
    # stride 2 across: im2col reads the even lanes of vector pairs from a padded copy (ResNet's down blocks)
    "stride2_down": make_spec(5, 16, 16, 6, 3, 3, stride=(2, 2), pad=(1, 1, 0, 0), gap=3),
    "stride2_floor_groups": make_spec(4, 9, 10, 4, 3, 3, stride=(2, 2), groups=2, accumulate=True),
    "stride2_rows_of_32": make_spec(3, 8, 64, 4, 3, 3, stride=(2, 2), pad=(1, 1, 1, 1), bias=False),
}


# --- numpy references (float64, images as (N, C, H, W)) ---------------------------------------------


def connect_mask(s: ConvSpec) -> np.ndarray:
    """(o, c // groups) booleans: which weight blocks exist."""
    mask = np.ones((s.o, s.c // s.groups), dtype=bool)
    if s.connect is not None:
        mask[:] = False
        for oi, row in enumerate(s.connect):
            mask[oi, list(row)] = True
    return mask


def _padded_shape(s: ConvSpec) -> tuple[int, int]:
    return (max(s.h + s.pt, (s.oh - 1) * s.sh + (s.kh - 1) * s.dh + 1),
            max(s.w + s.pl, (s.ow - 1) * s.sw + (s.kw - 1) * s.dw + 1))


def _taps(s: ConvSpec):
    """(group slice of inputs, group slice of outputs, ky, kx, padded-input window of that tap)."""
    cg, og = s.c // s.groups, s.o // s.groups
    for g in range(s.groups):
        for ky in range(s.kh):
            for kx in range(s.kw):
                y0, x0 = ky * s.dh, kx * s.dw
                window = (slice(y0, y0 + (s.oh - 1) * s.sh + 1, s.sh), slice(x0, x0 + (s.ow - 1) * s.sw + 1, s.sw))
                yield slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og), ky, kx, window


def conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, s: ConvSpec) -> np.ndarray:
    """Pre-activation output: cross-correlation with zero padding, groups, weights masked by the table."""
    w = w * connect_mask(s)[:, :, None, None]
    xp = np.zeros((x.shape[0], s.c, *_padded_shape(s)))
    xp[:, :, s.pt:s.pt + s.h, s.pl:s.pl + s.w] = x
    y = np.zeros((x.shape[0], s.o, s.oh, s.ow))
    for cs, os, ky, kx, (wy, wx) in _taps(s):
        y[:, os] += np.einsum("nchw,oc->nohw", xp[:, cs, wy, wx], w[os, :, ky, kx])
    if b is not None:
        y += b[None, :, None, None]
    return y


def conv_data_ref(dy: np.ndarray, w: np.ndarray, s: ConvSpec) -> np.ndarray:
    w = w * connect_mask(s)[:, :, None, None]
    dxp = np.zeros((dy.shape[0], s.c, *_padded_shape(s)))
    for cs, os, ky, kx, (wy, wx) in _taps(s):
        dxp[:, cs, wy, wx] += np.einsum("nohw,oc->nchw", dy[:, os], w[os, :, ky, kx])
    return dxp[:, :, s.pt:s.pt + s.h, s.pl:s.pl + s.w]


def conv_weights_ref(x: np.ndarray, dy: np.ndarray, s: ConvSpec) -> tuple[np.ndarray, np.ndarray]:
    xp = np.zeros((x.shape[0], s.c, *_padded_shape(s)))
    xp[:, :, s.pt:s.pt + s.h, s.pl:s.pl + s.w] = x
    dw = np.zeros((s.o, s.c // s.groups, s.kh, s.kw))
    for cs, os, ky, kx, (wy, wx) in _taps(s):
        dw[os, :, ky, kx] = np.einsum("nohw,nchw->oc", dy[:, os], xp[:, cs, wy, wx])
    return dw * connect_mask(s)[:, :, None, None], dy.sum(axis=(0, 2, 3))


# --- arena helpers --------------------------------------------------------------------------------


def arena(images: np.ndarray, stride: int, gap_value: float) -> np.ndarray:
    """float32 (N, stride): each image flattened at the start of its slot, `gap_value` after it."""
    n = images.shape[0]
    size = images[0].size
    buf = np.full((n, stride), gap_value, dtype=np.float32)
    buf[:, :size] = images.reshape(n, size)
    return buf


def check_arena(out: np.ndarray, before: np.ndarray, expected: np.ndarray, size: int) -> None:
    """Images N0..N1 match `expected` (N1-N0, size); everything else is bit-for-bit unchanged."""
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(out[N0:N1, :size], expected.reshape(N1 - N0, size), rtol=1e-5, atol=1e-5 * scale)
    untouched = np.ones(out.shape, dtype=bool)
    untouched[N0:N1, :size] = False
    np.testing.assert_array_equal(out[untouched], before[untouched])


def workspace(spec: ConvSpec, vw: int) -> np.ndarray:
    """NaN scratch (the kernel must write before it reads) followed by a sentinel guard."""
    size = conv_workspace_floats(spec, vw)
    ws = np.full(size + WS_GUARD, np.nan, dtype=np.float32)
    ws[size:] = SENTINEL
    return ws


def check_guard(ws: np.ndarray, spec: ConvSpec, vw: int) -> None:
    assert np.all(ws[conv_workspace_floats(spec, vw):] == SENTINEL), "kernel wrote past its workspace"


def random_weights(rng: np.random.Generator, s: ConvSpec) -> np.ndarray:
    """float64 values that are exact in float32."""
    return rng.uniform(-1, 1, (s.o, s.c // s.groups, s.kh, s.kw)).astype(np.float32).astype(np.float64)


def with_nan_outside_table(w: np.ndarray, s: ConvSpec) -> np.ndarray:
    w = w.astype(np.float32)
    w[~connect_mask(s)] = np.nan
    return w


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_conv_kernels(jit, spec: ConvSpec) -> None:
    rng = np.random.default_rng(7)
    s = spec
    x_size, y_size = s.c * s.h * s.w, s.o * s.oh * s.ow
    emit_conv_forward(jit.module, "fwd", s, jit.vw)
    emit_conv_backward_data(jit.module, "bwd_data", s, jit.vw)
    emit_conv_backward_weights(jit.module, "bwd_weights", s, jit.vw)

    x = rng.uniform(-1, 1, (N_IMAGES, s.c, s.h, s.w))
    x[:N0] = np.nan
    x[N1:] = np.nan
    dy = rng.uniform(-1, 1, (N_IMAGES, s.o, s.oh, s.ow))
    dy[:N0] = np.nan
    dy[N1:] = np.nan
    w = random_weights(rng, s)
    w32 = with_nan_outside_table(w, s)
    bias = rng.uniform(-1, 1, s.o).astype(np.float32) if s.bias else None
    x_buf = arena(x, s.x_stride, np.nan)
    dy_buf = arena(dy, s.y_stride, np.nan)
    xr = x_buf[N0:N1, :x_size].reshape(-1, s.c, s.h, s.w).astype(np.float64)
    dyr = dy_buf[N0:N1, :y_size].reshape(-1, s.o, s.oh, s.ow).astype(np.float64)

    # forward; an empty batch range first must write nothing
    y = np.full((N_IMAGES, s.y_stride), SENTINEL, dtype=np.float32)
    ws = workspace(s, jit.vw)
    jit("fwd", x_buf, w32, bias, y, ws, 2, 2)
    assert np.all(y == SENTINEL)
    jit("fwd", x_buf, w32, bias, y, ws, N0, N1)
    check_guard(ws, s, jit.vw)
    expected = conv_ref(xr, w, None if bias is None else bias.astype(np.float64), s)
    check_arena(y, np.full_like(y, SENTINEL), expected, y_size)

    # backward data: overwrite, or add to what is there
    dx0 = arena(rng.uniform(-1, 1, (N_IMAGES, x_size)), s.x_stride, SENTINEL)
    dx = dx0.copy()
    ws = workspace(s, jit.vw)
    jit("bwd_data", dy_buf, w32, dx, ws, N0, N1)
    check_guard(ws, s, jit.vw)
    expected = conv_data_ref(dyr, w, s).reshape(N1 - N0, x_size)
    if s.accumulate:
        expected = expected + dx0[N0:N1, :x_size]
    check_arena(dx, dx0, expected, x_size)

    # backward weights: always accumulates; weights outside a table are never written
    dw0 = random_weights(rng, s).astype(np.float32)
    dw0[~connect_mask(s)] = SENTINEL
    dw = dw0.copy()
    db0 = rng.uniform(-1, 1, s.o).astype(np.float32) if s.bias else None
    db = None if db0 is None else db0.copy()
    ws = workspace(s, jit.vw)
    jit("bwd_weights", x_buf, dy_buf, dw, db, ws, N0, N1)
    check_guard(ws, s, jit.vw)
    assert_weight_gradient_added(dw, db, dw0, db0, xr, dyr, s)


@pytest.mark.parametrize("case", ["lenet_c3", "wide_connect_17"])
def test_weight_gradient_with_images_in_lanes(jit, case: str) -> None:
    """Two whole groups of a vector's width of images (transposed through registers), then three (copied a float
    at a time into zeroed lanes): dW and db against the float64 reference, weights outside the table untouched."""
    s = CASES[case]
    emit_conv_backward_weights(jit.module, "bwd_weights", s, jit.vw)
    rng = np.random.default_rng(11)
    n = 2 * jit.vw + 3
    x = rng.uniform(-1, 1, (n + 1, s.c, s.h, s.w))
    dy = rng.uniform(-1, 1, (n + 1, s.o, s.oh, s.ow))
    x[0], dy[0] = np.nan, np.nan  # an image before the range, never read
    x_buf, dy_buf = arena(x, s.x_stride, np.nan), arena(dy, s.y_stride, np.nan)
    xr = x_buf[1:, :s.c * s.h * s.w].reshape(-1, s.c, s.h, s.w).astype(np.float64)
    dyr = dy_buf[1:, :s.o * s.oh * s.ow].reshape(-1, s.o, s.oh, s.ow).astype(np.float64)
    dw0 = random_weights(rng, s).astype(np.float32)
    dw0[~connect_mask(s)] = SENTINEL
    dw, db0 = dw0.copy(), rng.uniform(-1, 1, s.o).astype(np.float32)
    db = db0.copy()
    ws = workspace(s, jit.vw)
    jit("bwd_weights", x_buf, dy_buf, dw, db, ws, 1, n + 1)
    check_guard(ws, s, jit.vw)
    assert_weight_gradient_added(dw, db, dw0, db0, xr, dyr, s)


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "add"])
@pytest.mark.parametrize("case", ["lenet_c3", "wide_connect_17", "shifted_5x5_valid"])
def test_input_gradient_with_images_in_lanes(jit, case: str, accumulate: bool) -> None:
    """Two whole groups of a vector's width of images (transposed through registers both ways), then three (a float
    at a time): dx against the float64 reference, written or added, the gaps between images and the image before
    the range untouched (which cases run in lanes at which width: test_which_input_gradients_run_in_lanes)."""
    base = CASES[case]
    s = dataclasses.replace(base, accumulate=accumulate, x_stride=base.c * base.h * base.w + 3)
    emit_conv_backward_data(jit.module, "bwd_data", s, jit.vw)
    rng = np.random.default_rng(13)
    n = 2 * jit.vw + 3
    x_size, y_size = s.c * s.h * s.w, s.o * s.oh * s.ow
    dy = rng.uniform(-1, 1, (n + 1, s.o, s.oh, s.ow))
    dy[0] = np.nan  # an image before the range, never read
    dy_buf = arena(dy, s.y_stride, np.nan)
    dyr = dy_buf[1:, :y_size].reshape(-1, s.o, s.oh, s.ow).astype(np.float64)
    w = random_weights(rng, s)
    dx0 = arena(rng.uniform(-1, 1, (n + 1, x_size)), s.x_stride, SENTINEL)
    dx = dx0.copy()
    ws = workspace(s, jit.vw)
    jit("bwd_data", dy_buf, with_nan_outside_table(w, s), dx, ws, 1, n + 1)
    check_guard(ws, s, jit.vw)
    expected = conv_data_ref(dyr, w, s).reshape(n, x_size) + (dx0[1:, :x_size] if accumulate else 0)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(dx[1:, :x_size], expected, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(dx[0], dx0[0])
    np.testing.assert_array_equal(dx[1:, x_size:], dx0[1:, x_size:])


@pytest.mark.parametrize("act", ["none", "tanh", "relu"])
@pytest.mark.parametrize("case", ["lenet_c3", "shifted_partial_vector", "lanes_5x5_outputs"])
def test_forward_with_images_in_lanes(jit, case: str, act: str) -> None:
    """Two whole groups of a vector's width of images (in lanes where the form applies:
    test_which_forwards_run_in_lanes), then three one at a time: y against the float64 reference with the bias and
    the activation, the gaps between images and the image before the range untouched."""
    s = dataclasses.replace(CASES[case], act=act, act_args=act_args_of(act))
    emit_conv_forward(jit.module, "fwd", s, jit.vw)
    rng = np.random.default_rng(17)
    n = 2 * jit.vw + 3
    x = rng.uniform(-3, 3, (n + 1, s.c, s.h, s.w))
    x[0] = np.nan  # an image before the range, never read
    x_buf = arena(x, s.x_stride, np.nan)
    xr = x_buf[1:, :s.c * s.h * s.w].reshape(-1, s.c, s.h, s.w).astype(np.float64)
    w = random_weights(rng, s)
    bias = rng.uniform(-1, 1, s.o).astype(np.float32) if s.bias else None
    y = np.full((n + 1, s.y_stride), SENTINEL, dtype=np.float32)
    ws = workspace(s, jit.vw)
    jit("fwd", x_buf, with_nan_outside_table(w, s), bias, y, ws, 1, n + 1)
    check_guard(ws, s, jit.vw)
    size = s.o * s.oh * s.ow
    expected = act_ref(conv_ref(xr, w, None if bias is None else bias.astype(np.float64), s), act).reshape(n, size)
    np.testing.assert_allclose(y[1:, :size], expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    assert np.all(y[0] == SENTINEL) and np.all(y[1:, size:] == SENTINEL)


# 27 output positions: every vector width down to scalars goes through the activation
ACT_SPEC = make_spec(2, 7, 9, 4, 3, 3, stride=(2, 1), pad=(1, 1, 0, 1), gap=5)


@pytest.mark.parametrize("base", [ACT_SPEC, CASES["winograd_same"]], ids=["strided", "winograd"])
def test_conv_forward_activations(jit, base: ConvSpec) -> None:
    rng = np.random.default_rng(3)
    specs = {act: dataclasses.replace(base, act=act, act_args=act_args_of(act)) for act in ACTS}
    for act, s in specs.items():
        emit_conv_forward(jit.module, f"fwd_{act}", s, jit.vw)
    s = base
    # inputs scaled up so sigmoid and tanh see their far range too
    x = rng.uniform(-3, 3, (N_IMAGES, s.c, s.h, s.w))
    w = random_weights(rng, s)
    bias = rng.uniform(-1, 1, s.o)
    x_buf = arena(x, s.x_stride, np.nan)
    xr = x_buf[N0:N1, :s.c * s.h * s.w].reshape(-1, s.c, s.h, s.w).astype(np.float64)
    pre = conv_ref(xr, w.astype(np.float32).astype(np.float64), bias.astype(np.float32).astype(np.float64), s)
    for act in specs:
        y = np.full((N_IMAGES, s.y_stride), SENTINEL, dtype=np.float32)
        jit(f"fwd_{act}", x_buf, w.astype(np.float32), bias.astype(np.float32), y, workspace(s, jit.vw), N0, N1)
        check_arena(y, np.full_like(y, SENTINEL), act_ref(pre, act), s.o * s.oh * s.ow)


# Maps whose tiles make one vector at each width (16 lanes: ResNet's 8x8; 8: 4x8; 4: 4x4): the forward gathers
# each tile's patch from the unpadded image (same padding, and uneven padding) and takes several images a block
WHOLE_IMAGES = {16: [(8, 8, (1, 1, 1, 1)), (8, 8, (2, 0, 0, 2))], 8: [(4, 8, (1, 1, 1, 1)), (4, 8, (0, 2, 2, 0))],
                4: [(4, 4, (1, 1, 1, 1)), (4, 4, (2, 1, 0, 1))]}


@pytest.mark.parametrize("case", [0, 1])
def test_winograd_forward_on_whole_images(jit, case: int) -> None:
    from cnnc.codegen import conv_winograd
    from cnnc.codegen.conv import _Geom

    h, w, pad = WHOLE_IMAGES[jit.vw][case]
    s = dataclasses.replace(make_spec(16, h, w, 18, 3, 3, pad=pad, gap=3), act="relu")
    g = _Geom(s)
    assert conv_winograd.whole_images(g.forward_plane(jit.vw), h, w)
    emit_conv_forward(jit.module, "fwd", s, jit.vw)
    per_block = conv_winograd.ImageBlocks(g.forward_plane(jit.vw)).images
    n = 2 * per_block + 3  # two blocks of images, then three one at a time
    rng = np.random.default_rng(5)
    x, wt, bias = rng.uniform(-1, 1, (n + 2, s.c, h, w)), random_weights(rng, s), rng.uniform(-1, 1, s.o)
    x[0] = x[-1] = np.nan
    x_buf = arena(x, s.x_stride, np.nan)
    y = np.full((n + 2, s.y_stride), SENTINEL, dtype=np.float32)
    ws = workspace(s, jit.vw)
    jit("fwd", x_buf, wt.astype(np.float32), bias.astype(np.float32), y, ws, 1, n + 1)
    check_guard(ws, s, jit.vw)
    xr = x_buf[1:n + 1, :s.c * h * w].reshape(n, s.c, h, w).astype(np.float64)
    want = act_ref(conv_ref(xr, wt, bias.astype(np.float32).astype(np.float64), s), "relu")
    size = s.o * s.oh * s.ow
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(y[1:n + 1, :size], want.reshape(n, size), rtol=1e-5, atol=1e-5 * scale)
    assert np.all(y[[0, -1]] == SENTINEL) and np.all(y[:, size:] == SENTINEL)
    one = np.full_like(y, SENTINEL)  # the same bits one image at a time (the products' tiles change, not the sums)
    for k in range(1, n + 1):
        jit("fwd", x_buf, wt.astype(np.float32), bias.astype(np.float32), one, ws, k, k + 1)
    np.testing.assert_array_equal(one, y)


@pytest.mark.parametrize("whole", [False, True], ids=["blocks", "whole_images"])
def test_winograd_weights_kept_between_calls_follow_every_change(jit, whole: bool) -> None:
    """A cached forward (inference) keeps U in its region: the same bits as the uncached kernel, and a call after
    the weights changed in place (one weight, or a sign bit only) sees the change."""
    h, w, pad = WHOLE_IMAGES[jit.vw][0] if whole else (16, 16, (1, 1, 1, 1))
    s = dataclasses.replace(make_spec(16, h, w, 18, 3, 3, pad=pad, gap=3), act="relu")
    cached = dataclasses.replace(s, cached=True)
    emit_conv_forward(jit.module, "plain", s, jit.vw)
    emit_conv_forward(jit.module, "cached", cached, jit.vw)
    floats = weight_cache_floats(cached, jit.vw)
    if whole and not floats:  # only at 4 lanes: a map of one vector of tiles (4x4) is too narrow for Winograd
        assert jit.vw == 4
        return
    assert floats > 0 and weight_cache_floats(s, jit.vw) == 0
    rng = np.random.default_rng(8)
    x_buf = arena(rng.uniform(-1, 1, (N_IMAGES, s.c, h, w)), s.x_stride, np.nan)
    wt, bias = random_weights(rng, s).astype(np.float32), rng.uniform(-1, 1, s.o).astype(np.float32)
    cache = np.zeros(floats + WS_GUARD, np.float32)  # zeroed: a valid region (U of zero weights)
    cache[floats:] = SENTINEL
    xr = x_buf[N0:N1, :s.c * h * w].reshape(-1, s.c, h, w).astype(np.float64)

    def run(name: str, *region) -> np.ndarray:
        y = np.full((N_IMAGES, s.y_stride), SENTINEL, dtype=np.float32)
        jit(name, x_buf, wt, bias, y, workspace(s, jit.vw), *region, N0, N1)
        return y

    for change in (None, "one", "sign", "back"):
        if change == "one":
            wt[5, 3, 1, 2] += 0.25
        elif change == "sign":
            wt[0, 0, 0, 0] = -wt[0, 0, 0, 0]
        elif change == "back":
            wt[5, 3, 1, 2] -= 0.25
        got = run("cached", cache)
        want = act_ref(conv_ref(xr, wt.astype(np.float64), bias.astype(np.float64), s), "relu")
        check_arena(got, np.full_like(got, SENTINEL), want, s.o * s.oh * s.ow)
        np.testing.assert_array_equal(run("cached", cache), got)  # (kept: the same again)
        if whole:  # (F(2x2) both: the same arithmetic; the blocks run by F(4x4) when cached, conv_winograd4)
            np.testing.assert_array_equal(got, run("plain"))
    assert np.all(cache[floats:] == SENTINEL), "kernel wrote past its cache region"


# Inference's F(4x4, 3x3) (conv_winograd4): ResNet's 32x32 and 16x16 stages (rows of 8 and 4 tiles: 2 and 4 rows
# a vector at 16 lanes); rows of 9 tiles (vector tails) in blocks of 7 tile rows and a rest of 2;
# 5 tile rows of 4 (a vector of 4 rows, then one); a valid convolution; the fewest outputs (8) and an odd channel count
WINOGRAD4 = {"resnet_32": (16, 32, 32, 16, (1, 1, 1, 1)), "resnet_16": (32, 16, 16, 16, (1, 1, 1, 1)),
             "blocks_and_tails": (17, 36, 36, 8, (1, 1, 1, 1)), "rows_rest": (16, 20, 16, 8, (1, 1, 1, 1)),
             "valid": (16, 34, 34, 9, (0, 0, 0, 0))}


@pytest.mark.parametrize("case", list(WINOGRAD4))
def test_winograd_4x4_forward_at_inference(jit, case: str) -> None:
    """F(4x4) against the float64 reference: its transforms multiply by up to 8, so its rounding is larger than
    F(2x2)'s; the bound (1e-5 of the largest output, as the other kernels) holds (measured on 64 channels at 32x32:
    5e-6, against 4e-7 by F(2x2))."""
    from cnnc.codegen import conv_winograd4
    from cnnc.codegen.conv import _Geom

    c, h, w, o, pad = WINOGRAD4[case]
    s = dataclasses.replace(make_spec(c, h, w, o, 3, 3, pad=pad, gap=3), act="relu", cached=True)
    assert conv_winograd4.applies(_Geom(s).forward_plane(jit.vw), None)
    floats = weight_cache_floats(s, jit.vw)
    assert floats >= 36 * s.o * s.c
    emit_conv_forward(jit.module, "fwd", s, jit.vw)
    rng = np.random.default_rng(11)
    x_buf = arena(rng.uniform(-1, 1, (N_IMAGES, c, h, w)), s.x_stride, np.nan)
    wt, bias = random_weights(rng, s), rng.uniform(-1, 1, s.o)
    y = np.full((N_IMAGES, s.y_stride), SENTINEL, dtype=np.float32)
    ws, cache = workspace(s, jit.vw), np.zeros(floats, np.float32)
    jit("fwd", x_buf, wt.astype(np.float32), bias.astype(np.float32), y, ws, cache, N0, N1)
    check_guard(ws, s, jit.vw)
    xr = x_buf[N0:N1, :c * h * w].reshape(-1, c, h, w).astype(np.float64)
    want = act_ref(conv_ref(xr, wt, bias.astype(np.float32).astype(np.float64), s), "relu")
    check_arena(y, np.full_like(y, SENTINEL), want, s.o * s.oh * s.ow)


# F(4x4) with output channels in the lanes (conv_winograd4o): ResNet's 64->64 on 8x8 (4 tiles), maps of 8 tiles
# both ways, a valid convolution and an odd input channel count, a share of half the output channels
WINOGRAD4O = {"resnet_8": (64, 8, 8, 64, (1, 1, 1, 1)), "wide": (16, 8, 16, 32, (1, 1, 1, 1)),
              "tall": (24, 16, 8, 16, (1, 1, 1, 1)), "valid_odd": (17, 10, 10, 48, (0, 0, 0, 0)),
              "half_share": (64, 8, 8, 32, (1, 1, 1, 1))}


@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("case", list(WINOGRAD4O))
def test_winograd_4x4_with_channels_in_the_lanes(jit, case: str, act: str) -> None:
    """Small maps by F(4x4) with output channels in the lanes, against the float64 reference (1e-5 of the largest
    output, as the other kernels), the images outside [n0, n1) and the workspace's guard untouched; a second call
    after the weights change uses the new weights (U kept between calls, [xi][c][o])."""
    from cnnc.codegen import conv_winograd4, conv_winograd4o
    from cnnc.codegen.conv import _Geom

    c, h, w, o, pad = WINOGRAD4O[case]
    s = dataclasses.replace(make_spec(c, h, w, o, 3, 3, pad=pad, gap=3), act=act, cached=True)
    plane = _Geom(s).forward_plane(jit.vw)
    # (exactly one F(4x4) kernel runs it: an 8x16 map has a vector of 8 tiles at 8 lanes, tiles in the lanes then)
    assert conv_winograd4o.applies(plane, None) == (not conv_winograd4.applies(plane, None))
    assert conv_winograd4o.applies(plane, None) == (case != "wide" or jit.vw > 8)
    if conv_winograd4o.applies(plane, None):
        assert row_tile(s, jit.vw) == 0  # (never cut by rows: infer_split cuts it by output channels)
    emit_conv_forward(jit.module, "fwd", s, jit.vw)
    rng = np.random.default_rng(17)
    x_buf = arena(rng.uniform(-1, 1, (N_IMAGES, c, h, w)), s.x_stride, np.nan)
    bias = rng.uniform(-1, 1, s.o).astype(np.float32)
    ws, cache = workspace(s, jit.vw), np.zeros(weight_cache_floats(s, jit.vw), np.float32)
    xr = x_buf[N0:N1, :c * h * w].reshape(-1, c, h, w).astype(np.float64)
    for _ in range(2):
        wt = random_weights(rng, s).astype(np.float32)
        y = np.full((N_IMAGES, s.y_stride), SENTINEL, dtype=np.float32)
        jit("fwd", x_buf, wt, bias, y, ws, cache, N0, N1)
        check_guard(ws, s, jit.vw)
        want = act_ref(conv_ref(xr, wt, bias.astype(np.float64), s), act)
        check_arena(y, np.full_like(y, SENTINEL), want, s.o * s.oh * s.ow)


# A residual conv at inference (cnnc.passes.fold.fuse_residuals) on each forward path: im2col (groups, a table,
# strides, dilation), the direct rows and shifted copies, the forward whose images would run in lanes, F(2x2) on
# rows and on whole images, F(4x4) with tiles or with output channels in the lanes, and a share of rows
RESIDUAL_PATHS = {k: CASES[k] for k in ("groups2", "1x1_stride2", "connect", "dilated_2_same", "stride2_down",
                                        "rows_32_wide_odd_height", "shifted_6_wide", "shifted_partial_vector",
                                        "lanes_5x5_outputs", "winograd_same", "winograd_8x8")}
RESIDUAL_PATHS.update(f4_32=make_spec(16, 32, 32, 16, 3, 3, pad=(1, 1, 1, 1), gap=1),
                      f4o_8=make_spec(64, 8, 8, 64, 3, 3, pad=(1, 1, 1, 1), gap=3),
                      f4o_16x8=make_spec(24, 16, 8, 16, 3, 3, pad=(1, 1, 1, 1)))


@pytest.mark.parametrize("rows", [False, True], ids=["whole", "rows"])
def test_forward_adds_the_residual_before_the_activation(jit, rows: bool) -> None:
    """y = relu(conv(x) + b + r) with r in its own arena (another stride, NaN outside the batch range and in its
    gaps), on every forward path at every width; `rows`: the Winograd forwards' shares of whole tile rows
    (infer_split), which write and read only their rows."""
    specs = {}
    for case, base in RESIDUAL_PATHS.items():
        s = dataclasses.replace(base, accumulate=False, act="relu", cached=True, residual=True,
                                r_stride=base.o * base.oh * base.ow + 5)
        tile = row_tile(s, jit.vw)
        if rows:
            if not tile or s.oh // tile < 2:
                continue
            s = dataclasses.replace(s, rows=(tile, s.oh // tile * tile))
        specs[case] = s
        emit_conv_forward(jit.module, case, s, jit.vw)
    assert specs
    for case, s in specs.items():
        rng = np.random.default_rng(23)
        size = s.o * s.oh * s.ow
        x_buf = arena(rng.uniform(-1, 1, (N_IMAGES, s.c, s.h, s.w)), s.x_stride, np.nan)
        w = random_weights(rng, s)
        bias = rng.uniform(-1, 1, s.o).astype(np.float32) if s.bias else None
        r = rng.uniform(-2, 2, (N_IMAGES, size)).astype(np.float32)
        r[:N0] = r[N1:] = np.nan
        r_buf = arena(r, s.r_stride, np.nan)
        y = np.full((N_IMAGES, s.y_stride), SENTINEL, dtype=np.float32)
        ws, cache = workspace(s, jit.vw), np.zeros(weight_cache_floats(s, jit.vw), np.float32)
        jit(case, x_buf, with_nan_outside_table(w, s), bias, y, r_buf, ws, cache, N0, N1)
        check_guard(ws, s, jit.vw)
        xr = x_buf[N0:N1, :s.c * s.h * s.w].reshape(-1, s.c, s.h, s.w).astype(np.float64)
        pre = conv_ref(xr, w, None if bias is None else bias.astype(np.float64), s)
        want = act_ref(pre + r[N0:N1].reshape(pre.shape), "relu")
        if s.rows is None:
            check_arena(y, np.full_like(y, SENTINEL), want, size)
            continue
        r0, r1 = s.rows
        got = y[N0:N1, :size].reshape(pre.shape)
        np.testing.assert_allclose(got[:, :, r0:r1], want[:, :, r0:r1], rtol=1e-5,
                                   atol=1e-5 * max(1.0, float(np.abs(want).max())), err_msg=case)
        assert np.all(got[:, :, :r0] == SENTINEL) and np.all(got[:, :, r1:] == SENTINEL), case


@pytest.mark.parametrize("case", list(WINOGRAD4))
def test_winograd_4x4_input_gradient(jit, case: str) -> None:
    """The input gradient by F(4x4) (the flipped weights transformed on every call, the padded dy as its input)
    against the float64 reference, within the bound of the other kernels (1e-5 of the largest output); the
    workspace's guard untouched. Training's forward keeps F(2x2) (``conv._winograd4``)."""
    from cnnc.codegen import conv_winograd4
    from cnnc.codegen.conv import _Geom, _winograd4_data

    c, h, w, o, pad = WINOGRAD4[case]
    s = make_spec(c, h, w, o, 3, 3, pad=pad, gap=3, bias=False, accumulate=case == "resnet_16")
    g = _Geom(s)
    # the products take dy's o channels as their inputs: 8 are too few (F(2x2) or the direct kernels then), and
    # a valid convolution's dx (34x34 here) is not whole 4x4 tiles
    assert _winograd4_data(s, g.backward_plane(jit.vw)) == (case in ("resnet_32", "resnet_16"))
    assert conv_winograd4.applies(g.forward_plane(jit.vw), None)
    emit_conv_backward_data(jit.module, "bwd_data", s, jit.vw)
    rng = np.random.default_rng(13)
    dy_buf = arena(rng.uniform(-1, 1, (N_IMAGES, o, s.oh, s.ow)), s.y_stride, np.nan)
    wt = random_weights(rng, s)
    dx0 = arena(rng.uniform(-1, 1, (N_IMAGES, c * h * w)), s.x_stride, SENTINEL)
    dx = dx0.copy()
    ws = workspace(s, jit.vw)
    jit("bwd_data", dy_buf, wt.astype(np.float32), dx, ws, N0, N1)
    check_guard(ws, s, jit.vw)
    dyr = dy_buf[N0:N1, :o * s.oh * s.ow].reshape(-1, o, s.oh, s.ow).astype(np.float64)
    expected = conv_data_ref(dyr, wt, s).reshape(N1 - N0, c * h * w)
    if s.accumulate:
        expected = expected + dx0[N0:N1, :c * h * w]
    check_arena(dx, dx0, expected, c * h * w)


@pytest.mark.parametrize("cached", [False, True], ids=["f2x2", "f4x4"])
def test_a_share_of_tile_rows_computes_exactly_those_rows(jit, cached: bool) -> None:
    """``ConvSpec.rows`` (infer_split's cut of a Winograd conv): every channel's rows [r0, r1), the bits of the whole
    layer's there, nothing written elsewhere; the shares together give the whole output."""
    from cnnc.codegen.conv import row_tile

    s = dataclasses.replace(make_spec(16, 16, 32, 12, 3, 3, pad=(1, 1, 1, 1), gap=3), act="relu", cached=cached)
    tile = row_tile(s, jit.vw)
    assert tile == (4 if cached else 2)
    cuts = [(0, 8), (8, 12), (12, 16)]
    emit_conv_forward(jit.module, "whole", s, jit.vw)
    for k, rows in enumerate(cuts):
        emit_conv_forward(jit.module, f"share{k}", dataclasses.replace(s, rows=rows), jit.vw)
    rng = np.random.default_rng(12)
    x_buf = arena(rng.uniform(-1, 1, (N_IMAGES, s.c, s.h, s.w)), s.x_stride, np.nan)
    wt, bias = random_weights(rng, s).astype(np.float32), rng.uniform(-1, 1, s.o).astype(np.float32)
    region = [np.zeros(weight_cache_floats(s, jit.vw), np.float32)] if cached else []
    whole = np.full((N_IMAGES, s.y_stride), SENTINEL, dtype=np.float32)
    jit("whole", x_buf, wt, bias, whole, workspace(s, jit.vw), *region, N0, N1)
    together = np.full_like(whole, SENTINEL)
    for k, (r0, r1) in enumerate(cuts):
        alone = np.full_like(whole, SENTINEL)
        jit(f"share{k}", x_buf, wt, bias, alone, workspace(s, jit.vw), *region, N0, N1)
        jit(f"share{k}", x_buf, wt, bias, together, workspace(s, jit.vw), *region, N0, N1)
        mine = np.zeros((N_IMAGES, s.y_stride), bool)
        mine[N0:N1, :s.o * s.oh * s.ow] = np.broadcast_to(
            (np.arange(s.oh)[:, None] >= r0) & (np.arange(s.oh)[:, None] < r1), (s.o, s.oh, s.ow)).reshape(-1)
        np.testing.assert_array_equal(alone[mine], whole[mine])
        assert np.all(alone[~mine] == SENTINEL)
    np.testing.assert_array_equal(together, whole)


def test_which_convolutions_run_by_winograd() -> None:
    from cnnc.codegen import conv_winograd
    from cnnc.codegen.conv import _Geom, _winograd_grad

    def runs(spec: ConvSpec) -> tuple[bool, bool, bool]:
        """(forward, input gradient, weight gradient)"""
        g = _Geom(spec)
        fwd, back = g.forward_plane(16), g.backward_plane(16)
        return (g.padded and conv_winograd.applies(fwd, spec.connect),
                g.padded and conv_winograd.applies(back, spec.connect),
                g.padded and _winograd_grad(spec, fwd))

    assert runs(CASES["winograd_same"]) == runs(CASES["winograd_valid_accumulate"]) == (True, True, True)
    # CIFAR's first layer (3 input channels), LeNet's 5x5 and tabled convolutions, odd outputs: direct
    assert runs(make_spec(3, 32, 32, 32, 3, 3, pad=(1, 1, 1, 1))) == (False, False, False)
    assert not any(any(runs(CASES[n])) for n in ("lenet_c3", "3x3_same", "rows_32_wide_odd_height", "wide_out_19"))
    assert runs(make_spec(32, 7, 32, 32, 3, 3, pad=(1, 1, 1, 1))) == (False, False, False)  # 7 output rows
    # 16 tiles an image, a vector's worth: enough, 12 are not (the weight gradient's blocks hold several images)
    assert runs(make_spec(64, 8, 8, 64, 3, 3, pad=(1, 1, 1, 1))) == (True, True, True)
    assert runs(CASES["winograd_images_per_block"]) == (False, False, True)
    assert runs(CASES["winograd_8_outputs"]) == (True, False, False)
    assert runs(CASES["winograd_12_inputs"]) == (False, True, False)
    assert not runs(dataclasses.replace(CASES["winograd_same"], winograd=False))[2]


def test_which_input_gradients_run_as_rows_of_dx() -> None:
    """Small maps whose padded dy is mostly zeros (LeNet's C3: 14x14 from 10x10 by 5x5) skip its zero rows."""
    from cnnc.codegen.conv import _Geom, _rows_backward

    def rows(spec: ConvSpec, vw: int) -> bool:
        g = _Geom(spec)
        return g.padded and _rows_backward(spec, g.backward_plane(vw))

    assert rows(CASES["lenet_c3"], 16) and rows(CASES["lenet_c3"], 8)
    assert not rows(CASES["lenet_c3"], 4)  # 6 channels of 4 vectors a row: more sums than SSE's registers hold
    # many channels (a CIFAR or ResNet layer) or Winograd's input gradient: on the padded plane
    assert not rows(make_spec(32, 32, 32, 32, 3, 3, pad=(1, 1, 1, 1)), 16)
    assert not rows(CASES["winograd_same"], 16)


def test_which_forward_convolutions_run_on_shifted_copies() -> None:
    from cnnc.codegen.conv import _forward_plane, _Geom

    def shifted(spec: ConvSpec, vw: int = 16) -> bool:
        return _forward_plane(spec, _Geom(spec).forward_plane(vw)).shifted

    assert all(shifted(CASES[n]) for n in ("shifted_6_wide", "shifted_8x8", "shifted_5x5_valid", "shifted_uneven_pad",
                                           "shifted_partial_vector", "lenet_c1", "lenet_c3", "connect", "one_output"))
    assert not shifted(CASES["shifted_8x8"], 8)  # rows of whole vectors: product_rows
    assert not any(shifted(CASES[n]) for n in ("rows_16_wide_connect", "winograd_same"))  # whole vectors, Winograd
    assert not shifted(dataclasses.replace(CASES["lenet_c3"], kw=1, ow=14))  # one kernel column: nothing to shift
    assert not shifted(dataclasses.replace(CASES["shifted_8x8"], winograd=True))  # 16 tiles: Winograd


def test_which_weight_gradients_run_as_dot_products_on_shifted_copies() -> None:
    from cnnc.codegen.conv import _dot_shifted, _Geom

    def dot(spec: ConvSpec, vw: int = 16) -> bool:
        return _dot_shifted(spec, _Geom(spec).forward_plane(vw)) is not None

    # fewer output channels than half a vector (C1: 6), with or without a table, at every width that leaves it so
    assert all(dot(CASES[n]) for n in ("lenet_c1", "connect", "connect_few_outputs", "one_output", "shifted_5x5_valid"))
    assert all(dot(CASES["one_output"], vw) for vw in (16, 8, 4))
    # a vector of output channels (C3's 16, with its table), Winograd, rows of whole vectors: not
    assert not any(dot(CASES[n]) for n in ("lenet_c3", "wide_out_19", "winograd_same", "5x5_rows_32_wide"))
    assert not dot(CASES["lenet_c1"], 8)  # 6 outputs fill most of a vector of 8: over channels


def test_which_weight_gradients_run_with_images_in_lanes() -> None:
    from cnnc.codegen.conv import _Geom, _lanes

    def lanes(spec: ConvSpec, vw: int = 16) -> bool:
        return _lanes(spec, _Geom(spec).forward_plane(vw))

    # a connect table that wastes lanes over output channels (C3: 60 of 96 pairs), at every width
    assert all(lanes(CASES[n], vw) for n in ("lenet_c3", "wide_connect_17") for vw in (16, 8, 4))
    # C1's 6 outputs in vectors of 8 (over channels, 75% of the lanes): in lanes; at 16 it runs as dot products
    assert lanes(CASES["lenet_c1"], 8) and not lanes(CASES["lenet_c1"])
    # full vectors of output channels, padding (no border in the lanes), Winograd: not
    assert not any(lanes(CASES[n]) for n in ("wide_out_19", "3x3_same", "winograd_same", "5x5_rows_32_wide"))


def test_which_forwards_run_in_lanes() -> None:
    from cnnc.codegen.conv import _forward_plane, _Geom, _lanes_forward, images_in_lanes

    def lanes(spec: ConvSpec, vw: int = 16) -> bool:
        return _lanes_forward(spec, _forward_plane(spec, _Geom(spec).forward_plane(vw)))

    # at most 0.9 of the shifted copies' vector FMAs: C3 at 16 lanes (100 outputs in 112 lanes), not at 8 (104)
    assert lanes(CASES["lenet_c3"]) and not lanes(CASES["lenet_c3"], 8)
    assert all(lanes(CASES["lanes_5x5_outputs"], vw) for vw in (16, 8, 4))
    assert lanes(CASES["shifted_partial_vector"], 8)
    # whole vectors of outputs (C1's 784), padding, Winograd, a share of the output rows: not
    assert not any(lanes(CASES[n]) for n in ("lenet_c1", "shifted_6_wide", "winograd_same", "3x3_same"))
    assert not lanes(dataclasses.replace(CASES["lenet_c3"], rows=(0, 5)))
    assert images_in_lanes("emit_conv_forward", CASES["lenet_c3"], 16)


def test_which_input_gradients_run_in_lanes() -> None:
    from cnnc.codegen.conv import _Geom, _lanes_data, images_in_lanes

    def lanes(spec: ConvSpec, vw: int = 16) -> bool:
        return _lanes_data(spec, _Geom(spec).backward_plane(vw))

    # each width has a case in lanes (LeNet's C3 at 16 and 8 lanes: 9,375 vector FMAs an image where rows need 15,000)
    assert lanes(CASES["lenet_c3"]) and lanes(CASES["lenet_c3"], 8) and lanes(CASES["shifted_5x5_valid"])
    assert lanes(CASES["wide_connect_17"], 8) and lanes(CASES["wide_connect_17"], 4)
    # padding (no border in the lanes), whole vectors of dx columns, Winograd: not
    assert not any(lanes(CASES[n]) for n in ("3x3_same", "connect", "5x5_rows_32_wide", "winograd_same"))
    # a training step gives these kernels whole groups of images; a weight gradient takes its whole range anyway
    assert images_in_lanes("emit_conv_backward_data", CASES["lenet_c3"], 16)
    assert not images_in_lanes("emit_conv_backward_weights", CASES["lenet_c3"], 16)
    assert not images_in_lanes("emit_conv_backward_data", CASES["3x3_same"], 16)


def test_which_convolutions_run_on_the_padded_image() -> None:
    from cnnc.codegen.conv import _Geom

    padded = {name: _Geom(spec).padded for name, spec in CASES.items()}
    assert padded["3x3_same"] and padded["lenet_c3"] and padded["3x3_pad_top_left"] and padded["nobias_pad2"]
    # strides, groups, 1x1 (the image is its own column matrix) and padding as large as the kernel: im2col
    assert not any(padded[n] for n in ("3x5_stride2_odd", "groups2", "1x1", "3x3_pad_3", "4x2_mixed_stride"))


def test_workspace_sizes() -> None:
    dyt = lambda s: s.oh * s.ow * (s.o // s.groups)  # dy of one group, transposed, for backward weights
    s = CASES["1x1"]
    assert conv_workspace_floats(s, 16) == dyt(s)
    s = CASES["3x5_stride2_odd"]  # stride 2: and the padded image the pairs are read from, 9 x 14 a channel
    paired = -(-(s.c * 9 * 14 + 2 * 16) // 16) * 16  # (rows of the last tap, and a float past each row's last pair)
    assert conv_workspace_floats(s, 16) == s.c * s.kh * s.kw * s.oh * s.ow + dyt(s) + paired
    s = CASES["connect_1x1"]
    assert conv_workspace_floats(s, 16) == s.o * s.c + dyt(s)
    # stride 1, many channels on a small map: the padded planes need more than im2col
    s = make_spec(64, 4, 4, 64, 3, 3, pad=(1, 1, 1, 1), winograd=False)
    padded = 64 * 6 * 6 + 2 + (32 - 24)  # 64 planes of 6 x 6, then what the last taps read past them: 2320
    out = 64 * 32  # 4 rows of 6 columns rounded up to two vectors, for each output channel
    weights = 64 * 64 * 9  # the flipped copy for the input gradient (as large as the weight gradient's sums)
    assert conv_workspace_floats(s, 16) == 2320 + out + weights == -(-padded // 16) * 16 + out + weights
    # by Winograd, the weight gradient needs the most: the plane, dy^T, then V and Y for a block of 16 images
    # of 4 tiles (rows a cache line longer, and a line between the 16 elements' parts) and the transformed
    # gradient dU, 16 of each
    dyt, v, y, du = 16 * 64, 16 * (64 * (64 + 16) + 16), 16 * (64 * 64 + 16), 16 * 64 * 64
    assert conv_workspace_floats(dataclasses.replace(s, winograd=True), 16) == 2320 + dyt + v + y + du
    with pytest.raises(ValueError):
        conv_workspace_floats(dataclasses.replace(CASES["connect_1x1"], groups=2, o=4), 16)


# --- the references are the gradients of the forward reference (finite differences, float64) ---------


FD_SPECS = {
    "groups_stride_pad": make_spec(4, 4, 5, 2, 2, 3, stride=(2, 1), pad=(1, 1, 0, 1), groups=2),
    "connect": make_spec(3, 4, 4, 2, 3, 2, pad=(1, 0, 1, 1), connect=((0, 2), (1,))),
}


@pytest.mark.parametrize("spec", FD_SPECS.values(), ids=FD_SPECS.keys())
def test_reference_gradients_finite_difference(spec: ConvSpec) -> None:
    rng = np.random.default_rng(11)
    s = spec
    x = rng.normal(size=(2, s.c, s.h, s.w))
    w = random_weights(rng, s)
    b = rng.normal(size=s.o)
    g = rng.normal(size=(2, s.o, s.oh, s.ow))  # dL/dy for L = sum(conv(x) * g)
    loss = lambda x, w, b: float(np.sum(conv_ref(x, w, b, s) * g))

    def numeric(f, v: np.ndarray) -> np.ndarray:
        grad = np.zeros_like(v)
        eps = 1e-6
        for i in np.ndindex(v.shape):
            old = v[i]
            v[i] = old + eps
            up = f()
            v[i] = old - eps
            down = f()
            v[i] = old
            grad[i] = (up - down) / (2 * eps)
        return grad

    dw_ref, db_ref = conv_weights_ref(x, g, s)
    np.testing.assert_allclose(conv_data_ref(g, w, s), numeric(lambda: loss(x, w, b), x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw_ref, numeric(lambda: loss(x, w, b), w) * connect_mask(s)[:, :, None, None],
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db_ref, numeric(lambda: loss(x, w, b), b), rtol=1e-6, atol=1e-8)


def assert_weight_gradient_added(dw, db, dw0, db0, xr, dyr, s) -> None:
    """dW and db (None: no bias) hold their start values plus the float64 reference's gradients (tolerance 1e-5
    relative to the largest), and the weights outside a connect table are untouched."""
    dw_ref, db_ref = conv_weights_ref(xr, dyr, s)
    mask = np.broadcast_to(connect_mask(s)[:, :, None, None], dw.shape)
    scale = max(1.0, float(np.abs(dw_ref).max()))
    np.testing.assert_allclose(dw[mask], (dw0 + dw_ref)[mask], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(dw[~mask], dw0[~mask])
    if db is not None:
        scale = max(1.0, float(np.abs(db_ref).max()))
        np.testing.assert_allclose(db, db0 + db_ref, rtol=1e-5, atol=1e-5 * scale)


# output rows of whole vectors at every width, so the forward can claim bands of rows (conv.claim_bands):
# 'same' padding, and uneven padding with the rows below the image read by the last band
CLAIMS = {
    "same_12_rows": make_spec(5, 12, 32, 6, 3, 3, pad=(1, 1, 1, 1), gap=3),
    "uneven_pad_5x5": make_spec(3, 17, 16, 4, 5, 5, pad=(2, 2, 1, 2), bias=False),
}


@pytest.mark.parametrize("case", list(CLAIMS))
def test_claimed_forward_gives_the_same_bits_on_any_number_of_threads(jit, case: str) -> None:
    """Threads calling the claim form on one range with one counter compute each image (whole, or in bands near
    the end of the range) as the plain forward does, bit for bit, each unit once; nothing outside the range."""
    s = CLAIMS[case]
    claimed = dataclasses.replace(s, claim=True)
    assert claim_bands(claimed, jit.vw) is not None
    emit_conv_forward(jit.module, "plain", s, jit.vw)
    emit_conv_forward(jit.module, "claim", claimed, jit.vw)
    rng = np.random.default_rng(3)
    n_images, n0, n1 = 9, 1, 8
    x = rng.uniform(-1, 1, (n_images, s.c, s.h, s.w))
    x[:n0] = x[n1:] = np.nan
    x_buf = arena(x, s.x_stride, np.nan)
    w, bias = random_weights(rng, s), rng.uniform(-1, 1, s.o).astype(np.float32) if s.bias else None
    plain = np.full((n_images, s.y_stride), SENTINEL, dtype=np.float32)
    jit("plain", x_buf, w.astype(np.float32), bias, plain, workspace(s, jit.vw), n0, n1)
    xr = x_buf[n0:n1, :s.c * s.h * s.w].reshape(-1, s.c, s.h, s.w).astype(np.float64)
    expected = conv_ref(xr, w, None if bias is None else bias.astype(np.float64), s)
    size = s.o * s.oh * s.ow
    np.testing.assert_allclose(plain[n0:n1, :size], expected.reshape(n1 - n0, size), rtol=1e-5,
                               atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    bands = claim_bands(claimed, jit.vw)[0]
    for count in (1, 2, n1 - n0):  # the range ends at image n0 + count: all of it in bands, or the tail only
        units = max(0, count - CLAIM_TAIL) + min(count, CLAIM_TAIL) * bands
        for callers in (1, 2, 3):
            y = np.full((n_images, s.y_stride), SENTINEL, dtype=np.float32)
            counter = np.zeros(8, dtype=np.int64)
            spaces = [workspace(s, jit.vw) for _ in range(callers)]
            jit("claim", x_buf, w.astype(np.float32), bias, y, spaces[0], counter, 0, 0)  # (compiled; no units)
            counter[0] = 0
            threads = [threading.Thread(target=jit, args=("claim", x_buf, w.astype(np.float32), bias, y, ws, counter,
                                                          n0, n0 + count)) for ws in spaces]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert counter[0] == units + callers  # every unit claimed once, then one failed claim per caller
            for ws in spaces:
                check_guard(ws, s, jit.vw)
            done = slice(n0, n0 + count)
            np.testing.assert_array_equal(y[done], plain[done])
            untouched = np.ones(y.shape, dtype=bool)
            untouched[done] = False
            assert np.all(y[untouched] == SENTINEL)
