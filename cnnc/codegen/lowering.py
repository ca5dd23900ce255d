"""Each op's forward and backward as calls to specialised kernels: the codegen half of the op table.

An op names its kernel family (``OpDef.lowering``); ``FAMILIES`` maps each to
its two rules. ``FORWARD[op](ctx, name)`` emits the calls that compute node ``name``'s
output; ``BACKWARD[op](ctx, name)`` the calls that turn the gradient of its
output into gradients of its parameters and of its inputs (the op's gradient
rule). ``ctx`` is an ``Entry`` of ``cnnc.codegen.module``: it knows where
every tensor lives and dedupes kernels with identical specs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from cnnc.codegen.batchnorm import (
    emit_bn_apply,
    emit_bn_apply_add,
    emit_bn_backward,
    emit_bn_grad_sums,
    emit_bn_grad_sums_fan_out,
    emit_bn_stats,
)
from cnnc.codegen.conv import (
    emit_conv_backward_data,
    emit_conv_backward_weights,
    emit_conv_forward,
    weight_cache_floats,
)
from cnnc.codegen.dense import emit_dense_backward_data, emit_dense_backward_weights, emit_dense_forward
from cnnc.codegen.elementwise import (
    emit_activation_backward,
    emit_activation_forward,
    emit_copy,
    emit_dropout_backward,
    emit_dropout_forward,
    emit_fan_out,
    emit_softmax_backward,
    emit_softmax_forward,
    emit_sum,
)
from cnnc.codegen.pool import emit_pool_backward, emit_pool_forward, takes_activation_grad
from cnnc.codegen.specs import (
    BatchNormSpec,
    ConvSpec,
    CopySpec,
    DenseSpec,
    DropoutSpec,
    ElementwiseSpec,
    FanOutSpec,
    PoolSpec,
    ResidualSpec,
    SoftmaxSpec,
    SumSpec,
)
from cnnc.ir import covers_input as ir_covers_input
from cnnc.ir import execution_order
from cnnc.ops import OPS
from cnnc.ops.activations import act_args

# ---- specs from nodes --------------------------------------------------------


def conv_spec(ctx, name: str, accumulate: bool = False, fused: bool = True) -> ConvSpec:
    """The kernel spec of conv node `name`; ``fused=False`` leaves its fused activation out."""
    node = ctx.node(name)
    c, h, w = ctx.node(node["inputs"][0])["shape"]
    geo, a = node["geometry"], node["args"]
    pt, _, pl, _ = geo["pads"]
    spec = ConvSpec(
        c=c, h=h, w=w, o=geo["out"], oh=geo["oh"], ow=geo["ow"], kh=geo["k"][0], kw=geo["k"][1],
        sh=a["stride"][0], sw=a["stride"][1], pt=pt, pl=pl, groups=a["groups"], connect=a["connect"],
        dh=a["dilation"][0], dw=a["dilation"][1],
        bias=a["bias"], act=node.get("act", "none") if fused else "none",
        act_args=act_args(node.get("act_args", {})) if fused else (),
        x_stride=ctx.value(node["inputs"][0]).stride, y_stride=ctx.value(name).stride, accumulate=accumulate,
        winograd=ctx.g.graph.get("winograd", True), scale_at=_scale_at(ctx, name),
    )
    if node.get("residual") is not None:  # (the inference graph's, cnnc.passes.fold.fuse_residuals)
        spec = dataclasses.replace(spec, residual=True, r_stride=ctx.value(node["residual"]).stride)
    return cached(ctx, spec)


def cached(ctx, spec: ConvSpec) -> ConvSpec:
    """`spec` marked ``cached`` where the entry keeps Winograd weights between calls (inference) and its forward
    runs by Winograd."""
    keep = ctx.caches_weights and weight_cache_floats(dataclasses.replace(spec, cached=True), ctx.builder.vw) > 0
    return dataclasses.replace(spec, cached=keep)


def _scale_at(ctx, name: str) -> int:
    """How far after its bias a layer with a folded batchnorm finds that batchnorm's scale (0: no scale)."""
    scale = ctx.slots.get((name, "scale"))
    return scale.offset - ctx.slots[(name, "bias")].offset if scale is not None else 0


def covers_input(ctx, name: str) -> bool:
    """``cnnc.ir.covers_input`` of conv node `name` in `ctx`'s graph."""
    return ir_covers_input(ctx.g, name)


