"""What each kernel is specialised to: static shapes, per-image strides, options.

These records are the contract between the module builder (which derives
them from the checked graph) and the kernel emitters (which turn one into an
LLVM function). All tensors are float32, batch-major: element ``i`` of image
``n`` of a tensor lives at ``base + n * stride + i``, where the stride (in
floats) is the ``*_stride`` field, so a tensor may sit inside a larger
per-image arena slot. Within one image a feature map is C x H x W, row-major.

Kernel calling convention (see ``emit.kernel``): pointer arguments first,
then scalars, then ``n0, n1``; the kernel processes images ``n0 <= n < n1``.
Weight-gradient kernels always accumulate (``+=``) into their gradient
buffers, which the runtime zeroes once per step; data-gradient kernels
overwrite, or accumulate when ``accumulate`` is set (a tensor that fans out
receives the sum of its consumers' gradients).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvSpec:
    """2-D convolution (cross-correlation, as PyTorch and Caffe), optionally grouped or table-connected.

    Weight ``(o, c // groups, kh, kw)``; bias ``(o,)``. Padding is zero;
    ``pt``/``pl`` are top/left, the bottom/right padding follows from
    ``oh``/``ow`` (``same`` with an even kernel pads one more at the bottom/right).
    A dilated convolution (``dh``/``dw`` > 1) runs on the im2col path.
    ``connect[i]`` lists the input channels output channel ``i`` reads (groups
    must be 1); weights outside it are zero and their gradients are never written.
    """

    c: int
    h: int
    w: int
    o: int
    oh: int
    ow: int
    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    pt: int = 0
    pl: int = 0
    groups: int = 1
    connect: tuple[tuple[int, ...], ...] | None = None
    bias: bool = True
    dh: int = 1  # dilation: tap (ky, kx) reads input row oy*sh - pt + ky*dh, column ox*sw - pl + kx*dw
    dw: int = 1
    act: str = "none"
    act_args: tuple[tuple[str, float], ...] = ()  # the activation's arguments, e.g. (("alpha", 0.01),)
    x_stride: int = 0
    y_stride: int = 0
    accumulate: bool = False
    winograd: bool = True  # 3x3 stride-1 convolutions may use Winograd F(2x2, 3x3) (conv_winograd.applies)
    scale_at: int = 0  # a folded batchnorm: y = conv * scale[o] + b[o], scale `scale_at` floats after b (0: none)
    cached: bool = False  # inference: the forward takes a `cache` region to keep its Winograd weights between calls
    rows: tuple[int, int] | None = None  # infer_split: the forward computes output rows [r0, r1) only (conv.row_tile)
    claim: bool = False  # the forward takes its images and bands of rows from a shared counter (conv.claim_bands)
    residual: bool = False  # inference: the forward takes an `r` of y's layout, added before the activation
    r_stride: int = 0  # r's floats per image


@dataclass(frozen=True)
class DenseSpec:
    """y = act(x W^T + b): weight ``(o, f)``, bias ``(o,)``."""

    f: int
    o: int
    bias: bool = True
    act: str = "none"
    act_args: tuple[tuple[str, float], ...] = ()  # the activation's arguments, e.g. (("alpha", 0.01),)
    x_stride: int = 0
    y_stride: int = 0
    accumulate: bool = False
    scale_at: int = 0  # a folded batchnorm: y = x W^T * scale + b, scale `scale_at` floats after b (0: none)


@dataclass(frozen=True)
class PoolSpec:
    """Max or average pooling over kh x kw windows; global average pooling is kh=h, kw=w.

    Max pooling treats padding as -inf; average pooling counts padded zeros in
    the divisor ``kh * kw`` (PyTorch's ``count_include_pad=True``). Backward of
    max routes the gradient to the first maximum of each window in row-major order.
    """

    kind: str
    c: int
    h: int
    w: int
    oh: int
    ow: int
    kh: int
    kw: int
    sh: int
    sw: int
    pt: int = 0
    pl: int = 0
    x_stride: int = 0
    y_stride: int = 0
    accumulate: bool = False
    # backward: the activation fused into the conv or dense before the pool; dx is multiplied by its gradient
    # (from the pool's input, that activation's output) as it is stored (``pool.takes_activation_grad``)
    act: str = "none"
    act_args: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ElementwiseSpec:
    """An activation over ``size`` floats per image (forward y = f(x); backward from the saved y, or x).

    ``v_stride`` is the per-image stride of the saved tensor the backward kernel
    reads (0: ``y_stride``); it differs when that tensor is the input.
    """

    size: int
    act: str
    act_args: tuple[tuple[str, float], ...] = ()
    x_stride: int = 0
    y_stride: int = 0
    accumulate: bool = False
    v_stride: int = 0


@dataclass(frozen=True)
class SoftmaxSpec:
    """Softmax over channels at each of ``hw`` positions (a vector input has hw=1)."""

    c: int
    hw: int = 1
    x_stride: int = 0
    y_stride: int = 0
    accumulate: bool = False


@dataclass(frozen=True)
class DropoutSpec:
    """Inverted dropout: keep with probability 1-p and scale kept values by 1/(1-p)."""

    size: int
    p: float
    x_stride: int = 0
    y_stride: int = 0
    mask_stride: int = 0
    accumulate: bool = False


@dataclass(frozen=True)
class NoiseSpec:
    """Input jitter: x += sigma * z, z standard normal, drawn from a counter-based hash of (seed, image, index)."""

    size: int
    x_stride: int = 0


@dataclass(frozen=True)
class AugmentSpec:
    """Crop and flip (``cnnc.codegen.augment``): images of ``channels x height x width`` floats, ``x_stride`` apart."""

    channels: int
    height: int
    width: int
    x_stride: int = 0

    @property
    def size(self) -> int:
        return self.channels * self.height * self.width


@dataclass(frozen=True)
class GatherSpec:
    """A batch gathered from a stored set (``cnnc.codegen.gather``): network inputs of ``channels x height x width``
    floats, contiguous; ``byte``: the set holds uint8 (scaled by 1/255), else float32."""

    channels: int
    height: int
    width: int
    byte: bool

    @property
    def size(self) -> int:
        return self.channels * self.height * self.width


@dataclass(frozen=True)
class CopySpec:
    """dst[n, dst_offset + i] (+)= src[n, src_offset + i] for i < count: add, concat and their gradients."""

    count: int
    src_stride: int
    dst_stride: int
    src_offset: int = 0
    dst_offset: int = 0
    accumulate: bool = False


@dataclass(frozen=True)
class SumSpec:
    """y[n, i] = act(a[n, i] + b[n, i]) for i < count: an add of two tensors in one pass (not a copy and an add),
    with the activation an inference graph fused into it (``cnnc.passes.fuse``)."""

    count: int
    a_stride: int
    b_stride: int
    y_stride: int
    act: str = "none"
    act_args: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class FanOutSpec:
    """a[n, i] (+)= dy[n, i] and b[n, i] (+)= dy[n, i] for i < count: an add's gradient into two inputs,
    reading dy once. a and b must not overlap."""

    count: int
    dy_stride: int
    a_stride: int
    b_stride: int
    accumulate_a: bool = False
    accumulate_b: bool = False


@dataclass(frozen=True)
class LossSpec:
    """A loss over ``k`` outputs per image: ``cross_entropy`` (integer labels) or ``mse`` (float targets)."""

    kind: str
    k: int
    x_stride: int = 0
    dx_stride: int = 0


@dataclass(frozen=True)
class BatchNormSpec:
    """Batch normalization over ``c`` channels of ``hw`` positions each (hw = 1: a vector of c features).

    ``x_stride`` is the normalized input's per-image stride, ``y_stride`` the
    output's (and its gradient's), ``dx_stride`` the input gradient's. ``act``:
    an activation fused after the per-channel affine map (its gradient taken
    in ``grad_sums``, from the tensor it saves, at ``v_stride``; 0: y_stride).
    Partial sums are float64.
    """

    c: int
    hw: int
    x_stride: int = 0
    y_stride: int = 0
    dx_stride: int = 0
    act: str = "none"
    act_args: tuple[tuple[str, float], ...] = ()
    accumulate: bool = False
    v_stride: int = 0


@dataclass(frozen=True)
class ResidualSpec:
    """A batchnorm whose only consumer is a two-input add (a residual block's last batchnorm), in training.

    Forward, after the batch statistics: y = act(x * scale + shift + r), the
    batchnorm, the add of r (the add's other input) and the activation after
    the add in one pass (``y_stride``: the activation's output, or the add's).
    Backward: g = dy * act'(saved) (``y_stride``: dy, ``v_stride``: the
    activation's output), written (+)= into the add's two input gradients (``a``:
    r's, ``b``: the batchnorm's), and the batchnorm's float64 partial sums of g
    and g * (x - mean), in one pass. The values are those of the separate
    kernels, operation for operation.
    """

    c: int
    hw: int
    x_stride: int = 0
    r_stride: int = 0
    y_stride: int = 0
    v_stride: int = 0
    a_stride: int = 0
    b_stride: int = 0
    act: str = "none"
    act_args: tuple[tuple[str, float], ...] = ()
    accumulate_a: bool = False
    accumulate_b: bool = False


@dataclass(frozen=True)
class FoldSpec:
    """A batchnorm of ``o`` channels as a per-channel scale and shift: folded into the layer before it (``bias``:
    that layer's own bias, shifted too), or applied by itself."""

    o: int
    eps: float
    bias: bool = True
