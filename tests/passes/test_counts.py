"""Parameter and MAC counts against published numbers, hand arithmetic and (when installed) PyTorch.

MACs are the multiply-accumulates for one image: conv
``out * OH * OW * (in / groups) * kh * kw``, dense ``in * out``; a ``connect``
table counts only its connections; weights written in the file are frozen.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from benchmarks.torch_nets import torch_resnet20 as resnet20_of
from cnnc.errors import Diagnostics
from cnnc.passes import counts, shapes
from cnnc.pipeline import check_source
from cnnc.summary import as_json

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def check(source: str):
    diag = Diagnostics()
    g = check_source(source, "t.cnn", diag)
    assert diag.render() == []
    return g


def totals(source: str) -> dict:
    return check(source).graph["totals"]


LENET5 = (EXAMPLES / "lenet5.cnn").read_text()

CAFFE_LENET = """
network caffe_lenet {
    input data: 1x28x28
    conv1 = data -> conv(20, 5x5)
    pool1 = conv1 -> maxpool(2x2, stride=2)
    conv2 = pool1 -> conv(50, 5x5)
    pool2 = conv2 -> maxpool(2x2, stride=2)
    ip1   = pool2 -> flatten -> dense(500) -> relu
    ip2   = ip1 -> dense(10)
}
"""

VGG16 = """
block two(c) {
    input x
    y = x -> (conv(c, 3x3, pad=1) -> relu) * 2 -> maxpool(2x2)
}
block three(c) {
    input x
    y = x -> (conv(c, 3x3, pad=1) -> relu) * 3 -> maxpool(2x2)
}
network vgg16 {
    input image: 3x224x224
    features = image -> two(64) -> two(128) -> three(256) -> three(512) -> three(512)
    classifier = features -> flatten -> dense(4096) -> relu -> dense(4096) -> relu -> dense(1000)
}
"""


# ---- published parameter counts -----------------------------------------------

def test_lenet5_with_the_c3_table():
    t = totals(LENET5)
    assert t["total_params"] == 60_806
    assert t["trainable_params"] == 60_806
    assert t["non_trainable_params"] == 0


def test_lenet5_c3_layer():
    g = check(LENET5)
    assert g.nodes["c3"]["param_count"] == 60 * 25 + 16 == 1_516
    assert g.nodes["c3"]["params"] == {"weight": (16, 6, 5, 5), "bias": (16,)}  # full shape for exchange


def test_lenet5_without_the_table():
    source = LENET5.replace(", connect=lenet_c3", "")
    source = source[:source.index("# Output map")] + source[source.index("train {"):]
    g = check(source)
    assert g.nodes["c3"]["param_count"] == 16 * 6 * 25 + 16 == 2_416
    assert g.graph["totals"]["total_params"] == 61_706


def test_lenet5_per_layer():
    counts = {layer["name"]: layer["params"] for layer in as_json(check(LENET5))["layers"]}
    assert {n: c for n, c in counts.items() if c} == {
        "c1": 6 * 25 + 6, "c3": 1_516, "c5": 120 * 16 * 25 + 120, "f6": 84 * 120 + 84, "logits": 10 * 84 + 10,
    }


def test_caffe_mnist_lenet():
    g = check(CAFFE_LENET)
    assert g.graph["totals"]["total_params"] == 431_080  # 520 + 25,050 + 400,500 + 5,010
    assert g.nodes["pool2"]["shape"] == (50, 4, 4)


def test_vgg16():
    g = check(VGG16)
    t = g.graph["totals"]
    assert t["total_params"] == 138_357_544
    assert t["trainable_params"] == 138_357_544
    assert g.nodes["classifier.flatten"]["shape"] == (512 * 7 * 7,)
    convs = [n for n in g.nodes if g.nodes[n]["op"] == "conv"]
    assert len(convs) == 13
    assert sum(g.nodes[n]["op"] == "maxpool" for n in g.nodes) == 5
    # 15.47 GMACs: the usual figure for VGG-16 (conv 15,346,630,656 + dense 123,633,664)
    assert t["total_macs"] == 15_470_264_320


def test_pointwise_conv_256_to_64():
    g = check("network n {\n    input x: 256x14x14\n    y = x -> conv(64, 1x1)\n}\n")
    assert g.nodes["y"]["param_count"] == 16_448  # 256 * 64 + 64
    assert g.nodes["y"]["macs"] == 64 * 14 * 14 * 256


def test_dense_10000_to_10000():
    g = check("network n {\n    input x: 1x100x100\n    y = x -> flatten -> dense(10000)\n}\n")
    assert g.nodes["y"]["param_count"] == 100_010_000
    assert g.nodes["y"]["macs"] == 100_000_000


# ---- MACs by hand -------------------------------------------------------------

@pytest.mark.parametrize("input_shape, layer, params, macs", [
    ("1x32x32", "conv(6, 5x5)", 6 * 25 + 6, 6 * 28 * 28 * 1 * 5 * 5),                      # 117,600
    ("6x14x14", "conv(16, 5x5)", 16 * 6 * 25 + 16, 16 * 10 * 10 * 6 * 5 * 5),              # 240,000
    ("3x32x32", "conv(8, 3, stride=2, pad=1)", 8 * 3 * 9 + 8, 8 * 16 * 16 * 3 * 9),
    ("4x8x8", "conv(8, 3, groups=4)", 8 * 1 * 9 + 8, 8 * 6 * 6 * 1 * 9),                   # in/groups = 1
    ("4x8x8", "conv(8, 3, groups=2, bias=false)", 8 * 2 * 9, 8 * 6 * 6 * 2 * 9),
    ("3x10x12", "conv(5, 3x1, pad=1x0)", 5 * 3 * 3 + 5, 5 * 10 * 12 * 3 * 3),
    ("3x10x10", "conv(4, 3, dilation=2)", 4 * 3 * 9 + 4, 4 * 6 * 6 * 3 * 9),               # same weights, 6x6 out
    ("4x11x11", "conv(4, 3x2, groups=2, dilation=2x3, pad=1)", 4 * 2 * 6 + 4, 4 * 9 * 10 * 2 * 6),
    ("120", "dense(84)", 120 * 84 + 84, 120 * 84),                                           # 10,080
    ("784", "dense(10, bias=false)", 7_840, 7_840),
])
def test_macs_by_hand(input_shape, layer, params, macs):
    g = check(f"network n {{\n    input x: {input_shape}\n    y = x -> {layer}\n}}\n")
    assert g.nodes["y"]["param_count"] == params
    assert g.nodes["y"]["macs"] == macs


def test_macs_of_layers_without_weights_are_zero():
    g = check("network n {\n    input x: 2x8x8\n    y = x -> relu -> maxpool(2) -> avgpool(2) -> global_avgpool -> "
              "softmax -> dropout(0.1) -> flatten -> sigmoid -> tanh -> leaky_relu\n}\n")
    assert all(g.nodes[n]["macs"] == 0 and g.nodes[n]["param_count"] == 0 for n in g.nodes)


def test_connect_table_counts_only_its_connections():
    g = check(LENET5)
    assert g.nodes["c3"]["macs"] == 60 * 5 * 5 * 10 * 10 == 150_000
    assert g.nodes["c1"]["macs"] == 117_600
    assert g.graph["totals"]["total_macs"] == 117_600 + 150_000 + 48_000 + 10_080 + 840


def test_small_table():
    g = check("network n {\n    input x: 3x6x6\n    y = x -> conv(2, 3, connect=t, bias=false)\n}\n"
              "table t {\n    0: 0\n    1: 1 2\n}\n")
    assert g.nodes["y"]["param_count"] == 3 * 9
    assert g.nodes["y"]["macs"] == 3 * 9 * 4 * 4


def test_totals_add_up():
    g = check(CAFFE_LENET)
    t = g.graph["totals"]
    assert t["total_params"] == sum(g.nodes[n]["param_count"] for n in g.nodes)
    assert t["total_macs"] == sum(g.nodes[n]["macs"] for n in g.nodes)
    assert t["param_bytes"] == 4 * t["total_params"]
    j = as_json(g)
    assert j["total_params"] == 431_080
    assert j["total_macs"] == 20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10


# ---- written weights are frozen -------------------------------------------------

def test_written_weights_are_not_trainable():
    g = check((EXAMPLES / "filters.cnn").read_text())
    t = g.graph["totals"]
    assert t["total_params"] == 6 * 9
    assert t["trainable_params"] == 0
    assert t["non_trainable_params"] == 54
    for layer in as_json(g)["layers"]:
        if layer["op"] == "conv":
            assert layer["trainable"] is False and layer["params"] == 9


def test_written_weights_next_to_trained_layers():
    g = check("network n {\n    input x: 1x8x8\n"
              "    e = x -> conv(1, 3, weights=[[0, 1, 0], [1, -4, 1], [0, 1, 0]])\n"
              "    y = e -> flatten -> dense(10)\n}\n")
    t = g.graph["totals"]
    assert g.nodes["e"]["param_count"] == 10  # 9 weights + 1 bias, all frozen
    assert t["non_trainable_params"] == 10
    assert t["trainable_params"] == 36 * 10 + 10
    assert t["total_params"] == 380


# ---- enormous sizes -------------------------------------------------------------

@pytest.fixture
def no_memory_limit(monkeypatch):
    """Sizes no machine holds (refused by `check`: see test_shapes.py), to check that counts are exact ints."""
    monkeypatch.setattr(shapes, "MAX_TENSOR", 10**30)
    monkeypatch.setattr(counts, "physical_memory", lambda: None)


def test_enormous_sizes_are_counted_exactly_and_quickly(no_memory_limit):
    start = time.perf_counter()
    g = check("network n {\n    input x: 1x100000x100000\n"
              "    y = x -> conv(8, 3, pad=1) -> maxpool(2) -> flatten -> dense(10)\n}\n")
    assert time.perf_counter() - start < 2
    assert g.nodes["y.1"]["macs"] == 8 * 100_000 * 100_000 * 9 == 720_000_000_000
    assert g.nodes["y.2"]["param_count"] == 8 * 50_000 * 50_000 * 10 + 10 == 200_000_000_010
    t = g.graph["totals"]
    assert t["total_params"] == 80 + 200_000_000_010
    assert t["total_macs"] == 720_000_000_000 + 200_000_000_000
    assert t["activation_floats"] == 10**10 + 8 * 10**10 + 2 * 2 * 10**10 + 10


def test_enormous_dense(no_memory_limit):
    g = check("network n {\n    input x: 1000000000\n    y = x -> dense(1000000000)\n}\n")
    assert g.nodes["y"]["param_count"] == 10**18 + 10**9


# ---- PyTorch as an oracle -------------------------------------------------------

def torch_networks():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def vgg_block(cin, cout, n):
        layers = []
        for i in range(n):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU()]
        return layers + [nn.MaxPool2d(2)]

    with torch.device("meta"):
        vgg16 = nn.Sequential(
            *vgg_block(3, 64, 2), *vgg_block(64, 128, 2), *vgg_block(128, 256, 3), *vgg_block(256, 512, 3),
            *vgg_block(512, 512, 3), nn.Flatten(),
            nn.Linear(25088, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))
        caffe = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2),
                              nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
        cifar = nn.Sequential(*vgg_block(3, 32, 2), *vgg_block(32, 64, 2), nn.Flatten(),
                              nn.Linear(4096, 256), nn.ReLU(), nn.Linear(256, 10))
        mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 256), nn.ReLU(),
                            nn.Dropout(0.2), nn.Linear(256, 10))
        dilated = nn.Sequential(nn.Conv2d(2, 4, 3, padding=2, dilation=2), nn.ELU(),
                                nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(2, 3), groups=2), nn.GELU(),
                                nn.Flatten(), nn.Linear(6 * 5 * 6, 3), nn.SiLU())
        grouped = nn.Sequential(nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(1, 2), groups=2), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(8, 3))
    return torch, [
        ("vgg16", VGG16, vgg16, (3, 224, 224)),
        ("caffe", CAFFE_LENET, caffe, (1, 28, 28)),
        ("cifar_small", (EXAMPLES / "cifar_small.cnn").read_text(), cifar, (3, 32, 32)),
        ("mlp", (EXAMPLES / "mlp.cnn").read_text(), mlp, (784,)),
        ("grouped", "network g {\n    input x: 4x9x11\n    y = x -> conv(8, 3x5, stride=2x1, pad=1x2, groups=2) "
                    "-> relu -> conv(8, 3, groups=8, bias=false) -> global_avgpool -> dense(3)\n}\n",
         grouped, (4, 9, 11)),
        ("dilated", "network d {\n    input x: 2x11x12\n    y = x -> conv(4, 3, pad=2, dilation=2) -> elu "
                    "-> conv(6, 3x2, stride=2, pad=1, dilation=2x3, groups=2) -> gelu -> flatten -> dense(3) "
                    "-> silu\n}\n", dilated, (2, 11, 12)),
    ]


def test_parameter_counts_and_shapes_agree_with_torch():
    torch, cases = torch_networks()
    for name, source, module, input_shape in cases:
        g = check(source)
        assert g.graph["totals"]["total_params"] == sum(p.numel() for p in module.parameters()), name
        out = module(torch.zeros(1, *input_shape, device="meta"))
        assert g.nodes[g.graph["output"]]["shape"] == tuple(out.shape[1:]), name
        # weight layouts: (out, in/groups, kh, kw) and (out, in), layer by layer in order
        ours = [shape for n in g.nodes for shape in g.nodes[n]["params"].values()]
        theirs = [tuple(p.shape) for p in module.parameters()]
        assert ours == theirs, name


def test_resnet_tiny_agrees_with_torch():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.b(torch.relu(self.a(x))))

    with torch.device("meta"):
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Residual(16), Residual(16),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), Residual(32), Residual(32),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), Residual(64),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    g = check((EXAMPLES / "resnet_tiny.cnn").read_text())
    assert g.graph["totals"]["total_params"] == sum(p.numel() for p in model.parameters())
    assert [s for n in g.nodes for s in g.nodes[n]["params"].values()] == [tuple(p.shape) for p in model.parameters()]
    assert g.nodes["stage2.1.y"]["shape"] == tuple(model[:5](torch.zeros(1, 3, 32, 32, device="meta")).shape[1:])


def torch_resnet20():
    """He et al.'s CIFAR ResNet-20 in PyTorch (option B shortcuts; benchmarks/torch_nets.py), on the meta device:
    for counting."""
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        return torch, resnet20_of(torch)


def test_resnet20_counts_agree_with_torch():
    """Parameters as PyTorch's parameters(), state as its BatchNorm buffers (without num_batches_tracked), MACs
    as a count of conv and linear multiply-accumulates over PyTorch's own output shapes."""
    torch, model = torch_resnet20()
    macs = []

    def count(module, inputs, out):
        if isinstance(module, torch.nn.Conv2d):
            macs.append(out[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size))
        elif isinstance(module, torch.nn.Linear):
            macs.append(module.in_features * module.out_features)

    for module in model.modules():
        module.register_forward_hook(count)
    model(torch.zeros(1, 3, 32, 32, device="meta"))
    totals = check((EXAMPLES / "resnet20.cnn").read_text()).graph["totals"]
    assert totals["total_params"] == sum(p.numel() for p in model.parameters()) == 272_474
    assert totals["state_floats"] == sum(b.numel() for name, b in model.named_buffers() if "running" in name)
    assert totals["total_macs"] == sum(macs)
