"""First-order optimizers over one flat parameter buffer: the optimizer table.

``OPTIMIZERS`` is the one home of every optimizer: each entry (a class) holds
its name (``kind``), its hyperparameters with their defaults (``defaults``),
the state buffers it keeps (``buffers``), the per-step constants it derives
from them (``constant_names``, ``constants``) and its update rule (``rule``).
The front end, the CLI, ``fit`` and the compiler all read this table.

A rule is written once, over an ``Ops`` interface (add, sub, mul, div, sqrt
on whole buffers and on the step's constants), and runs two ways:

- numpy: the rule is traced once into a list of operations, each written into
  scratch buffers allocated on the first step (reused as values die), so
  every later step allocates nothing;
- native: the compiler emits the same rule as one fused loop per optimizer
  (``update_KIND``, see ``cnnc.codegen.optim``) that ``Model.fit`` binds with
  ``use_native``. Both perform the same float32 operations in the same order
  (the loop contracts nothing into an FMA), so both give the same bits.

L2 weight decay is part of the loss, not of the optimizer: see add_weight_decay.
AdamW's decoupled decay is the optimizer's, applied where ``decay_mask`` is 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from cnnc_runtime.rules import HYPERPARAMETERS, check

State = dict[str, np.ndarray | float | int]


class Ops(Protocol):
    """What an update rule computes with: float32 arithmetic on buffers (or vectors) and the step's constants."""

    def add(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def div(self, a: Any, b: Any) -> Any: ...
    def sqrt(self, a: Any) -> Any: ...


# rule(ops, constants by name, params, grads, decay mask, state) -> (new params, new state)
Rule = Callable[[Ops, Mapping[str, Any], Any, Any, Any, tuple], tuple[Any, tuple]]


class Optimizer:
    """Base class and table entry: `lr` may be changed between steps (schedules); `t` counts steps taken.

    A subclass sets ``kind``, ``defaults`` (every hyperparameter, ``lr`` first),
    ``buffers``, ``constant_names`` with ``constants()``, and ``rule``.
    """

    defaults: dict[str, float] = {"lr": 0.01}
    buffers: tuple[str, ...] = ()
    kind = ""  # the name of its native update (``update_KIND``); empty: numpy only
    constant_names: tuple[str, ...] = ("lr",)
    rule: Rule

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        return tuple(cls.defaults)

    def __init__(self, lr: float) -> None:
        _check(self, lr=lr)
        self.lr = float(lr)
        self.t = 0
        self._state: dict[str, np.ndarray] = {}
        self._size: int | None = None  # the parameter count the state is for
        self._scratch: list[np.ndarray] = []  # the numpy rule's temporaries (see _Tape)
        self._ones: np.ndarray | None = None  # the decay mask when the caller gives none
        self._native = None
        self._pointers: tuple | None = None  # (params, grads, mask, the native call's pointers) of the last step
        self._hyper = np.zeros(16, dtype=np.float32)

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return type(self).hyperparameter_names()

    @property
    def native_kind(self) -> str:
        """The native update that computes exactly this rule: "" for a subclass (its rule may differ)."""
        return self.kind if OPTIMIZERS.get(self.kind) is type(self) else ""

    def use_native(self, update) -> None:
        """Run steps through `update` (``Model.native_update(optimizer)``); None: back to numpy."""
        self._native = update
        self._pointers = None

    def constants(self) -> tuple[float, ...]:
        """The rule's float32 constants for the step being taken (``t`` already counts it).

        In the order of ``constant_names``, which the model's code must list the same way.
        """
        return (self.lr,)

    @staticmethod
    def rule(o: Ops, h: Mapping[str, Any], p: Any, g: Any, mask: Any, state: tuple) -> tuple[Any, tuple]:
        return o.sub(p, o.mul(g, h["lr"])), ()

    def __repr__(self) -> str:
        args = ", ".join(f"{h}={getattr(self, h)!r}" for h in self.hyperparameters)
        return f"{type(self).__name__}({args})"

    def _prepare(self, params: np.ndarray, grads: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """Check the buffers, allocate state on first use; returns the decay mask (ones when none is given)."""
        if params.shape != grads.shape:
            raise ValueError(f"params {params.shape} and grads {grads.shape} differ in shape")
        if mask is not None and mask.shape != params.shape:
            raise ValueError(f"decay_mask {mask.shape} and params {params.shape} differ in shape")
        if self._size is None:
            self._state = {b: np.zeros_like(params) for b in self.buffers}
            self._size = params.size
            self._scratch = []
            self._pointers = None
        elif self._size != params.size:
            raise ValueError(f"optimizer state is for {self._size} parameters, got {params.size}; call reset() first")
        if mask is None:
            if self._ones is None or self._ones.shape != params.shape:
                self._ones = np.ones(params.shape, dtype=np.float32)
            mask = self._ones
        return mask

    def step(self, params: np.ndarray, grads: np.ndarray, decay_mask: np.ndarray | None = None) -> None:
        """Update `params` in place from `grads`.

        `decay_mask` (1 for weights, 0 elsewhere) says where a decoupled weight decay (AdamW's) applies; by
        default everywhere, as PyTorch applies it to every parameter it is given.
        """
        mask = self._prepare(params, grads, decay_mask)
        self.t += 1
        pointers = self._native_pointers(params, grads, mask) if self._native is not None else None
        if pointers is None:
            self._update(params, grads, mask)
            return
        constants = self.constants()
        self._hyper[:len(constants)] = constants  # each rounded to float32, as numpy rounds a Python float
        self._native(*pointers, 0, params.size)

    def native_buffers(self, params: np.ndarray, grads: np.ndarray,
                       mask: np.ndarray | None = None) -> tuple[int, ...] | None:
        """The six pointers a native update of these buffers takes (the state allocated on first use, as by
        ``step``), for a caller that runs the update itself (``cnnc_runtime.steploop``); None when native code
        cannot take them."""
        return self._native_pointers(params, grads, self._prepare(params, grads, mask))

    def state_buffers(self) -> list[np.ndarray]:
        """The state a native update changes, in ``buffers`` order (what ``native_buffers`` points to)."""
        return [self._state[b] for b in self.buffers]

    def _update(self, params: np.ndarray, grads: np.ndarray, mask: np.ndarray) -> None:
        """The rule in numpy: change `params` and the state in place."""
        constants = dict(zip(self.constant_names, (np.float32(c) for c in self.constants())))
        state = tuple(self._state[b] for b in self.buffers)
        _tape(type(self)).run(self._scratch, constants, params, grads, mask, state)

    def _native_pointers(self, params: np.ndarray, grads: np.ndarray, mask: np.ndarray) -> tuple[int, ...] | None:
        """The native update's six pointers, checked once per set of buffers; None if native code cannot take them."""
        cached = self._pointers
        if cached is not None and cached[0] is params and cached[1] is grads and cached[2] is mask:
            return cached[3]
        state = [self._state[b] for b in self.buffers]
        if not _flat_f32(params, grads, *state) or not _flat_f32(params, mask, writeable=False):
            return None
        addresses = [a.ctypes.data for a in (params, grads, mask, *state)] + [0, 0]
        pointers = (*addresses[:5], self._hyper.ctypes.data)
        self._pointers = (params, grads, mask, pointers)
        return pointers

    @classmethod
    def traced(cls) -> _Tape:
        """The rule as a list of operations (what the numpy form runs)."""
        return _tape(cls)

    def reset(self) -> None:
        """Forget all state (moments, step count); hyperparameters stay."""
        self.t = 0
        self._state = {}
        self._size = None
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
        self._size = next(iter(arrays.values())).size if arrays else None
        self._scratch = []


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


def _flat_f32(*arrays: np.ndarray, writeable: bool = True) -> bool:
    """Whether every array is a contiguous float32 vector of the first one's size (native code may run on them)."""
    size = arrays[0].size
    return all(a.dtype == np.float32 and a.ndim == 1 and a.size == size and a.flags.c_contiguous
               and (a.flags.writeable or not writeable) for a in arrays)


# ---- the numpy form of a rule ---------------------------------------------------------------------

Symbol = tuple[str, Any]  # ("in", name), ("const", name) or ("tmp", index)


class _Tracer:
    """Ops that record each operation instead of computing it."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, tuple[Symbol, ...]]] = []

    def _op(self, name: str, *args: Symbol) -> Symbol:
        self.ops.append((name, args))
        return ("tmp", len(self.ops) - 1)

    def add(self, a: Symbol, b: Symbol) -> Symbol:
        return self._op("add", a, b)

    def sub(self, a: Symbol, b: Symbol) -> Symbol:
        return self._op("subtract", a, b)

    def mul(self, a: Symbol, b: Symbol) -> Symbol:
        return self._op("multiply", a, b)

    def div(self, a: Symbol, b: Symbol) -> Symbol:
        return self._op("divide", a, b)

    def sqrt(self, a: Symbol) -> Symbol:
        return self._op("sqrt", a)


class _Tape:
    """A rule traced once: its operations in order, each given a scratch slot that is reused once its value dies."""

    def __init__(self, cls: type[Optimizer]) -> None:
        tracer = _Tracer()
        state = tuple(("in", f"s{i}") for i in range(len(cls.buffers)))
        consts = {c: ("const", c) for c in cls.constant_names}
        new_p, new_state = cls.rule(tracer, consts, ("in", "p"), ("in", "g"), ("in", "mask"), state)
        self.outputs: tuple[Symbol, ...] = (new_p, *new_state)
        last_use = {}
        for i, (_, args) in enumerate(tracer.ops):
            for a in args:
                if a[0] == "tmp":
                    last_use[a[1]] = i
        for s in self.outputs:
            if s[0] == "tmp":
                last_use[s[1]] = len(tracer.ops)
        free: list[int] = []
        slot_of: dict[int, int] = {}
        self.slots = 0
        self.ops: list[tuple[Callable, tuple[Symbol, ...], int]] = []
        for i, (name, args) in enumerate(tracer.ops):
            for a in args:  # a value read here for the last time gives its slot back (an in-place operation)
                if a[0] == "tmp" and last_use[a[1]] == i and slot_of[a[1]] not in free:
                    free.append(slot_of[a[1]])
            if free:
                slot_of[i] = free.pop()
            else:
                slot_of[i] = self.slots
                self.slots += 1
            self.ops.append((getattr(np, name), args, slot_of[i]))
        self._slot_of = slot_of

    def run(self, scratch: list[np.ndarray], constants: Mapping[str, np.float32], p: np.ndarray, g: np.ndarray,
            mask: np.ndarray, state: tuple[np.ndarray, ...]) -> None:
        """Apply the rule in place: scratch buffers grow to the slots needed on the first call and are kept."""
        while len(scratch) < self.slots:
            scratch.append(np.empty_like(p))
        inputs = {"p": p, "g": g, "mask": mask, **{f"s{i}": s for i, s in enumerate(state)}}

        def value(s: Symbol) -> np.ndarray | np.float32:
            kind, key = s
            if kind == "in":
                return inputs[key]
            if kind == "const":
                return constants[key]
            return scratch[self._slot_of[key]]

        for fn, args, slot in self.ops:
            fn(*(value(a) for a in args), out=scratch[slot])
        for target, s in zip((p, *state), self.outputs):
            np.copyto(target, value(s))


_TAPES: dict[type, _Tape] = {}


def _tape(cls: type[Optimizer]) -> _Tape:
    tape = _TAPES.get(cls)
    if tape is None:
        tape = _TAPES[cls] = _Tape(cls)
    return tape


# ---- the table ------------------------------------------------------------------------------------


class SGD(Optimizer):
    """Plain gradient descent: w <- w - lr g."""

    kind = "sgd"
    defaults = {"lr": 0.01}

    def __init__(self, lr: float) -> None:
        super().__init__(lr)


class Momentum(Optimizer):
    """Heavy-ball momentum, the form torch.optim.SGD(momentum=beta) uses:

        v <- beta v + g;    w <- w - lr v        (v = 0 before the first step)

    The lecture-style update v' <- beta v' - lr g; w <- w + v' is the same
    trajectory while lr is constant (v' = -lr v). They differ when lr changes:
    here a new lr scales the whole accumulated velocity at once, there only
    the gradients that arrive after the change.
    """

    kind = "momentum"
    defaults = {"lr": 0.01, "beta": 0.9}
    buffers = ("v",)
    constant_names = ("lr", "beta")

    def __init__(self, lr: float, beta: float = 0.9) -> None:
        super().__init__(lr)
        _check(self, beta=beta)
        self.beta = float(beta)

    def constants(self) -> tuple[float, ...]:
        return (self.lr, self.beta)

    @staticmethod
    def rule(o: Ops, h: Mapping[str, Any], p: Any, g: Any, mask: Any, state: tuple) -> tuple[Any, tuple]:
        v = o.add(o.mul(state[0], h["beta"]), g)
        return o.sub(p, o.mul(v, h["lr"])), (v,)


class Nesterov(Momentum):
    """Nesterov momentum, as torch.optim.SGD(momentum=beta, nesterov=True) computes it:

        v <- beta v + g;    w <- w - lr (g + beta v)        (v = 0 before the first step)
    """

    kind = "nesterov"

    @staticmethod
    def rule(o: Ops, h: Mapping[str, Any], p: Any, g: Any, mask: Any, state: tuple) -> tuple[Any, tuple]:
        v = o.add(o.mul(state[0], h["beta"]), g)
        return o.sub(p, o.mul(o.add(g, o.mul(v, h["beta"])), h["lr"])), (v,)


class RMSProp(Optimizer):
    """RMSProp: a per-weight step scaled by a running RMS of the gradient.

        s <- beta s + (1 - beta) g^2;    w <- w - lr g / (sqrt(s) + eps)      (s = 0 at first)

    Same as torch.optim.RMSprop(alpha=beta, eps=eps).
    """

    kind = "rmsprop"
    defaults = {"lr": 0.001, "beta": 0.9, "eps": 1e-8}
    buffers = ("s",)
    constant_names = ("lr", "beta", "one_minus_beta", "eps")

    def __init__(self, lr: float, beta: float = 0.9, eps: float = 1e-8) -> None:
        super().__init__(lr)
        _check(self, beta=beta, eps=eps)
        self.beta, self.eps = float(beta), float(eps)

    def constants(self) -> tuple[float, ...]:
        return (self.lr, self.beta, 1 - self.beta, self.eps)

    @staticmethod
    def rule(o: Ops, h: Mapping[str, Any], p: Any, g: Any, mask: Any, state: tuple) -> tuple[Any, tuple]:
        s = o.add(o.mul(state[0], h["beta"]), o.mul(o.mul(g, g), h["one_minus_beta"]))
        step = o.mul(o.div(g, o.add(o.sqrt(s), h["eps"])), h["lr"])
        return o.sub(p, step), (s,)


class Adam(Optimizer):
    """Adam (Kingma and Ba), with bias correction; t counts steps from 1:

        m <- beta1 m + (1 - beta1) g;        v <- beta2 v + (1 - beta2) g^2
        m^ = m / (1 - beta1^t);              v^ = v / (1 - beta2^t)
        w <- w - lr m^ / (sqrt(v^) + eps)

    Computed as torch.optim.Adam does: w -= (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
    """

    kind = "adam"
    defaults = {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    buffers = ("m", "v")
    constant_names = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "sqrt_bias2", "eps", "step_size")

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(lr)
        _check(self, beta1=beta1, beta2=beta2, eps=eps)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def constants(self) -> tuple[float, ...]:
        return (self.beta1, 1 - self.beta1, self.beta2, 1 - self.beta2, math.sqrt(1 - self.beta2**self.t), self.eps,
                self.lr / (1 - self.beta1**self.t))

    @staticmethod
    def moments(o: Ops, h: Mapping[str, Any], g: Any, state: tuple) -> tuple[Any, tuple]:
        """Adam's step (before the learning rate's sign) and its new moments (m, v)."""
        m = o.add(o.mul(state[0], h["beta1"]), o.mul(g, h["one_minus_beta1"]))
        v = o.add(o.mul(state[1], h["beta2"]), o.mul(o.mul(g, g), h["one_minus_beta2"]))
        denom = o.add(o.div(o.sqrt(v), h["sqrt_bias2"]), h["eps"])
        return o.mul(o.div(m, denom), h["step_size"]), (m, v)

    @staticmethod
    def rule(o: Ops, h: Mapping[str, Any], p: Any, g: Any, mask: Any, state: tuple) -> tuple[Any, tuple]:
        step, moments = Adam.moments(o, h, g, state)
        return o.sub(p, step), moments


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter), as torch.optim.AdamW computes it:

        w <- w - lr wd w   (where the decay mask is 1: conv and dense weights, not biases or frozen weights)
        then Adam's step on the decayed w, from the same gradient.
    """

    kind = "adamw"
    defaults = {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    constant_names = ("decay", *Adam.constant_names)

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(lr, beta1, beta2, eps)
        _check(self, weight_decay=weight_decay)
        self.weight_decay = float(weight_decay)

    def constants(self) -> tuple[float, ...]:
        return (self.lr * self.weight_decay, *super().constants())

    @staticmethod
    def rule(o: Ops, h: Mapping[str, Any], p: Any, g: Any, mask: Any, state: tuple) -> tuple[Any, tuple]:
        decayed = o.sub(p, o.mul(o.mul(p, h["decay"]), mask))  # mask 0: p - 0 = p exactly
        step, moments = Adam.moments(o, h, g, state)
        return o.sub(decayed, step), moments


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.kind: cls for cls in (SGD, Momentum, Nesterov, RMSProp, Adam, AdamW)}


def optimizer_class(name: str) -> type[Optimizer]:
    """The optimizer class of a (case-insensitive) name; ValueError listing the names."""
    cls = OPTIMIZERS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return cls


def make_optimizer(name: str, **kwargs: float) -> Optimizer:
    """An optimizer by (case-insensitive) name, e.g. make_optimizer("adam", lr=1e-3); missing ones take defaults.

    An argument the optimizer does not take is a ValueError naming the ones it does.
    """
    cls = optimizer_class(name)
    takes = cls.hyperparameter_names()
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:
        raise ValueError(f"optimizer {name.lower()} takes {', '.join(takes)}, not {', '.join(unknown)}")
    return cls(**{**cls.defaults, **kwargs})



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


def clip_grad_norm(grads: np.ndarray, max_norm: float) -> float:
    """Scale `grads` in place so that their global L2 norm is at most `max_norm`; returns the norm before.

    As torch.nn.utils.clip_grad_norm_: the factor is max_norm / (norm + 1e-6), applied only when below 1.
    The squares are summed in float64, a block at a time (no temporary the size of the buffer).
    """
    norm = math.sqrt(_sum_squares(grads))
    factor = max_norm / (norm + 1e-6)
    if factor < 1:
        grads *= np.float32(factor)
    return norm


_SQUARES_BLOCK = 1 << 16


def _sum_squares(a: np.ndarray) -> float:
    """sum(a^2) of a vector in float64, a block at a time (float32 accumulation loses digits)."""
    total = 0.0
    for start in range(0, a.size, _SQUARES_BLOCK):
        block = a[start:start + _SQUARES_BLOCK].astype(np.float64)
        total += float(np.dot(block, block))
    return total
