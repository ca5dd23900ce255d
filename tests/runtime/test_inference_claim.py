"""A network of one direct convolution on several threads (``infer_claim``): images, and bands of the last ones,
taken from a counter by whichever thread is free, with the bits of one thread's pass.

Tolerance against the float64 reference (``cnnc.reference``): 1e-5 of the largest output magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.reference import reference_forward
from tests.reference import graph
from tests.runtime.test_batchnorm import assert_close, batch, everything, model, randomize

# rows of 16 outputs: whole vectors at every width (5 input channels: too few for Winograd), 24 rows: bands of
# whole tiles; 12 x 24 x 16 outputs an image, more than the arena takes before a copy out (SMALL_OUTPUT)
ONE_CONV = """
network one_conv {
    input image: 5x24x16
    y = image -> conv(12, 3x3, pad=1)
}
"""
# at inference the batchnorm is folded into the conv and the relu fused into its store: still one kernel
FOLDED = """
network folded {
    input image: 5x24x16
    y = image -> conv(12, 3x3, pad=1, bias=false) as c -> batchnorm as bn -> relu
}
"""
TWO_CONVS = """
network two_convs {
    input image: 5x24x16
    y = image -> conv(12, 3x3, pad=1) -> relu -> conv(4, 3x3, pad=1)
}
"""


@pytest.mark.parametrize("text", [ONE_CONV, FOLDED])
def test_one_convolution_on_two_threads_gives_one_threads_bits(text):
    one, two = model(text, threads=1), model(text, threads=2)
    assert two.manifest["infer_claim"] and two._infer_claim is not None
    randomize(one)
    two.flat_params[...] = one.flat_params
    two.flat_state[...] = one.flat_state
    for n in (8, 9, 37, 300):  # the last two images in bands; 300: more than a chunk
        x, _ = batch(one, n)
        got = two(x)
        np.testing.assert_array_equal(got, one(x))
        assert_close(got, reference_forward(graph(text), everything(one), x), 1e-5)
        out = np.full_like(got, np.nan)
        np.testing.assert_array_equal(two.infer_into(x, out), got)


def test_a_network_of_more_than_one_kernel_splits_by_images():
    m = model(TWO_CONVS, threads=2)
    assert m.manifest["infer_claim"] is False and m._infer_claim is None
