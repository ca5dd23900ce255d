"""Training augmentation in native code: a random crop after zero padding and a random horizontal flip.

``augment(x, seed_i64, image0_i64, pad_i64, flip_i64, fill, ws, n0, n1)``
rewrites images ``[n0, n1)`` of a prepared batch in place. Image ``n``'s
draws come from one splitmix64 hash of ``(seed, image0 + n)``, its position
in the whole batch (``image0``: where ``x`` starts in it; a process's share
of a data-parallel step starts past 0), so they do not depend on how the
batch is split across threads or processes, and each thread augments the
images it has just prepared:

    h  = mix64((image0 + n) * GOLDEN + mix64(seed))
    dy = (h >> 48) mod (2 pad + 1),  dx = ((h >> 32) & 0xffff) mod (2 pad + 1),  flip = (h >> 31) & 1 & flip_i64

The image is padded by ``pad`` on every side, cropped back to its size at
``(dy, dx)`` and then mirrored when ``flip`` is drawn (torchvision's
``RandomCrop(padding=pad)`` then ``RandomHorizontalFlip``):

    out[c, y, x] = in[c, y + dy - pad, x' + dx - pad],  x' = W - 1 - x if flip else x

where a position outside the image takes ``fill[c]``: the value a black
pixel has after normalization, as padding the stored image with zeros gives.
``ws`` holds one image (``C * H * W`` floats). ``cnnc_runtime.augment`` is the
same computation in numpy, the reference the tests compare against.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.elementwise import counter_hash, image_base, mix64, strips
from cnnc.codegen.emit import for_range, i64
from cnnc.codegen.specs import AugmentSpec

ARGS = ["x", "seed_i64", "image0_i64", "pad_i64", "flip_i64", "fill", "ws", "n0", "n1"]


def emit_augment(module: ir.Module, name: str, spec: AugmentSpec, vw: int) -> ir.Function:
    """The crop-and-flip kernel for images of `spec` (see the module docstring)."""
    fn, b, a = emit.kernel(module, name, ARGS)
    c_, h_, w_ = spec.channels, spec.height, spec.width
    stride = spec.x_stride or spec.size
    key = mix64(b, a["seed_i64"])
    pad = a["pad_i64"]
    span = b.add(b.shl(pad, i64(1)), i64(1), name="span")
    with for_range(b, a["n0"], a["n1"], name="n") as n:
        xb = image_base(b, a["x"], n, stride, "xb")
        h = counter_hash(b, b.add(a["image0_i64"], n), key)
        oy = b.sub(b.urem(b.lshr(h, i64(48)), span), pad, name="oy")
        ox = b.sub(b.urem(b.and_(b.lshr(h, i64(32)), i64(0xFFFF)), span), pad, name="ox")
        flip = b.icmp_signed("!=", b.and_(b.and_(b.lshr(h, i64(31)), i64(1)), a["flip_i64"]), i64(0), name="flip")
        strips(b, spec.size, vw, lambda i, w: emit.store(b, emit.load(b, xb, i, w), a["ws"], i), name="copy")
        with for_range(b, 0, c_, name="c") as c:
            fill = emit.load(b, a["fill"], c)
            plane = b.mul(c, i64(h_ * w_), name="plane")
            with for_range(b, 0, h_, name="y") as y:
                sy = b.add(y, oy, name="sy")
                row_ok = b.and_(b.icmp_signed(">=", sy, i64(0)), b.icmp_signed("<", sy, i64(h_)))
                row = b.add(plane, b.mul(sy, i64(w_)), name="row")
                out_row = b.add(plane, b.mul(y, i64(w_)), name="out_row")
                with for_range(b, 0, w_, name="x") as x:
                    sx = b.add(b.select(flip, b.sub(i64(w_ - 1), x), x), ox, name="sx")
                    ok = b.and_(row_ok, b.and_(b.icmp_signed(">=", sx, i64(0)), b.icmp_signed("<", sx, i64(w_))))
                    src = b.select(ok, b.add(row, sx), i64(0))
                    value = b.select(ok, emit.load(b, a["ws"], src), fill)
                    emit.store(b, value, xb, b.add(out_row, x))
    b.ret_void()
    return fn
