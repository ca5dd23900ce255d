"""The activations: one ``Activation`` entry each, from the language to the kernel.

An entry gives the layer's arguments and defaults, its float64 reference and
derivative (the oracle the tests and ``cnnc gradcheck`` use), the LLVM
expressions of both (``cnnc.codegen.activations``), which saved tensor the
gradient reads (``grad_from``), and whether the layer feeding it gets He's
initialisation (ReLU-like: about half the inputs pass). The op table
(``cnnc.ops.OPS``) makes a layer of each; fusion carries all of its
arguments into a conv or dense kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnc.codegen import activations as kernels
from cnnc.errors import CnnError
from cnnc.ir import Arg

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """erf element-wise in float64 (numpy has none)."""
    return _erf(np.asarray(x, dtype=np.float64)).astype(np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x), written so that no exp overflows."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _gelu_derivative(x: np.ndarray, y: np.ndarray, a: dict) -> np.ndarray:
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _silu_derivative(x: np.ndarray, y: np.ndarray, a: dict) -> np.ndarray:
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _alpha_not_negative(name: str) -> Callable[[dict, Any], None]:
    """The check of an activation whose gradient is read off its output: that needs x < 0 to give y <= 0."""
    def check(args: dict, loc: Any) -> None:
        if args["alpha"] < 0:
            raise CnnError(f"{name}: alpha must be >= 0 (its gradient is computed from its output), "
                           f"got {args['alpha']}", loc)
    return check


@dataclass(frozen=True)
class Activation:
    """Everything about one element-wise activation.

    ``reference(x, args)`` and ``derivative(x, y, args)`` (dy/dx) are float64
    numpy; ``kernel(b, x, args)`` and ``kernel_grad(b, v, dy, args)`` emit the
    same in float32 LLVM, where ``v`` is the saved output y, or the input x
    when ``grad_from == "input"`` (an activation whose input cannot be
    recovered from its output: the layer then keeps its input for backward).
    """

    name: str
    doc: str
    reference: Callable[[np.ndarray, dict], np.ndarray]
    derivative: Callable[[np.ndarray, np.ndarray, dict], np.ndarray]
    kernel: Callable
    kernel_grad: Callable
    args: tuple[Arg, ...] = ()
    grad_from: str = "output"
    he_init: bool = False
    check: Callable[[dict, Any], None] = lambda args, loc: None


TABLE: dict[str, Activation] = {a.name: a for a in (
    Activation(
        "relu", "max(x, 0)",
        reference=lambda x, a: np.maximum(x, 0.0),
        derivative=lambda x, y, a: np.where(x <= 0, 0.0, 1.0),  # NaN passes dy, as PyTorch's threshold_backward
        kernel=kernels.relu, kernel_grad=kernels.relu_grad, he_init=True),
    Activation(
        "sigmoid", "1 / (1 + e^-x)",
        reference=lambda x, a: _sigmoid(x),
        derivative=lambda x, y, a: y * (1.0 - y),
        kernel=kernels.sigmoid, kernel_grad=kernels.sigmoid_grad),
    Activation(
        "tanh", "hyperbolic tangent",
        reference=lambda x, a: np.tanh(x),
        derivative=lambda x, y, a: 1.0 - y * y,
        kernel=kernels.tanh, kernel_grad=kernels.tanh_grad),
    Activation(
        "leaky_relu", "x if x > 0 else alpha x", args=(Arg("alpha", "float", 0.01),),
        reference=lambda x, a: np.where(x > 0, x, a["alpha"] * x),
        derivative=lambda x, y, a: np.where(x > 0, 1.0, a["alpha"]),
        kernel=kernels.leaky_relu, kernel_grad=kernels.leaky_relu_grad, he_init=True,
        check=_alpha_not_negative("leaky_relu")),
    Activation(
        "elu", "x if x > 0 else alpha (e^x - 1), alpha >= 0", args=(Arg("alpha", "float", 1.0),),
        reference=lambda x, a: np.where(x > 0, x, a["alpha"] * np.expm1(np.minimum(x, 0.0))),
        derivative=lambda x, y, a: np.where(x > 0, 1.0, a["alpha"] * np.exp(np.minimum(x, 0.0))),
        kernel=kernels.elu, kernel_grad=kernels.elu_grad, he_init=True, check=_alpha_not_negative("elu")),
    Activation(
        "gelu", "x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (the exact form)",
        reference=lambda x, a: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))),
        derivative=_gelu_derivative,
        kernel=kernels.gelu, kernel_grad=kernels.gelu_grad, grad_from="input", he_init=True),
    Activation(
        "silu", "x sigmoid(x)",
        reference=lambda x, a: x * _sigmoid(x),
        derivative=_silu_derivative,
        kernel=kernels.silu, kernel_grad=kernels.silu_grad, grad_from="input", he_init=True),
)}


def he_init(act: str) -> bool:
    """Whether a layer whose output goes through `act` (``"none"``: nothing) gets He's initialisation."""
    return act in TABLE and TABLE[act].he_init


def saves_input(act: str) -> bool:
    """Whether a layer with `act` fused keeps the activation's input for backward (``grad_from == "input"``)."""
    return act in TABLE and TABLE[act].grad_from == "input"


def act_args(args: dict) -> tuple[tuple[str, Any], ...]:
    """An activation's arguments as a sorted tuple: hashable, for kernel specs."""
    return tuple(sorted(args.items()))


def emit(b: Any, x: Any, act: str, args: tuple[tuple[str, Any], ...]) -> Any:
    """The LLVM value of activation `act` (``"none"``: x itself) on scalar or vector `x`, in registers."""
    return x if act == "none" else TABLE[act].kernel(b, x, dict(args))


def emit_grad(b: Any, v: Any, dy: Any, act: str, args: tuple[tuple[str, Any], ...]) -> Any:
    """dL/dx from dL/dy and the saved tensor `v` (the output, or the input when ``grad_from == "input"``)."""
    return dy if act == "none" else TABLE[act].kernel_grad(b, v, dy, dict(args))
