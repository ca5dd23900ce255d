"""``Model.value_and_grad`` against the float64 numpy reference backward (tests/reference.py).

Central differences of the native float32 loss are too noisy to test against,
so the chain is: (1) the reference's own gradients agree with float64 central
finite differences on a tiny network that uses every op; (2) the native
gradients agree with the reference on whole networks, both losses.

Tolerance (float32 native vs float64 reference): loss value ``rtol 1e-5``;
gradients ``rtol 1e-4`` and ``atol 1e-5 * max|reference gradient of that parameter|``.
Against torch autograd: ``rtol 1e-4, atol 1e-6``.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.ir import execution_order
from tests.reference import (
    FILTERS,
    MLP,
    MLP_NO_DROPOUT,
    NETWORKS,
    RESNET,
    build,
    connect_mask,
    graph,
    random_params,
    reference_value_and_grad,
)

GRAD_RTOL = 1e-4
GRAD_ATOL_SCALE = 1e-5

# Every op, small enough for float64 finite differences of every parameter (no compile: reference only).
FD_NET = """
table pairs {
    0: 0 1
    1: 1 2
    2: 0 2
}
network fd {
    input x: 3x6x6
    a = x -> conv(3, 3x3, stride=2, pad=same, connect=pairs) -> leaky_relu(alpha=0.2)   # 3@3x3
    b = x -> conv(3, 2x2, pad=1, groups=3) -> sigmoid -> maxpool(3x3, stride=2)         # 3@3x3
    s = add(a, b) -> tanh                                                               # 3@3x3
    c = concat(s, a) -> avgpool(2x2, stride=1, pad=1) -> relu                           # 6@4x4
    g = c -> global_avgpool -> dense(4) -> dropout(0.5)
    h = c -> flatten -> dense(4)
    o = add(g, h) -> softmax
}
"""

DROPOUT_PROBE = """
network probe {
    input v: 64
    out = v -> dropout(0.5) -> dense(1)
}
"""

DROPOUT_ZERO = """
network p0 {
    input v: 12
    h = v -> dense(8) -> relu -> dropout(0.0) -> dense(3)
}
"""


def check_grads(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        atol = GRAD_ATOL_SCALE * max(float(np.abs(w).max()), 1e-12)
        np.testing.assert_allclose(got[name], w, rtol=GRAD_RTOL, atol=atol, err_msg=name)


def with_random_params(text: str, seed: int = 3):
    model = build(text)
    for k, v in random_params(graph(text), np.random.default_rng(seed)).items():
        model.params[k][...] = v
    return model


def inputs(model, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *model.input_shape)).astype(np.float32)


# ---- (1) the reference itself, by float64 finite differences --------------------------------


# The new ops by finite differences too: dilation (with stride, groups, a table), elu, gelu and silu.
FD_NEW_OPS = """
table two {
    0: 0 1
    1: 1
}
network fd_new {
    input x: 2x7x7
    a = x -> conv(2, 3x3, pad=same, dilation=2, connect=two) -> gelu      # 2@7x7
    b = a -> conv(4, 2x3, stride=2, pad=1, groups=2, dilation=3x2) -> silu  # 4@3x3
    o = b -> elu(alpha=0.7) -> flatten -> dense(4)
}
"""


def _fd_setup(text: str):
    g = graph(text)
    rng = np.random.default_rng(0)
    params = random_params(g, rng, scale=1.0)
    x = rng.standard_normal((2, *g.nodes[g.graph["input"]]["shape"]))
    drops = [n for n in execution_order(g) if g.nodes[n]["op"] == "dropout"]
    masks = {drop: rng.choice([0.0, 2.0], size=(2, *g.nodes[drop]["shape"])) for drop in drops}
    return g, params, x, masks


def _outside_table(g, params: dict, name: str) -> np.ndarray:
    """Per weight of parameter `name`: True where a connect table leaves it out."""
    layer, kind = name.rsplit(".", 1)
    connect = g.nodes[layer]["args"].get("connect")
    if kind != "weight" or connect is None:
        return np.zeros(params[name].size, bool)
    mask = connect_mask(connect, params[name].shape)[:, :, None, None]
    return np.broadcast_to(mask, params[name].shape).reshape(-1) == 0


@pytest.mark.parametrize("text", [FD_NET, FD_NEW_OPS], ids=["every_op", "new_ops"])
@pytest.mark.parametrize("loss, targets", [
    ("cross_entropy", np.array([1, 3])),
    ("mse", np.array([2, 0])),
    ("mse", np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1]])),
])
def test_reference_backward_matches_finite_differences(text: str, loss: str, targets: np.ndarray) -> None:
    g, params, x, masks = _fd_setup(text)
    _, grads = reference_value_and_grad(g, params, x, targets, loss, masks)
    eps = 1e-6
    rng = np.random.default_rng(1)
    for name, p in params.items():
        flat = p.reshape(-1)
        outside = _outside_table(g, params, name)
        picks = rng.choice(flat.size, size=min(flat.size, 25), replace=False)
        for i in picks:
            keep = flat[i]
            flat[i] = keep + eps
            up, _ = reference_value_and_grad(g, params, x, targets, loss, masks)
            flat[i] = keep - eps
            down, _ = reference_value_and_grad(g, params, x, targets, loss, masks)
            flat[i] = keep
            numeric = (up - down) / (2 * eps)
            if outside[i]:
                assert grads[name].reshape(-1)[i] == 0.0  # outside the table: no gradient
                continue
            assert abs(grads[name].reshape(-1)[i] - numeric) <= 1e-6 + 1e-5 * abs(numeric), (name, i)


# ---- (2) native value_and_grad against the reference -------------------------------------


# mlp's dropout masks are unknown to the reference (tested below); its twin without dropout stands in
GRAD_NETWORKS = {n: t for n, t in NETWORKS.items() if n != "mlp"} | {"mlp_no_dropout": MLP_NO_DROPOUT}


@pytest.mark.parametrize("name", GRAD_NETWORKS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_value_and_grad_matches_reference(name: str, loss: str) -> None:
    text = GRAD_NETWORKS[name]
    model = with_random_params(text)
    x = inputs(model, 4)
    k = model.manifest["loss_inputs"][loss]
    labels = np.array([0, k - 1, 1 % k, 2 % k])
    value, grads = model.value_and_grad(x, labels, loss=loss)
    want_value, want = reference_value_and_grad(graph(text), model.params, model.prepare(x), labels, loss)
    assert value == pytest.approx(want_value, rel=1e-5, abs=1e-6)
    check_grads(grads, want)


@pytest.mark.parametrize("name", ["resnet", "vgg"])
def test_mse_with_float_targets(name: str) -> None:
    text = NETWORKS[name]
    model = with_random_params(text)
    x = inputs(model, 3, seed=5)
    targets = np.random.default_rng(2).uniform(size=(3, *model.output_shape)).astype(np.float32)
    value, grads = model.value_and_grad(x, targets, loss="mse")
    want_value, want = reference_value_and_grad(graph(text), model.params, x, targets, "mse")
    assert value == pytest.approx(want_value, rel=1e-5)
    check_grads(grads, want)


def test_mse_integer_labels_are_one_hot() -> None:
    model = with_random_params(RESNET)
    x = inputs(model, 3)
    labels = np.array([4, 0, 2])
    onehot = np.eye(5, dtype=np.float32)[labels]
    v1, g1 = model.value_and_grad(x, labels, loss="mse")
    v2, g2 = model.value_and_grad(x, onehot, loss="mse")
    assert v1 == v2
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])


def test_default_loss_is_the_train_sections() -> None:
    model = build(NETWORKS["lenet5"])  # train { loss cross_entropy }
    x = inputs(model, 2)
    v1, _ = model.value_and_grad(x, np.array([3, 7]))
    v2, _ = model.value_and_grad(x, np.array([3, 7]), loss="cross_entropy")
    assert v1 == v2


def test_frozen_written_weights_get_zero_gradients() -> None:
    model = with_random_params(FILTERS)
    _, grads = model.value_and_grad(inputs(model, 2), np.array([0, 3]))
    assert not grads["edges.weight"].any() and not grads["grad.weight"].any()
    assert grads["out.1.weight"].any() and grads["out.2.weight"].any()


def test_connect_table_gradients_are_zero_outside_the_table() -> None:
    model = with_random_params(NETWORKS["lenet5"])
    _, grads = model.value_and_grad(inputs(model, 2), np.array([1, 2]))
    p = next(p for p in model.manifest["params"] if p["name"] == "c3.weight")
    mask = model.connect_mask(p)
    assert not grads["c3.weight"][mask == 0].any()
    assert (np.abs(grads["c3.weight"][mask == 1]).sum(axis=(1, 2)) > 0).all()


def test_gradients_do_not_depend_on_batch_chunking() -> None:
    """300 images run as two native chunks (256 + 44): the mean gradient is the same as the reference's."""
    model = with_random_params(NETWORKS["branches"])
    x = inputs(model, 300, seed=9)
    labels = np.random.default_rng(9).integers(0, 36, size=300)
    value, grads = model.value_and_grad(x, labels)
    want_value, want = reference_value_and_grad(graph(NETWORKS["branches"]), model.params, x, labels, "cross_entropy")
    assert value == pytest.approx(want_value, rel=1e-5)
    check_grads(grads, want)


