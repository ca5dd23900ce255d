"""Small PyTorch CNNs with the patterns PyTorch's two ONNX exporters write, and the exports themselves."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class Patterns(nn.Module):
    """Conv with and without bias, groups, dilation; batch norm (folded by the exporters); SiLU and GELU spelled
    with Sigmoid/Mul and Erf; residual add; max and padded average pooling; concat; global average pooling;
    flatten; ELU, leaky ReLU, tanh, sigmoid; a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(12, 10)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.silu(self.conv2(x))
        x = F.max_pool2d(x + y, 2)
        z = F.gelu(self.conv3(x))
        w = F.avg_pool2d(F.leaky_relu(self.conv4(x), 0.2), 3, stride=2, padding=1)
        x = torch.cat([torch.tanh(z), torch.sigmoid(w)], 1)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(F.elu(x)))


class Trainable(nn.Module):
    """For the training step: no batch norm (cnnc folds it), a view-flatten and a matmul-plus-bias layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.w = nn.Parameter(torch.randn(24, 8) * 0.2)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1) @ self.w + self.b
        return self.fc(torch.sigmoid(x))


class Normalized(nn.Module):
    """Batch norm that no exporter folds away (after an activation; the dynamo exporter folds one right after a
    linear layer): cnnc imports it as its own trainable batchnorm layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4, momentum=0.2)
        self.fc1 = nn.Linear(4 * 5 * 5, 6)
        self.bn1d = nn.BatchNorm1d(6, eps=1e-3)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        x = F.max_pool2d(self.bn2d(F.relu(self.conv(x))), 2)
        return self.fc2(self.bn1d(torch.tanh(self.fc1(torch.flatten(x, 1)))))


class GlobalMean(nn.Module):
    """Global average pooling written as a mean over the spatial axes (ReduceMean), and a softmax output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.softmax(self.fc(F.gelu(self.conv(x)).mean((2, 3))), 1)


class Upsample(nn.Module):
    """An op cnnc does not have (Resize)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2.0)


NETS = {"patterns": (Patterns, (3, 16, 16)), "trainable": (Trainable, (1, 10, 10)),
        "global_mean": (GlobalMean, (2, 6, 6)), "upsample": (Upsample, (1, 8, 8)),
        "normalized": (Normalized, (1, 10, 10))}


def make(name: str, seed: int = 0):
    """The network, in eval mode, with batch norm statistics that are not the identity."""
    torch.manual_seed(seed)
    cls, shape = NETS[name]
    net = cls()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net.eval(), shape


def export(name: str, dynamo: bool, folder: Path) -> Path:
    """`name` exported by torch.onnx.export: TorchScript (opset 17, dynamic batch) or dynamo (external .data)."""
    net, shape = make(name)
    x = torch.randn(2, *shape)
    path = folder / f"{name}-{'dynamo' if dynamo else 'torchscript'}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            torch.onnx.export(net, (x,), str(path), dynamo=True, external_data=True)
        else:
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "N"}})
    return path


def forward(name: str, x: np.ndarray) -> np.ndarray:
    net, _ = make(name)
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()
