"""Input preparation: the one rule that turns images as a caller holds them into the network's input.

Every way in applies it, whatever the dtype: ``model(x)``, ``predict``,
``value_and_grad``, ``fit`` and ``evaluate`` (these a mini-batch at a time,
so a dataset stays in memory as stored), and ``cnnc train``, ``eval`` and
``run``, as torchvision's ``ToTensor``, ``Pad`` and ``Normalize`` would:

1. layout: ``(N, C, H, W)``, ``(N, H, W)`` (one channel), channels-last
   ``(N, H, W, C)``, or flat ``(N, F)``; images smaller than the input are
   zero-padded, centred (MNIST's 28x28 into LeNet-5's 32x32); larger ones
   are refused with a ValueError naming the input shape;
2. scale: uint8 is divided by 255 (images as stored); other real, integer
   or bool dtypes are taken as they are (already in [0, 1], say);
3. normalize: with the train section's ``normalize(mean, std)`` (one number
   each, or one per channel), every input becomes ``(x - mean) / std`` after
   1 and 2 (the padding too).

The result is contiguous float32 ``(N, *input_shape)``: the network's input,
what the engine's step API (``gradients``, ``infer_into``) takes as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from cnnc_runtime.memory import check_fits


def prepare_images(x: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """Steps 1 and 2 of the rule on a whole set, as float32 (no normalization: the network's file knows that).

    uint8 is scaled by 1/255; (N, H, W) gains a channel axis; channels-last
    (N, H, W, C) arrays are transposed to (N, C, H, W); smaller images are
    zero-padded, centred (28x28 MNIST into 32x32 LeNet-5: 2 pixels each side).
    For a flat (F,) input the images are flattened to (N, C*H*W), which must equal F.
    Float images that need nothing of this come back as they are (not copied).
    """
    view, pad = image_view(x, input_shape)
    if pad is None and view.dtype != np.uint8:
        return view.astype(np.float32, copy=False)
    out = np.empty((len(view), *(int(d) for d in input_shape)), dtype=np.float32)
    _fill(out, view, pad, scale=view.dtype == np.uint8)
    return out


def image_view(x: np.ndarray, input_shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(x as (N, C, h, w) or (N, F) without copying where numpy can, (top, left) padding or None).

    Shapes that cannot fit the network input raise ValueError naming it.
    """
    shape = tuple(int(d) for d in input_shape)
    x = np.asarray(x)
    given = x.shape
    if x.ndim == 3:
        x = x[:, None, :, :]
    if len(shape) == 1:
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != shape[0]:
            raise ValueError(
                f"images of shape {x.shape[1:]} have {flat.shape[1]} values; the network expects "
                f"flat inputs of shape {shape}"
            )
        return flat, None
    if len(shape) != 3:
        raise ValueError(f"network input shape {shape} is neither (C, H, W) nor (F,)")
    c, h, w = shape
    if x.ndim == 2:
        if x.shape[1] != c * h * w:
            raise ValueError(f"flat inputs of {x.shape[1]} values do not fit the network input shape {shape}")
        x = x.reshape(len(x), c, h, w)
    if x.ndim != 4:
        raise ValueError(f"expected images (N, H, W) or (N, C, H, W) for network input {shape}, got {x.shape}")
    if x.shape[1] != c and x.shape[3] == c:  # channels last (N, H, W, C), as Keras and image files store them
        x = x.transpose(0, 3, 1, 2)
    _, xc, xh, xw = x.shape
    if xc != c:
        if len(given) == 3:
            got = "1 channel, as (N, H, W)"
        else:
            got = f"{xc} channel(s) read as (N, C, H, W), or {x.shape[3]} read as channels-last (N, H, W, C)"
        raise ValueError(f"images of shape {given[1:]} have {got}; the network expects {c} channel(s): "
                         f"input shape {shape}")
    if xh > h or xw > w:
        raise ValueError(f"images of {xh}x{xw} are larger than the network input shape {shape}")
    if (xh, xw) == (h, w):
        return x, None
    return x, ((h - xh) // 2, (w - xw) // 2)


def _fill(out: np.ndarray, images: np.ndarray, pad: tuple[int, int] | None, scale: bool) -> None:
    """Write `images` into the float32 `out` (same length): zero border, then optionally /255, in place."""
    if pad is None:
        inner = out
    else:
        out.fill(0)
        top, left = pad
        inner = out[:, :, top:top + images.shape[2], left:left + images.shape[3]]
    inner[...] = images
    if scale:
        inner /= 255


def normalization(normalize: dict[str, Any] | None,
                  input_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) as float32 arrays that broadcast over one input: one number for all channels, or one per channel.

    ``normalize`` is the train section's ``{"mean": M, "std": S}``, each a number or a list of C numbers (the
    input's channels). ValueError when a list has another length or a std is not positive.
    """
    if not normalize:
        return None
    shape = tuple(int(d) for d in input_shape)
    channels = shape[0] if len(shape) == 3 else 1
    out = []
    for key in ("mean", "std"):
        v = np.asarray(normalize[key], dtype=np.float64).reshape(-1)
        if v.size not in (1, channels):
            raise ValueError(f"normalize {key} has {v.size} values; the input has {channels} channel(s): give one "
                             f"number, or one per channel")
        if not np.isfinite(v).all() or (key == "std" and (v <= 0).any()):
            raise ValueError(f"normalize {key} must be {'positive' if key == 'std' else 'finite'}, got {v.tolist()}")
        a = v.astype(np.float32)
        out.append(a.reshape(-1, 1, 1) if len(shape) == 3 and v.size > 1 else a.reshape(()))
    return out[0], out[1]


class Inputs:
    """A set of inputs handed out a mini-batch at a time, prepared by the rule into a float32 buffer one reuses.

    uint8 images stay as stored, a quarter or less of their float32 size;
    other dtypes, and float32 in another layout, are converted to float32 once
    (as ``np.ascontiguousarray`` would). Each batch is gathered, padded,
    scaled and normalized on its way into the buffer: bit for bit what
    ``prepare_images`` followed by ``(x - mean) / std`` in float32 gives for
    the whole set. Float32 inputs of the input shape with nothing to
    normalize are only gathered (``direct``).
    """

    def __init__(self, x: np.ndarray, input_shape: Sequence[int],
                 normalize: dict[str, Any] | None = None, rows: np.ndarray | None = None) -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        view, self._pad = image_view(x, self.input_shape)
        self.stored = view.dtype == np.uint8
        if not self.stored and (view.dtype != np.float32 or not view.flags.c_contiguous):
            check_fits(4 * view.size, f"an input of {len(view)} images")  # (a broadcast view may claim any size)
            with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range: inf, refused by fit
                view = np.ascontiguousarray(view, dtype=np.float32)
        self._x = view
        self._norm = normalization(normalize, self.input_shape)
        self._rows = rows
        # float32 network inputs already: a batch is a gather of rows, the whole set (in order) the array itself
        self.direct = not self.stored and self._pad is None and self._norm is None \
            and tuple(view.shape[1:]) == self.input_shape

    def __len__(self) -> int:
        return len(self._x) if self._rows is None else len(self._rows)

    def blank(self) -> np.ndarray:
        """What a black (zero) pixel becomes once prepared, per channel: the crop's padding (``Model.augment``)."""
        if self._norm is None:
            return np.zeros(1, dtype=np.float32)
        mean, std = self._norm
        return ((np.float32(0) - mean) / std).astype(np.float32).reshape(-1)

    def first_non_finite(self) -> int | None:
        """The position of the first input holding a NaN or an infinity, None if there is none (uint8: never).

        One vectorised pass over the set, a block of rows at a time (no temporary the size of the set).
        """
        if self.stored:
            return None
        if self._rows is None:
            return first_non_finite_row(self._x)
        hits = np.flatnonzero(non_finite_rows(self._x)[self._rows])
        return int(hits[0]) if len(hits) else None

    def subset(self, rows: np.ndarray) -> Inputs:
        """The inputs at positions `rows` of this set, sharing its storage (no copy of the images)."""
        rows = np.asarray(rows, dtype=np.intp)
        sub = copy.copy(self)
        sub._rows = rows if self._rows is None else self._rows[rows]
        return sub

    def batch(self, idx: np.ndarray | slice, out: np.ndarray) -> np.ndarray:
        """The prepared inputs at positions `idx`, written to the front of `out`; returns that part of `out`."""
        m = len(range(len(self))[idx]) if isinstance(idx, slice) else len(idx)
        rows = idx if self._rows is None else self._rows[idx]
        dst = out[:m]
        if self.direct:
            if isinstance(rows, slice):
                dst[...] = self._x[rows]
            else:
                np.take(self._x, rows, axis=0, out=dst)
            return dst
        _fill(dst, self._x[rows], self._pad, scale=self.stored)
        if self._norm is not None:
            dst -= self._norm[0]
            dst /= self._norm[1]
        return dst

    def stored_rows(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The stored images' indices of positions `idx`, as int64 in the front of `out` (what ``layout`` reads)."""
        dst = out[:len(idx)]
        if self._rows is None:
            dst[...] = idx
        else:
            np.take(self._rows, idx, out=dst)
        return dst

    def layout(self) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
        """How native code reads the set (``cnnc.codegen.gather``): (uint8?, the stored array, geometry, norm).

        geometry (int64): the stored image's height and width, its (top, left) in the input and its element
        strides (image, channel, row, column); norm (float32): the mean of each input channel, then the std
        (0 and 1 without ``normalize``).
        """
        x = self._x
        steps = [s // x.itemsize for s in x.strides]
        if len(self.input_shape) == 3:
            _, _, h, w = x.shape
            top, left = self._pad or (0, 0)
            geometry = [h, w, top, left, *steps]
        else:  # flat inputs: one row of F values
            geometry = [1, x.shape[1], 0, 0, steps[0], 0, 0, steps[1]]
        channels = self.input_shape[0] if len(self.input_shape) == 3 else 1
        mean, std = self._norm or (np.float32(0), np.float32(1))
        norm = [np.broadcast_to(np.asarray(v, np.float32).reshape(-1), (channels,)) for v in (mean, std)]
        return self.stored, x, np.array(geometry, dtype=np.int64), np.concatenate(norm).astype(np.float32)

    def chunks(self, size: int, out: np.ndarray) -> Iterator[np.ndarray]:
        """The whole set in order, `size` inputs at a time, in `out` (overwritten by the next) or a view."""
        for start in range(0, len(self), size):
            if self.direct and self._rows is None:  # already the network's input, in order: a view does
                yield self._x[start:start + size]
            else:
                yield self.batch(slice(start, start + size), out)

    def all(self, buffer: Callable[[int], np.ndarray]) -> np.ndarray:
        """The whole set prepared: the array itself when ``direct``, else written into ``buffer(len(self))``."""
        if self.direct and self._rows is None:
            return self._x
        return self.batch(slice(None), buffer(len(self)))


_FINITE_BLOCK = 1 << 20  # values checked at a time


def non_finite_rows(x: np.ndarray) -> np.ndarray:
    """A bool per row of `x` (its first axis): whether that row holds a NaN or an infinity."""
    x = np.asarray(x)
    out = np.zeros(len(x), dtype=bool)
    if x.dtype.kind not in "fc" or len(x) == 0:
        return out
    rows = max(1, _FINITE_BLOCK // max(1, x[0].size))
    for start in range(0, len(x), rows):
        block = x[start:start + rows].reshape(min(rows, len(x) - start), -1)
        out[start:start + len(block)] = ~np.isfinite(block).all(axis=1)
    return out


def first_non_finite_row(x: np.ndarray) -> int | None:
    """The index of the first row of `x` that holds a NaN or an infinity; None if all are finite.

    Stops at the first block that has one: a clean set costs one pass, a bad one less.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "fc" or len(x) == 0:
        return None
    rows = max(1, _FINITE_BLOCK // max(1, x[0].size))
    for start in range(0, len(x), rows):
        bad = non_finite_rows(x[start:start + rows])
        if bad.any():
            return start + int(np.argmax(bad))
    return None
