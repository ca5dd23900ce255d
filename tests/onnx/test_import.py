"""Import: PyTorch's exports (both exporters) compile in cnnc, run as PyTorch does and train as it does."""

from __future__ import annotations

import numpy as np
import pytest

import cnnc
from cnnc.errors import CnnError
from cnnc.onnx.import_ import import_file
from tests.onnx import torchnets

pytest.importorskip("onnx")
torch = torchnets.torch
EXPORTERS = {"torchscript": False, "dynamo": True}
# the dynamo exporter takes seconds per network: its runs are in the slow suite
BOTH = [pytest.param("torchscript"), pytest.param("dynamo", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torch-onnx")
    cache = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            cache[name, exporter] = torchnets.export(name, EXPORTERS[exporter], folder)
        return cache[name, exporter]
    return get


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("exporter", BOTH)
@pytest.mark.parametrize("name", ["patterns", "trainable", "global_mean", "normalized"])
def test_pytorch_export_compiles_and_computes_what_pytorch_does(exported, name, exporter):
    model = cnnc.compile(exported(name, exporter))
    x = np.random.default_rng(1).standard_normal((5, *torchnets.NETS[name][1]), dtype=np.float32)
    assert relative_error(model(x), torchnets.forward(name, x)) < 1e-5


def test_patterns_become_the_layers_a_person_would_write(exported):
    text = import_file(exported("patterns", "torchscript")).text
    assert "conv2 = conv1 -> conv(8, 3, pad=2, groups=2, dilation=2) -> silu" in text
    assert "-> gelu -> tanh" in text and "global_avgpool -> elu" in text
    assert "fc = " in text and "dense(10)" in text


@pytest.mark.slow
def test_dynamo_export_with_external_data_keeps_pytorchs_parameter_names(exported):
    path = exported("patterns", "dynamo")
    assert path.with_name(path.name + ".data").exists()
    assert set(import_file(path).weights) >= {"conv1.weight", "conv2.weight", "fc.weight", "fc.bias"}


@pytest.mark.parametrize("exporter", BOTH)
def test_one_training_step_equals_pytorchs(exported, exporter):
    model = cnnc.compile(exported("trainable", exporter))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 1, 10, 10), dtype=np.float32)
    y = rng.integers(0, 5, 8)
    net, _ = torchnets.make("trainable")
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.fit(x, y, epochs=1, batch=8, loss="cross_entropy", optimizer="sgd", lr=0.5, progress=False)
    after = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    assert relative_error(model.params["conv1.weight"], after["conv1.weight"]) < 1e-5
    assert relative_error(model.params["conv2.bias"], after["conv2.bias"]) < 1e-5
    dense = next(k for k in model.params if k.endswith(".weight") and model.params[k].shape == (8, 24))
    assert relative_error(model.params[dense], after["w"].T) < 1e-5
    assert relative_error(model.params["fc.weight"], after["fc.weight"]) < 1e-5


@pytest.mark.parametrize("exporter", BOTH)
def test_batch_norm_is_imported_trainable_and_trains_as_pytorchs(exported, exporter):
    path = exported("normalized", exporter)
    assert "-> batchnorm(momentum=0.2)" in import_file(path).text
    model = cnnc.compile(path)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 1, 10, 10), dtype=np.float32)
    y = rng.integers(0, 3, 8)
    net, _ = torchnets.make("normalized")
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.fit(x, y, epochs=1, batch=8, loss="cross_entropy", optimizer="sgd", lr=0.3, progress=False)
    after = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    state = model.state()
    for torch_name, weights in (("conv", "conv_"), ("bn2d", "bn2d"), ("bn1d", "bn1d"), ("fc1", "fc1")):
        for kind in ("weight", "bias") + (("running_mean", "running_var") if torch_name.startswith("bn") else ()):
            assert relative_error(state[f"{weights}.{kind}"], after[f"{torch_name}.{kind}"]) < 1e-5, (weights, kind)


@pytest.mark.parametrize("exporter", BOTH)
def test_an_op_cnnc_lacks_is_refused_naming_the_node(exported, exporter):
    with pytest.raises(CnnError, match=r"node '[^']+' \(Resize\): not supported by cnnc"):
        import_file(exported("upsample", exporter))
