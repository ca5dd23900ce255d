"""`cnnc check --json` and `cnnc graph` on every example, end to end through the installed command."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnnc import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.glob("*.cnn"))


def cnnc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnc", *args], capture_output=True, text=True, timeout=60)


def test_the_examples_are_there():
    names = {p.name for p in FILES}
    assert {"lenet5.cnn", "lenet_modern.cnn", "mlp.cnn", "cifar_small.cnn", "resnet_tiny.cnn", "filters.cnn"} <= names


@functools.cache
def summary_of(stem: str) -> dict:
    """`cnnc check --json examples/STEM.cnn`, run once per example."""
    r = cnnc("check", "--json", str(EXAMPLES / f"{stem}.cnn"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no warnings
    return json.loads(r.stdout)


@pytest.fixture(params=[p.stem for p in FILES])
def summary(request):
    return request.param, summary_of(request.param)


def test_json_keys(summary):
    _, s = summary
    for key in ("network", "input", "layers", "total_params", "trainable_params", "total_macs"):
        assert key in s
    assert set(s["input"]) >= {"name", "shape"}
    for layer in s["layers"]:
        assert set(layer) >= {"name", "op", "output_shape", "params", "macs"}
        assert isinstance(layer["output_shape"], list) and all(d > 0 for d in layer["output_shape"])
        assert layer["params"] >= 0 and layer["macs"] >= 0


def test_json_totals_and_output(summary):
    _, s = summary
    assert s["total_params"] == sum(layer["params"] for layer in s["layers"])
    assert s["total_macs"] == sum(layer["macs"] for layer in s["layers"])
    assert s["trainable_params"] == sum(layer["params"] for layer in s["layers"] if layer["trainable"])
    assert s["layers"][-1]["name"] == s["output"]  # the last layer is the network output
    assert len({layer["name"] for layer in s["layers"]}) == len(s["layers"])


EXPECTED = {
    "lenet5": ("lenet5", [1, 32, 32], [10], 60_806, 60_806),
    "lenet_modern": ("lenet_modern", [1, 28, 28], [10], 61_706, 61_706),
    "mlp": ("mlp", [784], [10], 535_818, 535_818),
    "cifar_small": ("cifar_small", [3, 32, 32], [10], 1_116_970, 1_116_970),
    "resnet_tiny": ("resnet_tiny", [3, 32, 32], [10], 144_362, 144_362),
    "filters": ("filters", [1, 28, 28], [6, 28, 28], 54, 0),
}


@pytest.mark.parametrize("stem", EXPECTED)
def test_json_values(stem):
    s = summary_of(stem)
    network, input_shape, output_shape, total, trainable = EXPECTED[stem]
    assert s["network"] == network
    assert s["input"]["shape"] == input_shape
    assert s["layers"][-1]["output_shape"] == output_shape
    assert (s["total_params"], s["trainable_params"]) == (total, trainable)


def test_cifar_small_is_the_required_stack():
    s = summary_of("cifar_small")
    weighted = [(layer["op"], layer["output_shape"]) for layer in s["layers"] if layer["op"] in
                ("conv", "maxpool", "flatten", "dense")]
    assert weighted == [
        ("conv", [32, 32, 32]), ("conv", [32, 32, 32]), ("maxpool", [32, 16, 16]),
        ("conv", [64, 16, 16]), ("conv", [64, 16, 16]), ("maxpool", [64, 8, 8]),
        ("flatten", [4096]), ("dense", [256]), ("dense", [10]),
    ]
    relus = [layer for layer in s["layers"] if layer["op"] == "relu"]
    assert len(relus) == 5  # after each conv and after dense 256
    # 3x3 kernels with pad 1: (in*9 + 1) * out
    assert [layer["params"] for layer in s["layers"] if layer["op"] == "conv"] == [
        (3 * 9 + 1) * 32, (32 * 9 + 1) * 32, (32 * 9 + 1) * 64, (64 * 9 + 1) * 64]


def test_resnet_tiny_uses_add_and_global_avgpool():
    s = summary_of("resnet_tiny")
    ops = [layer["op"] for layer in s["layers"]]
    assert ops.count("add") == 5 and ops.count("global_avgpool") == 1 and ops[-1] == "dense"


def test_filters_are_frozen_and_concatenated():
    s = summary_of("filters")
    convs = [layer for layer in s["layers"] if layer["op"] == "conv"]
    assert [c["name"] for c in convs] == ["identity", "laplacian", "sobel_x", "sobel_y", "sharpen", "blur"]
    assert all(c["params"] == 9 and not c["trainable"] for c in convs)
    assert s["layers"][-1]["op"] == "concat"


def test_graph_writes_dot(tmp_path):
    out = tmp_path / "lenet5.dot"
    r = cnnc("graph", str(EXAMPLES / "lenet5.cnn"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    dot = out.read_text()
    assert dot.startswith('digraph "lenet5" {')
    assert dot.rstrip().endswith("}")
    for text in ("conv", "avgpool", "dense", "tanh", "flatten", "1x32x32", "6x28x28", "16x10x10", "120x1x1", "84"):
        assert text in dot
    assert dot.count("->") == 12  # a chain of 13 nodes


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_graph_to_stdout(path, capsys):
    assert cli.main(["graph", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("digraph ") and "\\ninput\\n" in out