# ---- dropout ---------------------------------------------------------------------------------


def test_dropout_zero_equals_no_dropout() -> None:
    model = with_random_params(DROPOUT_ZERO)
    x = inputs(model, 3)
    value, grads = model.value_and_grad(x, np.array([0, 1, 2]), seed=5)
    want_value, want = reference_value_and_grad(graph(DROPOUT_ZERO), model.params, x, np.array([0, 1, 2]))
    assert value == pytest.approx(want_value, rel=1e-5)
    check_grads(grads, want)


def test_dropout_gradient_is_consistent_with_its_mask() -> None:
    """Recover the mask of one image from a gradient, then check the whole value_and_grad with that mask."""
    model = build(DROPOUT_PROBE)
    g = graph(DROPOUT_PROBE)
    drop = next(n for n in execution_order(g) if g.nodes[n]["op"] == "dropout")
    x = np.random.default_rng(4).uniform(0.5, 1.5, size=(1, 64)).astype(np.float32)
    model.params["out.weight"][...] = 0.0
    model.params["out.bias"][...] = 0.0
    # output 0, target 1: d(loss)/d(out) = -2, so d(loss)/d(w) = -2 * x * mask
    _, grads = model.value_and_grad(x, np.ones((1, 1), np.float32), loss="mse", seed=17)
    mask = grads["out.weight"][0] / (-2.0 * x[0])
    assert np.allclose(mask[np.abs(mask) > 0.5], 2.0, rtol=1e-6)
    assert np.allclose(mask[np.abs(mask) <= 0.5], 0.0, atol=1e-7)
    mask = np.where(mask > 1.0, 2.0, 0.0)
    assert 10 <= (mask == 0).sum() <= 54  # p = 0.5 of 64
    model.params["out.weight"][...] = np.random.default_rng(5).standard_normal((1, 64))
    model.params["out.bias"][...] = 0.3
    t = np.array([[0.7]], np.float32)
    value, grads = model.value_and_grad(x, t, loss="mse", seed=17)
    want_value, want = reference_value_and_grad(g, model.params, x, t, "mse", masks={drop: mask[None]})
    assert value == pytest.approx(want_value, rel=1e-5)
    check_grads(grads, want)