def dense_spec(ctx, name: str, accumulate: bool = False, fused: bool = True) -> DenseSpec:
    """The kernel spec of dense (or whole-input conv) node `name`; ``fused=False`` leaves its activation out."""
    node = ctx.node(name)
    return DenseSpec(
        f=_size(ctx, node["inputs"][0]), o=math.prod(node["shape"]), bias=node["args"]["bias"],
        act=node.get("act", "none") if fused else "none",
        act_args=act_args(node.get("act_args", {})) if fused else (),
        x_stride=ctx.value(node["inputs"][0]).stride, y_stride=ctx.value(name).stride, accumulate=accumulate,
        scale_at=_scale_at(ctx, name),
    )


def pool_spec(ctx, name: str, accumulate: bool = False) -> PoolSpec:
    node = ctx.node(name)
    c, h, w = ctx.node(node["inputs"][0])["shape"]
    geo = node["geometry"]
    pt, _, pl, _ = geo["pads"]
    kind = "max" if node["op"] == "maxpool" else "avg"
    return PoolSpec(
        kind=kind, c=c, h=h, w=w, oh=geo["oh"], ow=geo["ow"], kh=geo["k"][0], kw=geo["k"][1],
        sh=geo["stride"][0], sw=geo["stride"][1], pt=pt, pl=pl,
        x_stride=ctx.value(node["inputs"][0]).stride, y_stride=ctx.value(name).stride, accumulate=accumulate,
    )


def _size(ctx, name: str) -> int:
    return math.prod(ctx.node(name)["shape"])


# ---- forward -----------------------------------------------------------------


def forward_conv(ctx, name: str) -> None:
    if covers_input(ctx, name):
        return forward_dense(ctx, name)
    node = ctx.node(name)
    pre = ctx.plan.pre.get(name)
    spec = conv_spec(ctx, name, fused=pre is None)
    residual = [ctx.value(node["residual"])] if spec.residual else []
    ctx.call(ctx.kernel(emit_conv_forward, spec), ctx.value(node["inputs"][0]), ctx.param(name, "weight"),
             ctx.param(name, "bias"), pre or ctx.value(name), *residual, ctx.ws,
             *ctx.weight_cache(spec, (name, 0, spec.o)))
    _activate(ctx, name, pre)


def forward_dense(ctx, name: str) -> None:
    node = ctx.node(name)
    pre = ctx.plan.pre.get(name)
    fn = ctx.kernel(emit_dense_forward, dense_spec(ctx, name, fused=pre is None))
    ctx.call(fn, ctx.value(node["inputs"][0]), ctx.param(name, "weight"), ctx.param(name, "bias"),
             pre or ctx.value(name))
    _activate(ctx, name, pre)


def _activate(ctx, name: str, pre) -> None:
    """Training a layer whose fused activation's gradient reads the activation's input: that input was
    written to its own slot (``Plan.pre``), the activation runs from there."""
    if pre is None:
        return
    node, y = ctx.node(name), ctx.value(name)
    spec = ElementwiseSpec(size=_size(ctx, name), act=node["act"], act_args=act_args(node["act_args"]),
                           x_stride=pre.stride, y_stride=y.stride)
    ctx.call(ctx.kernel(emit_activation_forward, spec), pre, y)


def forward_pool(ctx, name: str) -> None:
    fn = ctx.kernel(emit_pool_forward, pool_spec(ctx, name))
    ctx.call(fn, ctx.value(ctx.node(name)["inputs"][0]), ctx.value(name))


def forward_activation(ctx, name: str) -> None:
    if name in ctx.fused_acts:
        return  # applied by the residual add before it (forward_add)
    node = ctx.node(name)
    x, y = ctx.value(node["inputs"][0]), ctx.value(name)
    spec = ElementwiseSpec(size=_size(ctx, name), act=node["op"], act_args=act_args(node["args"]),
                           x_stride=x.stride, y_stride=y.stride)
    ctx.call(ctx.kernel(emit_activation_forward, spec), x, y)


def forward_softmax(ctx, name: str) -> None:
    shape = ctx.node(name)["shape"]
    x, y = ctx.value(ctx.node(name)["inputs"][0]), ctx.value(name)
    spec = SoftmaxSpec(c=shape[0], hw=math.prod(shape[1:]), x_stride=x.stride, y_stride=y.stride)
    ctx.call(ctx.kernel(emit_softmax_forward, spec), x, y)


