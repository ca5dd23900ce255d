"""Memory planning: where every tensor of one image lives.

Each image owns one slot of the activation arena (``arena_floats`` floats,
64-byte aligned); image ``n``'s copy of a tensor is at
``arena + n * arena_floats + offset``. The network input and, for inference,
the output live in the caller's arrays instead.

- Inference reuses the slot of a tensor once its last reader and the node
  after it have run (first fit over offsets, in execution order): when two
  threads share an image (``infer_split``), a layer's share writing where the
  other thread's share of the layer before still reads would need a barrier
  between them (ResNet-20's adds, and the 1x1 shortcuts of its down blocks).
- Training keeps every forward tensor for the backward pass, plus a gradient
  slot for each tensor a gradient must flow through, the dropout masks, and
  the pre-activation of a fused layer whose activation's gradient reads its
  input (gelu, silu: the output does not determine the input).

``flatten`` is a view (its output is its input's slot), and so is ``dropout``
outside training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx

from cnnc.ir import execution_order
from cnnc.ops.activations import saves_input

ALIGN = 16  # floats: 64 bytes


def aligned(n: int) -> int:
    """`n` floats rounded up to whole 64-byte lines."""
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Tensor:
    """A tensor's place: which buffer (``x``, ``y`` or ``arena``), offset and per-image stride, in floats."""

    base: str
    offset: int
    stride: int
    size: int


@dataclass
class Plan:
    training: bool
    arena_floats: int = 0
    root: dict[str, str] = field(default_factory=dict)  # node -> node whose slot holds its output
    value: dict[str, Tensor] = field(default_factory=dict)  # root node -> forward tensor
    grad: dict[str, Tensor] = field(default_factory=dict)  # root node -> gradient tensor
    mask: dict[str, Tensor] = field(default_factory=dict)  # dropout node -> its mask
    pre: dict[str, Tensor] = field(default_factory=dict)  # training: fused layer -> its activation's input


def is_view(g: nx.DiGraph, name: str, training: bool) -> bool:
    op = g.nodes[name]["op"]
    return op == "flatten" or (op == "dropout" and not training)


def roots(g: nx.DiGraph, order: list[str], training: bool) -> dict[str, str]:
    root: dict[str, str] = {}
    for n in order:
        root[n] = root[g.nodes[n]["inputs"][0]] if is_view(g, n, training) else n
    return root


def gradient_tensors(g: nx.DiGraph) -> set[str]:
    """Tensors that receive a gradient in some loss's backward graph (the autodiff pass)."""
    out: set[str] = set()
    for loss, steps in g.graph["backward"].items():
        out.add(g.graph["loss_input"][loss])
        for step in steps:
            out.add(step.node)
            out.update(step.inputs)
    return out


def plan_memory(g: nx.DiGraph, training: bool) -> Plan:
    order = execution_order(g)
    plan = Plan(training=training)
    plan.root = roots(g, order, training)
    inp, out = g.graph["input"], g.graph["output"]
    size = {n: math.prod(g.nodes[n]["shape"]) for n in order}
    plan.value[inp] = Tensor("x", 0, size[inp], size[inp])
    out_root = plan.root[out]
    if training:
        offset = 0

        def take(n_floats: int) -> int:
            nonlocal offset
            at, offset = offset, offset + aligned(n_floats)
            return at

        for n in order:
            if plan.root[n] == n and n != inp:
                plan.value[n] = Tensor("arena", take(size[n]), 0, size[n])
            if g.nodes[n]["op"] == "dropout":
                plan.mask[n] = Tensor("arena", take(size[n]), 0, size[n])
            if saves_input(g.nodes[n].get("act", "none")):
                plan.pre[n] = Tensor("arena", take(size[n]), 0, size[n])
        # every loss writes the gradient of the tensor it reads, even when nothing trains
        for r in sorted({plan.root[t] for t in gradient_tensors(g)}, key=order.index):
            plan.grad[r] = Tensor("arena", take(size[r]), 0, size[r])
        plan.arena_floats = max(aligned(offset), ALIGN)
    else:
        last_use: dict[str, int] = {}
        for i, n in enumerate(order):
            for src in g.nodes[n]["inputs"]:
                last_use[plan.root[src]] = i
        live: dict[str, tuple[int, int]] = {}  # root -> (offset, floats)
        high = 0
        for i, n in enumerate(order):
            if plan.root[n] != n or n == inp:
                continue
            if n == out_root:
                plan.value[n] = Tensor("y", 0, size[n], size[n])
            else:
                need = aligned(size[n])
                at = 0
                for o, s in sorted(live.values()):
                    if at + need <= o:
                        break
                    at = max(at, o + s)
                live[n] = (at, need)
                high = max(high, at + need)
                plan.value[n] = Tensor("arena", at, 0, size[n])
            for r in [r for r in live if last_use.get(r, -1) < i and r != n]:
                del live[r]
        plan.arena_floats = max(aligned(high), ALIGN)
    stride = plan.arena_floats
    for table in (plan.value, plan.grad, plan.mask, plan.pre):
        for k, t in table.items():
            if t.base == "arena":
                table[k] = Tensor("arena", t.offset, stride, t.size)
    return plan
