"""First-order optimizers over one flat parameter buffer.

The model keeps every parameter in one flat float32 buffer `params` and the
gradients in `grads` with the same layout, so an update is a handful of
vectorised numpy expressions over the whole model. State buffers and one
scratch buffer are allocated on the first step (or by load_state_dict) and
every later step works in place with out= arguments: a step allocates nothing.

A compiled model also carries each rule as one native loop (``update_KIND``,
see ``cnnc.codegen.optim``): ``Model.fit`` binds it with ``use_native``. It
performs the numpy rule's float32 operations in the same order, so both give
the same bits; the numpy form stays the definition and the fallback.

L2 weight decay is part of the loss, not of the optimizer: see add_weight_decay.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from cnnc_runtime.rules import HYPERPARAMETERS, check

State = dict[str, np.ndarray | float | int]


class Optimizer(ABC):
    """Base class: `lr` may be changed between steps (schedules); `t` counts steps taken."""

    hyperparameters: tuple[str, ...] = ("lr",)
    buffers: tuple[str, ...] = ()
    kind = ""  # the name of its native update (``update_KIND``); empty: numpy only
    constant_names: tuple[str, ...] = ("lr",)

    def __init__(self, lr: float) -> None:
        _check(self, lr=lr)
        self.lr = float(lr)
        self.t = 0
        self._state: dict[str, np.ndarray] = {}
        self._tmp: np.ndarray | None = None
        self._native = None
        self._pointers: tuple | None = None  # (params, grads, their and the state's addresses) of the last native step
        self._hyper = np.zeros(8, dtype=np.float32)

    @property
    def native_kind(self) -> str:
        """The native update that computes exactly this rule: "" for a subclass (its rule may differ)."""
        return self.kind if OPTIMIZERS.get(self.kind) is type(self) else ""

    def use_native(self, update) -> None:
        """Run steps through `update` (``Model.native_update(optimizer)``); None: back to numpy."""
        self._native = update
        self._pointers = None

    def constants(self) -> tuple[float, ...]:
        """The native update's float32 constants for the step being taken (``t`` already counts it).

        In the order of ``constant_names``, which the model's code must list the same way.
        """
        return (self.lr,)

    def __repr__(self) -> str:
        args = ", ".join(f"{h}={getattr(self, h)!r}" for h in self.hyperparameters)
        return f"{type(self).__name__}({args})"

    def _prepare(self, params: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Check the buffers, allocate state on first use; returns the scratch buffer."""
        if params.shape != grads.shape:
            raise ValueError(f"params {params.shape} and grads {grads.shape} differ in shape")
        tmp = self._tmp
        if tmp is None:
            self._state = {b: np.zeros_like(params) for b in self.buffers}
            self._pointers = None
            tmp = self._tmp = np.empty_like(params)
        elif tmp.shape != params.shape:
            raise ValueError(f"optimizer state is for {tmp.size} parameters, got {params.size}; call reset() first")
        return tmp

    def step(self, params: np.ndarray, grads: np.ndarray) -> None:
        """Update `params` in place from `grads`."""
        tmp = self._prepare(params, grads)
        self.t += 1
        pointers = self._native_pointers(params, grads) if self._native is not None else None
        if pointers is None:
            self._update(params, grads, tmp)
            return
        constants = self.constants()
        self._hyper[:len(constants)] = constants  # each rounded to float32, as numpy rounds a Python float
        self._native(*pointers, 0, params.size)

    def _native_pointers(self, params: np.ndarray, grads: np.ndarray) -> tuple[int, ...] | None:
        """The native update's five pointers, checked once per pair of buffers; None if native code cannot take them."""
        cached = self._pointers
        if cached is not None and cached[0] is params and cached[1] is grads:
            return cached[2]
        state = [self._state[b] for b in self.buffers]
        if not _flat_f32(params, grads, *state):
            return None
        addresses = [a.ctypes.data for a in (params, grads, *state)] + [0, 0]
        pointers = (*addresses[:4], self._hyper.ctypes.data)
        self._pointers = (params, grads, pointers)
        return pointers

    @abstractmethod
    def _update(self, params: np.ndarray, grads: np.ndarray, tmp: np.ndarray) -> None:
        """The optimizer's rule: change `params` in place (`tmp` is scratch of the same size)."""

    def reset(self) -> None:
        """Forget all state (moments, step count); hyperparameters stay."""
        self.t = 0
        self._state = {}
        self._tmp = None
        self._pointers = None

    def state_dict(self) -> State:
        """Hyperparameters, step count and copies of the state buffers (once allocated), for checkpoints."""
        d: State = {h: getattr(self, h) for h in self.hyperparameters}
        d["t"] = self.t
        d.update({b: v.copy() for b, v in self._state.items()})
        return d

    def load_state_dict(self, d: Mapping[str, np.ndarray | float | int]) -> None:
        """Restore what state_dict returned (0-d arrays, as from np.load, are fine); resumes identically."""
        allowed = set(self.hyperparameters) | set(self.buffers) | {"t"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"{type(self).__name__} state has no {sorted(unknown)}; expected keys {sorted(allowed)}")
        present = [b for b in self.buffers if b in d]
        if present and len(present) != len(self.buffers):
            raise ValueError(f"{type(self).__name__} state needs all of {list(self.buffers)}, got {present}")
        hyper = {h: _scalar(d[h], h) for h in self.hyperparameters if h in d}
        _check(self, **hyper)
        t = _scalar(d.get("t", 0), "t")
        if not (math.isfinite(t) and t >= 0 and t == int(t)):
            raise ValueError(f"{type(self).__name__} step count t must be a non-negative integer, got {t}")
        arrays = {b: np.array(d[b], copy=True) for b in present}
        if len({a.shape for a in arrays.values()}) > 1 or any(a.ndim != 1 for a in arrays.values()):
            shapes = {b: a.shape for b, a in arrays.items()}
            raise ValueError(f"state buffers must be flat and of one size, got {shapes}")
        for h, v in hyper.items():
            setattr(self, h, v)
        self.t = int(t)
        self._state = arrays
        self._pointers = None
        self._tmp = np.empty_like(next(iter(arrays.values()))) if arrays else None


