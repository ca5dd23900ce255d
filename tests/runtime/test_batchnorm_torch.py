"""Batchnorm on feature maps and on vectors against PyTorch's ``batch_norm`` (float64), on one and two threads.

Tolerances (relative to each tensor's largest magnitude): losses and outputs 1e-4, gradients 1e-3, running
statistics after several steps 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference import graph, torch_forward
from tests.runtime.test_batchnorm import MAPS, RESIDUAL, VECTORS, assert_close, batch, model, randomize

torch = pytest.importorskip("torch")
F = torch.nn.functional
STEPS, LR = 4, 0.05


def torch_state(m) -> dict:
    """The model's parameters (leaf tensors that require grad) and buffers, as float64 torch tensors."""
    out = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in m.params.items()}
    out.update({k: torch.tensor(v, dtype=torch.float64) for k, v in m.buffers.items()})
    return out


def torch_step(g, state: dict, x: np.ndarray, y: np.ndarray, names) -> tuple[float, np.ndarray, dict]:
    """(loss, the loss's input (training-mode logits), gradients) of one training-mode forward and backward."""
    z = torch_forward(g, state, torch.from_numpy(x.astype(np.float64)), loss="cross_entropy", training=True)
    z = z.reshape(len(x), -1)
    loss = F.cross_entropy(z, torch.from_numpy(y))
    for name in names:
        state[name].grad = None
    loss.backward()
    return float(loss.detach()), z.detach().numpy(), {name: state[name].grad.numpy().copy() for name in names}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("text", [MAPS, VECTORS, RESIDUAL], ids=["maps", "vectors", "residual"])
def test_training_steps_and_inference_match_pytorch(text, threads):
    g = graph(text)
    m = model(text, threads=threads)
    randomize(m)
    ts = torch_state(m)
    for step in range(STEPS):
        x, y = batch(m, 40, seed=step)
        logits = np.empty((40, m.output_shape[0]), dtype=np.float32)
        loss = m.gradients(m.prepare(x), m.check_targets(y, 40, "cross_entropy"), "cross_entropy", out=logits)
        grads = {name: g.copy() for name, g in m.grads.items()}
        want_loss, want_logits, want = torch_step(g, ts, x, y, m.params)
        assert loss == pytest.approx(want_loss, rel=1e-4)
        assert_close(logits, want_logits, 1e-4)  # the training-mode forward (batch statistics)
        for name in m.params:
            assert_close(grads[name], want[name], 1e-3)
        for name, v in m.params.items():  # the same plain SGD step in both, from each side's own gradient
            v -= LR * grads[name]
            with torch.no_grad():
                ts[name] -= LR * ts[name].grad
    for name, v in m.buffers.items():
        assert_close(v, ts[name].numpy(), 1e-4)
    x, _ = batch(m, 16, seed=99)
    with torch.no_grad():
        want = torch_forward(g, ts, torch.from_numpy(x.astype(np.float64))).numpy()
    assert_close(m(x), want, 1e-4)


def test_a_saved_file_loads_into_pytorch_modules_of_the_same_names(tmp_path):
    """The .npz keys are PyTorch's state_dict names: load_state_dict(strict=True) takes the file as it is."""
    nn = torch.nn
    m = model(MAPS)
    randomize(m)
    x, y = batch(m, 8)
    m.value_and_grad(x, y)
    m.save(tmp_path / "w.npz")
    layers = nn.ModuleDict({
        "conv1": nn.Conv2d(3, 4, 3, padding=1), "bn1": nn.BatchNorm2d(4),
        "bn2": nn.BatchNorm2d(4, momentum=0.3, eps=0.001), "conv2": nn.Conv2d(4, 5, 1, bias=False),
        "bn4": nn.BatchNorm2d(5), "fc1": nn.Linear(80, 6), "bn3": nn.BatchNorm1d(6), "fc2": nn.Linear(6, 3)})
    with np.load(tmp_path / "w.npz") as f:
        layers.load_state_dict({k: torch.from_numpy(f[k]) for k in f.files}, strict=True)
    assert int(layers["bn1"].num_batches_tracked) == 1
    layers.eval()
    with torch.no_grad():
        h = torch.relu(layers["bn1"](layers["conv1"](torch.from_numpy(x))))
        p = layers["bn2"](F.max_pool2d(h, 2))
        r = torch.relu(p + p)
        c2 = torch.relu(layers["bn4"](layers["conv2"](r)))
        f = torch.tanh(layers["bn3"](layers["fc1"](c2.flatten(1))))
        want = layers["fc2"](f).numpy()
    assert_close(m(x), want, 1e-4)
