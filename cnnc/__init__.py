"""cnnc: a compiler for convolutional neural networks.

    model = cnnc.compile("examples/lenet5.cnn")
    y = model(x)                       # x: (N, 1, 32, 32) float32
    loss, grads = model.value_and_grad(x, labels)

Heavy modules (the front end, LLVM) load on first use, so ``import cnnc`` is quick.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cnnc.errors import CnnError
from cnnc_runtime import __version__

if TYPE_CHECKING:
    from cnnc_runtime.model import Model

__all__ = ["compile", "compile_string", "load", "CnnError", "__version__"]


def compile_string(text: str, name: str = "<string>", **options: Any) -> Model:
    """Compile .cnn source text to a ``Model`` for this CPU. Mistakes raise ``CnnError``.

    Options: ``cache`` (default True: reuse a compiled object from the on-disk
    cache), ``seed`` (weight initialisation, default: the train
    section's ``seed``, else 0), ``generic`` (True:
    target baseline x86-64 instead of this CPU), ``fuse`` (default True:
    fold activations into conv/dense kernels), ``winograd`` (default True: 3x3
    stride-1 convolutions with enough channels and outputs use Winograd
    F(2x2, 3x3), 2.25x fewer multiply-adds; False keeps every convolution a
    plain sum of products, which rounds a little differently).
    """
    return _build(text, name, options)


def compile(path: str | os.PathLike[str], **options: Any) -> Model:  # noqa: A001 - the API's name
    """Compile a .cnn file, or an ONNX file with its weights, to a ``Model`` (see ``compile_string`` for the options).

    An ``.onnx`` file goes through ``cnnc import`` (``cnnc.onnx.import_``): the network as .cnn text, compiled,
    then its weights copied in, ready to run or to train further. That needs the ``onnx`` extra.
    """
    if str(path).lower().endswith(".onnx"):
        from cnnc.onnx.import_ import import_file  # (optional dependency: only ONNX files need it)

        imported = import_file(path)
        model = _build(imported.text, f"{path} (as .cnn)", options)
        model.load_arrays(imported.weights, str(path))
        return model
    from cnnc.sources import read_source

    return _build(read_source(path), str(path), options)


def load(path: str | os.PathLike[str], key: bytes | str | os.PathLike[str] | None = None) -> Model:
    """Load an artifact written by ``cnnc compile -o`` (no compiler needed).

    An artifact is native code, as trusted as a shared library: load only
    ones you built or whose signature you check with `key` (the bytes, or the
    path of the key file given to ``cnnc compile --sign``).
    """
    from cnnc_runtime.model import load as load_artifact

    return load_artifact(path, key)


def _build(source: str, name: str, options: dict) -> Model:
    from cnnc.pipeline import compile_source
    from cnnc_runtime.model import Model

    unknown = set(options) - {"cache", "seed", "generic", "fuse", "winograd"}
    if unknown:
        raise TypeError(f"unknown compile option(s): {', '.join(sorted(unknown))}")
    manifest, obj = compile_source(source, name, generic=options.get("generic", False),
                                   use_cache=options.get("cache", True), fuse=options.get("fuse", True),
                                   winograd=options.get("winograd", True))
    return Model(manifest, obj, seed=options.get("seed"))
