"""``Model``: a compiled network ready to run and train; the runtime's user-facing class.

It is the ``Engine`` (``cnnc_runtime.engine``: parameters, inference, the
training step) with the training loop (``cnnc_runtime.train``) as methods:
``model.fit(...)``, ``model.evaluate(...)``. The layers only point down:
``model`` imports ``train`` and ``engine``, ``train`` imports ``engine``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cnnc_runtime import artifact, onnx_export, train
from cnnc_runtime.engine import Engine
from cnnc_runtime.train import History


class Model(Engine):
    """A compiled network: call it on a batch, train it, save and load its weights."""

    def fit(self, x: Any, y: Any, **kwargs: Any) -> History:
        """Train on (x, y); see ``cnnc_runtime.train.fit`` for the settings. Returns a ``History``."""
        return train.fit(self, x, y, **kwargs)

    def evaluate(self, x: Any, y: Any, loss: str | None = None) -> tuple[float, float | None]:
        """(mean loss, accuracy) on a whole set, dropout off."""
        value, acc, _ = train.evaluate(self, x, y, loss)
        return value, acc

    def export_onnx(self, path: str | os.PathLike[str]) -> None:
        """Write this network and its current weights as an ONNX file (``cnnc_runtime.onnx_export``; opset 17).

        Needs the ``onnx`` extra (``pip install 'cnnc[onnx]'``); says so when it is missing.
        """
        onnx_export.export_model(self, path)


def load(path: str | os.PathLike[str], key: bytes | str | os.PathLike[str] | None = None) -> Model:
    """Load an artifact written by ``cnnc compile -o``: needs only numpy and llvmlite.

    An artifact is native code, as trusted as a shared library. With a `key`
    (bytes, or a key file's path) one that is unsigned or not signed with it
    is refused before any of its code is mapped.
    """
    manifest, obj, weights = artifact.read(Path(path), key)
    try:
        return Model(manifest, obj, weights)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