def dropout_spec(ctx, name: str, accumulate: bool = False) -> DropoutSpec:
    x, y = ctx.value(ctx.node(name)["inputs"][0]), ctx.value(name)
    return DropoutSpec(size=_size(ctx, name), p=ctx.node(name)["args"]["p"], x_stride=x.stride, y_stride=y.stride,
                       mask_stride=ctx.plan.mask[name].stride, accumulate=accumulate)


def forward_dropout(ctx, name: str) -> None:
    if not ctx.plan.training:
        return  # a view of its input
    fn = ctx.kernel(emit_dropout_forward, dropout_spec(ctx, name))
    ctx.call(fn, ctx.value(ctx.node(name)["inputs"][0]), ctx.value(name), ctx.plan.mask[name], ctx.seed_for(name),
             ctx.args["image0_i64"])


def _copy(ctx, src, dst, count: int, src_offset: int = 0, dst_offset: int = 0, accumulate: bool = False) -> None:
    spec = CopySpec(count=count, src_stride=src.stride, dst_stride=dst.stride, src_offset=src_offset,
                    dst_offset=dst_offset, accumulate=accumulate)
    ctx.call(ctx.kernel(emit_copy, spec), src, dst)


def sum_spec(ctx, name: str, count: int) -> SumSpec:
    """The first two inputs' add, with the activation an inference graph fused into it (then it has only two)."""
    node = ctx.node(name)
    a, b, y = ctx.value(node["inputs"][0]), ctx.value(node["inputs"][1]), ctx.value(name)
    return SumSpec(count=count, a_stride=a.stride, b_stride=b.stride, y_stride=y.stride,
                   act=node.get("act", "none"), act_args=act_args(node.get("act_args", {})))


def forward_add(ctx, name: str) -> None:
    """The first two inputs summed in one pass, any others added on; in training, a residual block's last
    batchnorm, the add and the activation after it in one pass (``residual_tail``)."""
    y = ctx.value(name)
    bn = ctx.residual.get(name)
    if bn is not None:
        other = next(src for src in ctx.node(name)["inputs"] if src != bn)
        act = residual_act(ctx, name)
        out = ctx.value(act) if act else y
        spec = _residual_spec(ctx, bn, act, x_stride=ctx.value(ctx.node(bn)["inputs"][0]).stride,
                              r_stride=ctx.value(other).stride, y_stride=out.stride)
        ctx.call(ctx.kernel(emit_bn_apply_add, spec), ctx.value(ctx.node(bn)["inputs"][0]),
                 ctx.bn_coef(bn, "scale"), ctx.bn_coef(bn, "shift"), ctx.value(other), out)
        if act:
            ctx.fused_acts.add(act)
        return
    inputs = [ctx.value(src) for src in ctx.node(name)["inputs"]]
    a, b = inputs[:2]
    ctx.call(ctx.kernel(emit_sum, sum_spec(ctx, name, y.size)), a, b, y)
    for src in inputs[2:]:
        _copy(ctx, src, y, y.size, accumulate=True)


def residual_tail(ctx, name: str) -> str | None:
    """The add that batchnorm `name` can be applied in, in training: the bn's only consumer, an add of two
    distinct tensors whose other input is computed before the bn, neither of them an output of the network
    or a loss's input. The bn's output is then never written, nor the add's when the activation after it
    runs in the same pass (``residual_act``)."""
    g, node = ctx.g, ctx.node(name)
    if not ctx.plan.training or node.get("act", "none") != "none" or name in ctx.plan.pre:
        return None
    outputs = {g.graph["output"], *g.graph.get("loss_input", {}).values()}
    consumers = list(g.successors(name))
    if len(consumers) != 1 or name in outputs:
        return None
    add = consumers[0]
    inputs = ctx.node(add)["inputs"]
    if ctx.node(add)["op"] != "add" or len(inputs) != 2 or add in outputs:
        return None
    other = inputs[0] if inputs[1] == name else inputs[1]
    order = execution_order(g)
    if ctx.plan.root[other] == ctx.plan.root[name] or order.index(other) > order.index(name):
        return None
    return add


def residual_act(ctx, add: str) -> str | None:
    """The activation applied within a residual add (``residual_tail``): its only consumer, when that
    activation's gradient reads its output (so the add's own output is needed by nothing)."""
    consumers = list(ctx.g.successors(add))
    if len(consumers) != 1:
        return None
    op = ctx.node(consumers[0])["op"]
    return consumers[0] if OPS[op].activation and OPS[op].act.grad_from == "output" else None


