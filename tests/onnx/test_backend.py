"""ONNX's own backend tests (``onnx.backend.test.BackendTest``) run through cnnc's compiled kernels.

``PASS`` lists the node tests of the ops cnnc has that run here; ``EXCLUDED``
names the others of those ops with the reason (the README's table). An
excluded test's model must still be refused with a clear ``CnnError``.
"""

from __future__ import annotations

import re
import warnings

import pytest

onnx = pytest.importorskip("onnx")

from onnx.backend.test import BackendTest  # noqa: E402 - (after the skip: onnx is an optional extra)
from onnx.backend.test.loader import load_model_tests  # noqa: E402

from cnnc.errors import CnnError  # noqa: E402
from cnnc.onnx import backend  # noqa: E402

PASS = """
    conv_with_autopad_same conv_with_strides_and_asymmetric_padding conv_with_strides_no_padding
    conv_with_strides_padding
    averagepool_2d_default averagepool_2d_precomputed_pads_count_include_pad averagepool_2d_precomputed_strides
    averagepool_2d_strides
    maxpool_2d_default maxpool_2d_precomputed_pads maxpool_2d_precomputed_same_upper maxpool_2d_precomputed_strides
    maxpool_2d_same_upper maxpool_2d_strides
    globalaveragepool globalaveragepool_precomputed
    gemm_alpha gemm_beta gemm_default_no_bias gemm_default_scalar_bias gemm_default_single_elem_vector_bias
    gemm_default_vector_bias gemm_default_zero_bias gemm_transposeB
    relu sigmoid sigmoid_example tanh tanh_example leakyrelu leakyrelu_default leakyrelu_example
    elu elu_default elu_example gelu_default_1 gelu_default_2
    softmax_example softmax_large_number
    flatten_axis1 flatten_default_axis flatten_negative_axis3
    dropout_default dropout_default_old dropout_random_old
    batchnorm_epsilon batchnorm_example
""".split()

# one or two of each op in the quick suite (each test compiles a network: ~0.5 s); all of them with -m slow
QUICK = """
    conv_with_strides_padding conv_with_autopad_same averagepool_2d_precomputed_pads_count_include_pad
    maxpool_2d_precomputed_same_upper globalaveragepool gemm_alpha gemm_default_vector_bias relu leakyrelu elu
    gelu_default_2 sigmoid tanh softmax_example flatten_axis1 dropout_default batchnorm_example
""".split()

ONE_INPUT = "two data inputs; a cnnc network has one input"
NOT_2D = "1-D or 3-D windows; cnnc's conv and pooling are 2-D"
EXCLUDED = {
    r"averagepool_2d_ceil.*|maxpool_2d_ceil.*": "ceil_mode=1 where it changes the output size",
    r"averagepool_2d_dilations|maxpool_2d_dilations": "dilated pooling",
    r"averagepool_2d_pads.*|maxpool_2d_pads": "padding larger than half the window",
    r"averagepool_2d_precomputed_pads|averagepool_2d_(precomputed_)?same_upper": "count_include_pad=0 with padding",
    r"averagepool_2d_same_lower|maxpool_2d_same_lower": "SAME_LOWER padding (cnnc's 'same' pads the end)",
    r"(averagepool|maxpool)_(1d|3d).*|convtranspose_(1d|3d)": NOT_2D,
    r"maxpool_2d_uint8|convinteger_.*|add_u?int.*": "integer tensors; cnnc computes in float32",
    r"maxpool_with_argmax_.*": "the indices output of MaxPool",
    r"convtranspose.*": "ConvTranspose (no such layer in cnnc)",
    r"batchnorm_.*_training_mode": "training_mode=1",
    r"gemm_all_attributes|gemm_transposeA": "transA=1",
    r"gemm_default_matrix_bias": "a bias per sample (a matrix C)",
    r"add|add_bcast|sum_.*|concat_2d_.*": ONE_INPUT,
    r"concat_(1d|3d)_.*": "concat of 1-D or 3-D tensors along other axes than the channels",
    r"softmax_(axis_\d|default_axis|negative_axis)": "softmax of a 3-D tensor over other axes than the channels",
    r"flatten_axis[023]|flatten_negative_axis[124]": "flatten at another axis than 1",
    r"gelu_tanh_.*": "the tanh approximation of GELU (cnnc's gelu is exact)",
    r"dropout_default_mask.*|dropout_default_ratio": "Dropout's mask output, or a ratio given as a graph input",
    r"identity": "a graph with no layer (the output is the input)",
    r"identity_opt|identity_sequence": "optional and sequence types",
    r"reduce_mean_.*": "a mean over other axes than the spatial ones",
    r".*_expanded.*": "function bodies with ops cnnc does not have (Where, CastLike, Greater, ...)",
}
OPS = r"conv|maxpool|averagepool|globalaveragepool|gemm|relu|leakyrelu|elu|gelu|tanh|sigmoid|softmax|add|sum|" \
      r"concat|flatten|dropout|identity|batchnorm|reduce_mean"

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # (ONNX generates some of its cases by dividing by zero on purpose)
    backend_test = BackendTest(backend, __name__)
    NODE_TESTS = {t.name[5:]: t for t in load_model_tests(kind="node") if re.match(rf"test_({OPS})", t.name)}
# Only the listed tests become test methods (the thousands of others would show as skips). BackendTest has no
# public way to leave tests out rather than skip them, hence its private table.
wanted = {f"test_{name}_cpu" for name in PASS}
backend_test._test_items = {category: {n: item for n, item in items.items() if n in wanted}
                            for category, items in backend_test._test_items.items()}
for items in backend_test._test_items.values():
    for n, item in items.items():
        if n[5:-4] not in QUICK:
            item.func = pytest.mark.slow(item.func)
globals().update({k: v for k, v in backend_test.test_cases.items() if any(n.startswith("test_") for n in vars(v))})


def test_every_node_test_of_these_ops_passes_or_is_excluded_with_a_reason():
    names = set(NODE_TESTS)
    excluded = {n for n in names if any(re.fullmatch(p, n) for p in EXCLUDED)}
    assert set(QUICK) <= set(PASS) <= names
    assert not set(PASS) & excluded
    assert names - set(PASS) - excluded == set()


def test_excluded_models_are_refused_with_a_clear_error():
    for name, case in sorted(NODE_TESTS.items()):
        if name not in PASS:
            with pytest.raises(CnnError):
                backend.prepare(case.model)