def _scalar(v: np.ndarray | float | int, name: str) -> float:
    """A state entry as a Python float; ValueError for an array of another size or a non-number."""
    a = np.asarray(v)
    if a.size != 1 or a.dtype.kind not in "iuf":
        raise ValueError(f"optimizer state {name} must be one number, got {a.dtype} {a.shape}")
    return float(a.reshape(()))


def _check(optimizer: Optimizer, **values: float) -> None:
    """ValueError naming the optimizer and the hyperparameter that breaks its rule (``cnnc_runtime.rules``)."""
    for key, value in values.items():
        check(HYPERPARAMETERS, key, value, f"{type(optimizer).__name__} {key}")


def _flat_f32(*arrays: np.ndarray) -> bool:
    """Whether every array is a contiguous float32 vector of the first one's size (native code may run on them)."""
    size = arrays[0].size
    return all(a.dtype == np.float32 and a.ndim == 1 and a.size == size and a.flags.c_contiguous
               and a.flags.writeable for a in arrays)


class SGD(Optimizer):
    """Plain gradient descent: w <- w - lr g."""

    kind = "sgd"

    def _update(self, params: np.ndarray, grads: np.ndarray, tmp: np.ndarray) -> None:
        np.multiply(grads, self.lr, out=tmp)
        params -= tmp


class Momentum(Optimizer):
    """Heavy-ball momentum, the form torch.optim.SGD(momentum=beta) uses:

        v <- beta v + g;    w <- w - lr v        (v = 0 before the first step)

    The lecture-style update v' <- beta v' - lr g; w <- w + v' is the same
    trajectory while lr is constant (v' = -lr v). They differ when lr changes:
    here a new lr scales the whole accumulated velocity at once, there only
    the gradients that arrive after the change.
    """

    hyperparameters = ("lr", "beta")
    buffers = ("v",)
    kind = "momentum"
    constant_names = ("lr", "beta")

    def constants(self) -> tuple[float, ...]:
        return (self.lr, self.beta)

    def __init__(self, lr: float, beta: float = 0.9) -> None:
        super().__init__(lr)
        _check(self, beta=beta)
        self.beta = float(beta)

    def _update(self, params: np.ndarray, grads: np.ndarray, tmp: np.ndarray) -> None:
        v = self._state["v"]
        v *= self.beta
        v += grads
        np.multiply(v, self.lr, out=tmp)
        params -= tmp