def _residual_spec(ctx, bn: str, act: str | None, **strides: int) -> ResidualSpec:
    shape = ctx.node(ctx.node(bn)["inputs"][0])["shape"]
    return ResidualSpec(c=shape[0], hw=math.prod(shape[1:]), act=ctx.node(act)["op"] if act else "none",
                        act_args=act_args(ctx.node(act)["args"]) if act else (), **strides)


def _channel_offsets(ctx, name: str) -> list[int]:
    """Where each concat input starts in the output, in floats of one image."""
    offsets, at = [], 0
    for src in ctx.node(name)["inputs"]:
        offsets.append(at)
        at += _size(ctx, src)
    return offsets


def forward_concat(ctx, name: str) -> None:
    y = ctx.value(name)
    for src, at in zip(ctx.node(name)["inputs"], _channel_offsets(ctx, name)):
        _copy(ctx, ctx.value(src), y, _size(ctx, src), dst_offset=at)


def batchnorm_spec(ctx, name: str, y, accumulate: bool = False, fused: bool = True) -> BatchNormSpec:
    """The kernel spec of batchnorm `name` whose output (or its gradient) is tensor `y`."""
    node = ctx.node(name)
    src = node["inputs"][0]
    shape = ctx.node(src)["shape"]
    dx = ctx.grad(src) if ctx.plan.training and ctx.plan.root[src] in ctx.plan.grad else None
    return BatchNormSpec(
        c=shape[0], hw=math.prod(shape[1:]), x_stride=ctx.value(src).stride, y_stride=y.stride,
        dx_stride=dx.stride if dx is not None else 0, act=node.get("act", "none") if fused else "none",
        act_args=act_args(node.get("act_args", {})) if fused else (), accumulate=accumulate)


def forward_batchnorm(ctx, name: str) -> None:
    """Training: the shard's partial sums, the reduction (a phase boundary), then the affine map with the
    batch's scale and shift. Inference (not folded): the affine map with the scale and shift that the
    ``fold`` entry point wrote in place of the weight and bias."""
    src = ctx.node(name)["inputs"][0]
    pre = ctx.plan.pre.get(name)
    y = pre or ctx.value(name)
    spec = batchnorm_spec(ctx, name, y, fused=pre is None)
    if ctx.plan.training:
        ctx.call(ctx.kernel(emit_bn_stats, spec), ctx.value(src), ctx.bn_partial(name), ctx.args["n0"])
        ctx.sync("forward", name)
        add = residual_tail(ctx, name)
        if add is not None:
            ctx.residual[add] = name  # applied by the add (forward_add)
            return
        scale, shift = ctx.bn_coef(name, "scale"), ctx.bn_coef(name, "shift")
    else:
        scale, shift = ctx.param(name, "weight"), ctx.param(name, "bias")
    ctx.call(ctx.kernel(emit_bn_apply, spec), ctx.value(src), scale, shift, y)
    _activate(ctx, name, pre)


def backward_batchnorm(ctx, name: str) -> None:
    """The shard's sum(dy) and sum(dy (x - mean)) (dy first taken through a fused activation, in place), the
    reduction (which also gives the weight and bias gradients), then dx through the batch statistics."""
    src = ctx.node(name)["inputs"][0]
    dy = ctx.grad(name)
    saved = ctx.plan.pre.get(name) or ctx.value(name)  # what the fused activation's gradient reads
    spec = dataclasses.replace(batchnorm_spec(ctx, name, dy), v_stride=saved.stride)
    if name not in ctx.bn_sums_done:  # (else the residual add's backward took them)
        ctx.call(ctx.kernel(emit_bn_grad_sums, spec), ctx.value(src), dy, ctx.bn_coef(name, "mean"),
                 ctx.bn_partial(name), saved, ctx.args["n0"])
    ctx.sync("backward", name)
    if ctx.wants_grad(src):
        fn = ctx.kernel(emit_bn_backward, batchnorm_spec(ctx, name, dy, ctx.accumulate(src), fused=False))
        ctx.call(fn, ctx.grad(name), ctx.value(src), *(ctx.bn_coef(name, k) for k in ("k", "cx", "cc")),
                 ctx.grad(src))


def nothing(ctx, name: str) -> None:
    """Views (flatten) and the input need no code."""


# ---- backward ----------------------------------------------------------------


