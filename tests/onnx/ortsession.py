"""onnxruntime for the tests, imported with $HOME pointing into a temporary directory.

onnxruntime writes a device id under ``$HOME/.cache`` when it is first imported;
the tests must leave the user's home alone, so the import happens with HOME (and
XDG_CACHE_HOME) set to a temporary directory that is removed at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from types import ModuleType
from typing import Any

import numpy as np
import pytest

_ORT: list[ModuleType] = []


def onnxruntime() -> ModuleType:
    """The onnxruntime module (the test is skipped without it), first imported under a temporary $HOME."""
    if not _ORT:
        home = tempfile.mkdtemp(prefix="cnnc-ort-home-")
        atexit.register(shutil.rmtree, home, True)
        saved = {k: os.environ.get(k) for k in ("HOME", "XDG_CACHE_HOME")}
        os.environ.update(HOME=home, XDG_CACHE_HOME=os.path.join(home, ".cache"))
        try:
            _ORT.append(pytest.importorskip("onnxruntime"))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return _ORT[0]


def run(model: Any, x: np.ndarray) -> np.ndarray:
    """Run an ONNX model (a ModelProto or a file path) on one input with onnxruntime's CPU provider."""
    ort = onnxruntime()
    source = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    session = ort.InferenceSession(str(source) if isinstance(source, os.PathLike) else source,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]