def test_dropout_masks_differ_between_images_and_chunks() -> None:
    """Image 256 is the first of the second native chunk: it must not reuse image 0's mask."""
    model = build(DROPOUT_PROBE)
    model.params["out.weight"][...] = 0.0
    model.params["out.bias"][...] = 0.0

    def mask_of(index: int, n: int) -> np.ndarray:
        x = np.zeros((n, 64), np.float32)
        x[index] = 1.0  # only this image reaches the weight gradient
        _, grads = model.value_and_grad(x, np.ones((n, 1), np.float32), loss="mse", seed=23)
        return np.round(grads["out.weight"][0] / (-2.0 / n), 4)  # d(loss)/d(out) = -2/n for every image

    masks = [mask_of(0, 1), mask_of(1, 2), mask_of(256, 257), mask_of(257, 300)]
    for m in masks:
        assert set(np.unique(m)) <= {0.0, 2.0}
    np.testing.assert_array_equal(mask_of(0, 300), masks[0])  # image 0's mask does not depend on the batch
    for i in range(len(masks)):
        for j in range(i):
            assert not np.array_equal(masks[i], masks[j]), (i, j)


def test_dropout_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    model = with_random_params(MLP)
    x = inputs(model, 4)
    labels = np.array([1, 2, 3, 4])
    v1, g1 = model.value_and_grad(x, labels, seed=1)
    v2, g2 = model.value_and_grad(x, labels, seed=1)
    v3, g3 = model.value_and_grad(x, labels, seed=2)
    assert v1 == v2
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])
    assert v1 != v3
    assert not np.array_equal(g1["h1.weight"], g3["h1.weight"])
    # with dropout on, the loss differs from the inference network's (dropout off)
    _, want = reference_value_and_grad(graph(MLP), model.params, x, labels)
    assert not np.allclose(g1["h1.weight"], want["h1.weight"], rtol=1e-3)


# ---- torch autograd ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet5", "resnet", "smooth", "dilated"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_matches_torch_autograd(name: str, loss: str) -> None:
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F  # noqa: N812

    from tests.reference import torch_forward

    text = NETWORKS[name]
    model = with_random_params(text, seed=8)
    x = inputs(model, 3, seed=8)
    labels = np.array([2, 0, 4])
    value, grads = model.value_and_grad(x, labels, loss=loss)

    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    xp = model.prepare(x)  # the network's input: lenet5's file normalizes it
    z = torch_forward(graph(text), params, torch.from_numpy(xp.astype(np.float64)), loss=loss).reshape(3, -1)
    t = torch.from_numpy(labels)
    want = F.cross_entropy(z, t) if loss == "cross_entropy" else F.mse_loss(z, F.one_hot(t, z.shape[1]).double())
    want.backward()
    assert value == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    for k, p in params.items():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