def _fused_activation_grad(ctx, name: str) -> None:
    """dz = dy * act'(y), in place over dy, for a conv/dense with a fused activation (act'(z) from the
    pre-activation z when the activation's gradient reads its input)."""
    node = ctx.node(name)
    if node.get("act", "none") == "none" or name in ctx.act_grads_done:
        return
    saved, dy = ctx.plan.pre.get(name) or ctx.value(name), ctx.grad(name)
    spec = ElementwiseSpec(size=_size(ctx, name), act=node["act"], act_args=act_args(node["act_args"]),
                           x_stride=dy.stride, y_stride=saved.stride)
    ctx.call(ctx.kernel(emit_activation_backward, spec), saved, dy, dy)


def backward_conv(ctx, name: str) -> None:
    if covers_input(ctx, name):
        return backward_dense(ctx, name)
    node = ctx.node(name)
    src = node["inputs"][0]
    _fused_activation_grad(ctx, name)
    if ctx.trainable(name):
        fn = ctx.kernel(emit_conv_backward_weights, conv_spec(ctx, name))
        ctx.call(fn, ctx.value(src), ctx.grad(name), ctx.param(name, "weight", grad=True),
                 ctx.param(name, "bias", grad=True), ctx.ws)
    if ctx.wants_grad(src):
        fn = ctx.kernel(emit_conv_backward_data, conv_spec(ctx, name, ctx.accumulate(src)))
        ctx.call(fn, ctx.grad(name), ctx.param(name, "weight"), ctx.grad(src), ctx.ws)


def backward_dense(ctx, name: str) -> None:
    src = ctx.node(name)["inputs"][0]
    _fused_activation_grad(ctx, name)
    if ctx.trainable(name):
        fn = ctx.kernel(emit_dense_backward_weights, dense_spec(ctx, name))
        ctx.call(fn, ctx.value(src), ctx.grad(name), ctx.param(name, "weight", grad=True),
                 ctx.param(name, "bias", grad=True))
    if ctx.wants_grad(src):
        fn = ctx.kernel(emit_dense_backward_data, dense_spec(ctx, name, ctx.accumulate(src)))
        ctx.call(fn, ctx.grad(name), ctx.param(name, "weight"), ctx.grad(src))


def backward_pool(ctx, name: str) -> None:
    """dx of the pool; where each dx is stored once and the input is the only use of an activation fused into
    the layer before, dx leaves already multiplied by that activation's gradient (one pass over dx, not two)."""
    src = ctx.node(name)["inputs"][0]
    if ctx.wants_grad(src):
        spec = pool_spec(ctx, name, ctx.accumulate(src))
        act = ctx.node(src).get("act", "none")
        if (act != "none" and OPS[act].act.grad_from == "output" and src not in ctx.plan.pre
                and ctx.g.out_degree(src) == 1 and takes_activation_grad(spec)):
            spec = dataclasses.replace(spec, act=act, act_args=act_args(ctx.node(src)["act_args"]))
            ctx.act_grads_done.add(src)
        ctx.call(ctx.kernel(emit_pool_backward, spec), ctx.value(src), ctx.value(name), ctx.grad(name), ctx.grad(src))


def backward_activation(ctx, name: str) -> None:
    if name in ctx.fused_acts:
        return  # taken by the residual add's backward (backward_add)
    node = ctx.node(name)
    src = node["inputs"][0]
    if ctx.wants_grad(src):
        dy, dx = ctx.grad(name), ctx.grad(src)
        saved = ctx.value(src if OPS[node["op"]].act.grad_from == "input" else name)
        spec = ElementwiseSpec(size=_size(ctx, name), act=node["op"], act_args=act_args(node["args"]),
                               x_stride=dx.stride, y_stride=dy.stride, accumulate=ctx.accumulate(src),
                               v_stride=0 if saved.stride == dy.stride else saved.stride)
        ctx.call(ctx.kernel(emit_activation_backward, spec), saved, dy, dx)


def backward_softmax(ctx, name: str) -> None:
    src = ctx.node(name)["inputs"][0]
    if ctx.wants_grad(src):
        shape = ctx.node(name)["shape"]
        y, dx = ctx.value(name), ctx.grad(src)
        spec = SoftmaxSpec(c=shape[0], hw=math.prod(shape[1:]), x_stride=dx.stride, y_stride=y.stride,
                           accumulate=ctx.accumulate(src))
        ctx.call(ctx.kernel(emit_softmax_backward, spec), y, ctx.grad(name), dx)


def backward_dropout(ctx, name: str) -> None:
    src = ctx.node(name)["inputs"][0]
    if ctx.wants_grad(src):
        fn = ctx.kernel(emit_dropout_backward, dropout_spec(ctx, name, ctx.accumulate(src)))
        ctx.call(fn, ctx.plan.mask[name], ctx.grad(name), ctx.grad(src))


