"""cnnc: a compiler for convolutional neural networks.

    model = cnnc.compile("examples/lenet5.cnn")
    y = model(x)                       # x: (N, 1, 32, 32) float32
    loss, grads = model.value_and_grad(x, labels)

Everything else (numpy, the runtime, the pipeline; the front end and LLVM only
on a compile the cache does not have) is imported on first use, so ``import
cnnc`` takes about 10 ms.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cnnc.errors import CnnError
from cnnc.forkgate import compiling
from cnnc_runtime import __version__
from cnnc_runtime.signals import signals_deferred

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
    with compiling():
        return _build(text, name, options)


def compile(path: str | os.PathLike[str], **options: Any) -> Model:  # noqa: A001 - the API's name
    """Compile a .cnn file, or an ONNX file with its weights, to a ``Model`` (see ``compile_string`` for the options).

    An ``.onnx`` file goes through ``cnnc import`` (``cnnc.onnx.import_``): the network as .cnn text, compiled,
    then its weights copied in, ready to run or to train further. That needs the ``onnx`` extra.
    """
    with compiling():
        if str(path).lower().endswith(".onnx"):
            from cnnc.onnx.import_ import import_file  # (optional dependency: only ONNX files need it)

            imported = import_file(path)
            model = _build(imported.text, f"{path} (as .cnn)", options)
            model.load_arrays(imported.weights, str(path))
            return model
        return _build(None, path, options)


def load(path: str | os.PathLike[str], key: bytes | str | os.PathLike[str] | None = None) -> Model:
    """Load an artifact written by ``cnnc compile -o`` (no compiler needed).

    An artifact is native code, as trusted as a shared library: load only
    ones you built or whose signature you check with `key` (the bytes, or the
    path of the key file given to ``cnnc compile --sign``).
    """
    with compiling():  # (not a compile, but its lazy imports must not be half done at a fork either)
        with signals_deferred():  # (nor by a Ctrl-C: a package half imported stays broken in the process)
            from cnnc_runtime.model import load as load_artifact  # lazy: numpy and the runtime, not on `import cnnc`

        return load_artifact(path, key)


def _build(text: str | None, path: str | os.PathLike[str], options: dict) -> Model:
    """`text` compiled, or the file at `path` when `text` is None."""
    with signals_deferred():  # (a Ctrl-C is raised once the import is whole: see cnnc_runtime.signals)
        from cnnc import pipeline  # lazy: numpy, llvmlite and the runtime on the first compile, not on `import cnnc`

    unknown = set(options) - {"cache", "seed", "generic", "fuse", "winograd"}
    if unknown:
        raise TypeError(f"unknown compile option(s): {', '.join(sorted(unknown))}")
    source = pipeline.read_source(path) if text is None else text
    return pipeline.compile_model(source, str(path), seed=options.get("seed"), generic=options.get("generic", False),
                                  use_cache=options.get("cache", True), fuse=options.get("fuse", True),
                                  winograd=options.get("winograd", True))
