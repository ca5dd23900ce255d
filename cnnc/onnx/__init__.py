"""ONNX in and out: export a compiled network, import other frameworks' CNNs, and ONNX's backend interface.

``Model.export_onnx`` (``cnnc_runtime.onnx_export``, in the runtime: it needs only the manifest
and the weights) writes a network as an ONNX file; ``import_.import_file``
turns an ONNX file into readable .cnn text and its weights; ``backend`` runs
ONNX's own backend tests through cnnc. The ``onnx`` package is an optional
extra (``pip install 'cnnc[onnx]'``): ``require_onnx`` says so when it is missing.
"""

from __future__ import annotations

from types import ModuleType

from cnnc.errors import CnnError


def require_onnx() -> ModuleType:
    """The ``onnx`` module, or a ``CnnError`` naming the extra to install."""
    try:
        import onnx  # (optional dependency, the onnx extra: only ONNX commands need it)
    except ImportError:
        raise CnnError("this needs the 'onnx' package: pip install 'cnnc[onnx]'") from None
    return onnx
