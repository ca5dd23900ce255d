"""The native batch gather against ``Inputs.batch`` (the input rule in numpy), bit for bit, at every vector width."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.codegen.gather import emit_gather
from cnnc.codegen.specs import GatherSpec
from cnnc_runtime.inputs import Inputs

GARBAGE = np.float32(-7777.0)

# (stored images, input shape, normalize)
CASES = {
    "mnist_padded": (lambda r: r.integers(0, 256, (9, 28, 28), dtype=np.uint8), (1, 32, 32),
                     {"mean": 0.1307, "std": 0.3081}),
    "channels_last": (lambda r: r.integers(0, 256, (9, 5, 7, 3), dtype=np.uint8), (3, 9, 10),
                      {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}),
    "float_direct": (lambda r: r.standard_normal((9, 3, 6, 7), dtype=np.float32), (3, 6, 7), None),
    "float_padded": (lambda r: r.standard_normal((9, 1, 5, 6), dtype=np.float32), (1, 7, 9),
                     {"mean": -0.5, "std": 3.0}),
    "flat_bytes": (lambda r: r.integers(0, 256, (9, 4, 5), dtype=np.uint8), (20,), {"mean": 0.3, "std": 0.7}),
}


def gather_native(jit, inputs: Inputs, rows: np.ndarray, n0: int, n1: int) -> np.ndarray:
    shape = inputs.input_shape
    c, h, w = shape if len(shape) == 3 else (1, 1, shape[0])
    byte, stored, geometry, norm = inputs.layout()
    emit_gather(jit.module, "gather", GatherSpec(c, h, w, byte), jit.vw)
    out = np.full((len(rows), *shape), GARBAGE, np.float32)
    # (the stored set may be a strided view, e.g. channels-last: its address, read through geometry's strides)
    jit("gather", stored.ctypes.data, np.ascontiguousarray(rows, np.int64), out, geometry, norm, n0, n1)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_gather_gives_the_bits_of_the_numpy_rule(jit, case):
    make, shape, normalize = CASES[case]
    inputs = Inputs(make(np.random.default_rng(0)), shape, normalize)
    rows = np.array([4, 0, 8, 4, 2, 7], np.int64)  # any order, repeats allowed
    got = gather_native(jit, inputs, inputs.stored_rows(rows, np.empty(len(rows), np.int64)), 1, 5)
    want = inputs.batch(rows, np.empty((len(rows), *shape), np.float32))
    assert np.array_equal(got[1:5].view(np.uint32), want[1:5].view(np.uint32))
    assert (got[[0, 5]] == GARBAGE).all(), "wrote outside images [n0, n1)"


def test_gather_reads_a_subset_through_its_rows(jit):
    make, shape, normalize = CASES["mnist_padded"]
    inputs = Inputs(make(np.random.default_rng(1)), shape, normalize).subset(np.array([8, 6, 1, 3]))
    idx = np.array([3, 1, 0], np.int64)
    rows = inputs.stored_rows(idx, np.empty(3, np.int64))
    assert rows.tolist() == [3, 6, 8]
    got = gather_native(jit, inputs, rows, 0, 3)
    assert np.array_equal(got, inputs.batch(idx, np.empty((3, *shape), np.float32)))