class RMSProp(Optimizer):
    """RMSProp: a per-weight step scaled by a running RMS of the gradient.

        s <- beta s + (1 - beta) g^2;    w <- w - lr g / (sqrt(s) + eps)      (s = 0 at first)

    Same as torch.optim.RMSprop(alpha=beta, eps=eps).
    """

    hyperparameters = ("lr", "beta", "eps")
    buffers = ("s",)
    kind = "rmsprop"
    constant_names = ("lr", "beta", "one_minus_beta", "eps")

    def constants(self) -> tuple[float, ...]:
        return (self.lr, self.beta, 1 - self.beta, self.eps)

    def __init__(self, lr: float, beta: float = 0.9, eps: float = 1e-8) -> None:
        super().__init__(lr)
        _check(self, beta=beta, eps=eps)
        self.beta, self.eps = float(beta), float(eps)

    def _update(self, params: np.ndarray, grads: np.ndarray, tmp: np.ndarray) -> None:
        s = self._state["s"]
        s *= self.beta
        np.multiply(grads, grads, out=tmp)
        tmp *= 1 - self.beta
        s += tmp
        np.sqrt(s, out=tmp)
        tmp += self.eps
        np.divide(grads, tmp, out=tmp)
        tmp *= self.lr
        params -= tmp


class Adam(Optimizer):
    """Adam (Kingma and Ba), with bias correction; t counts steps from 1:

        m <- beta1 m + (1 - beta1) g;        v <- beta2 v + (1 - beta2) g^2
        m^ = m / (1 - beta1^t);              v^ = v / (1 - beta2^t)
        w <- w - lr m^ / (sqrt(v^) + eps)

    Computed as torch.optim.Adam does: w -= (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
    """

    hyperparameters = ("lr", "beta1", "beta2", "eps")
    buffers = ("m", "v")
    kind = "adam"
    constant_names = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "sqrt_bias2", "eps", "step_size")

    def constants(self) -> tuple[float, ...]:
        return (self.beta1, 1 - self.beta1, self.beta2, 1 - self.beta2, math.sqrt(1 - self.beta2**self.t), self.eps,
                self.lr / (1 - self.beta1**self.t))

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(lr)
        _check(self, beta1=beta1, beta2=beta2, eps=eps)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def _update(self, params: np.ndarray, grads: np.ndarray, tmp: np.ndarray) -> None:
        m, v = self._state["m"], self._state["v"]
        m *= self.beta1
        np.multiply(grads, 1 - self.beta1, out=tmp)
        m += tmp
        v *= self.beta2
        np.multiply(grads, grads, out=tmp)
        tmp *= 1 - self.beta2
        v += tmp
        step_size = self.lr / (1 - self.beta1**self.t)
        np.sqrt(v, out=tmp)
        tmp /= math.sqrt(1 - self.beta2**self.t)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        params -= tmp


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "momentum": Momentum, "rmsprop": RMSProp, "adam": Adam}


def optimizer_class(name: str) -> type[Optimizer]:
    """The optimizer class of a (case-insensitive) name; ValueError listing the names."""
    cls = OPTIMIZERS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return cls


def make_optimizer(name: str, **kwargs: float) -> Optimizer:
    """An optimizer by (case-insensitive) name, e.g. make_optimizer("adam", lr=1e-3).

    An argument the optimizer does not take is a ValueError naming the ones it does.
    """
    cls = optimizer_class(name)
    unknown = sorted(set(kwargs) - set(cls.hyperparameters))
    if unknown:
        raise ValueError(f"optimizer {name.lower()} takes {', '.join(cls.hyperparameters)}, "
                         f"not {', '.join(unknown)}")
    return cls(**kwargs)


def add_weight_decay(
    params: np.ndarray, grads: np.ndarray, decay_mask: np.ndarray, lam: float, out: np.ndarray | None = None
) -> float:
    """L2 penalty lam * sum((w * mask)^2) for the loss; adds its gradient 2 lam w * mask to `grads` in place.

    `decay_mask` is a float buffer shaped like `params`: 1 for weights, 0 for biases.
    Pass a scratch buffer `out` (like `params`) to avoid allocating one per call.
    """
    if lam == 0:
        return 0.0
    tmp = np.multiply(params, decay_mask, out=out)
    penalty = lam * float(np.vdot(tmp, tmp))
    tmp *= 2 * lam
    grads += tmp
    return penalty