def backward_add(ctx, name: str) -> None:
    """dy into each input's gradient: two inputs of distinct tensors in one pass over dy; a residual add
    (``residual_tail``) also takes dy through its activation and gives its batchnorm's gradient sums."""
    if name in ctx.residual and _residual_backward(ctx, name):
        return
    dy = ctx.grad(name)
    wanting = [src for src in ctx.node(name)["inputs"] if ctx.wants_grad(src)]
    if len(wanting) == 2 and ctx.plan.root[wanting[0]] != ctx.plan.root[wanting[1]]:
        (a, b), (acc_a, acc_b) = (ctx.grad(s) for s in wanting), (ctx.accumulate(s) for s in wanting)
        spec = FanOutSpec(count=dy.size, dy_stride=dy.stride, a_stride=a.stride, b_stride=b.stride,
                          accumulate_a=acc_a, accumulate_b=acc_b)
        ctx.call(ctx.kernel(emit_fan_out, spec), dy, a, b)
        return
    for src in wanting:
        _copy(ctx, dy, ctx.grad(src), dy.size, accumulate=ctx.accumulate(src))


def _residual_backward(ctx, name: str) -> bool:
    """A residual add's backward in one pass (``ResidualSpec``) when both inputs want a gradient; else the
    activation's gradient alone into the add's (for the plain path after it), and False."""
    bn, act = ctx.residual[name], residual_act(ctx, name)
    other = next(src for src in ctx.node(name)["inputs"] if src != bn)
    dy = ctx.grad(act) if act else ctx.grad(name)
    saved = ctx.value(act) if act else dy
    if ctx.wants_grad(bn) and ctx.wants_grad(other):
        x, a, b = ctx.value(ctx.node(bn)["inputs"][0]), ctx.grad(other), ctx.grad(bn)
        spec = _residual_spec(ctx, bn, act, x_stride=x.stride, y_stride=dy.stride, v_stride=saved.stride,
                              a_stride=a.stride, b_stride=b.stride, accumulate_a=ctx.accumulate(other),
                              accumulate_b=ctx.accumulate(bn))
        ctx.call(ctx.kernel(emit_bn_grad_sums_fan_out, spec), x, dy, ctx.bn_coef(bn, "mean"), ctx.bn_partial(bn),
                 saved, a, b, ctx.args["n0"])
        ctx.bn_sums_done.add(bn)
        return True
    if act:
        node = ctx.node(act)
        spec = ElementwiseSpec(size=_size(ctx, act), act=node["op"], act_args=act_args(node["args"]),
                               x_stride=ctx.grad(name).stride, y_stride=dy.stride, accumulate=ctx.accumulate(name),
                               v_stride=0 if saved.stride == dy.stride else saved.stride)
        ctx.call(ctx.kernel(emit_activation_backward, spec), saved, dy, ctx.grad(name))
    return False


def backward_concat(ctx, name: str) -> None:
    dy = ctx.grad(name)
    for src, at in zip(ctx.node(name)["inputs"], _channel_offsets(ctx, name)):
        if ctx.wants_grad(src):
            _copy(ctx, dy, ctx.grad(src), _size(ctx, src), src_offset=at, accumulate=ctx.accumulate(src))


def backward_view(ctx, name: str) -> None:
    """A view shares its input's gradient slot: the consumers already wrote there."""


Rule = Callable[[object, str], None]

# kernel family (``OpDef.lowering``) -> (forward rule, backward rule)
FAMILIES: dict[str, tuple[Rule, Rule]] = {
    "input": (nothing, nothing),
    "conv": (forward_conv, backward_conv),
    "dense": (forward_dense, backward_dense),
    "pool": (forward_pool, backward_pool),
    "view": (nothing, backward_view),
    "activation": (forward_activation, backward_activation),
    "softmax": (forward_softmax, backward_softmax),
    "dropout": (forward_dropout, backward_dropout),
    "add": (forward_add, backward_add),
    "concat": (forward_concat, backward_concat),
    "batchnorm": (forward_batchnorm, backward_batchnorm),
}
FORWARD: dict[str, Rule] = {name: FAMILIES[op.lowering][0] for name, op in OPS.items()}
BACKWARD: dict[str, Rule] = {name: FAMILIES[op.lowering][1] for name, op in OPS.items()}
