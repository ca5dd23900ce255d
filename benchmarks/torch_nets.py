"""PyTorch twins of example networks, written once: the benchmarks' PyTorch columns and the tests that compare
counts with PyTorch's (tests/passes/test_counts.py) build them from here."""

from __future__ import annotations


def torch_resnet20(torch):
    """He et al.'s CIFAR ResNet-20 with option-B shortcuts, as examples/resnet20.cnn writes it (parameters in the
    same order as cnnc's layout: each block's main path, then its shortcut)."""
    nn = torch.nn

    def conv_bn(cin, cout, k, stride):
        return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.y = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3, 1))
            self.short = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 else nn.Identity()

        def forward(self, x):
            return torch.relu(self.short(x) + self.y(x))

    blocks = [Basic(16, 16, 1) for _ in range(3)]
    blocks += [Basic(16, 32, 2), Basic(32, 32, 1), Basic(32, 32, 1)]
    blocks += [Basic(32, 64, 2), Basic(64, 64, 1), Basic(64, 64, 1)]
    return nn.Sequential(*conv_bn(3, 16, 3, 1), nn.ReLU(), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))
