"""The module builder: the LLVM code of one network, with its entry points.

Entry points (all sizes are baked in; the batch range ``[n0, n1)`` is not):

``infer(params, folded, arena, x, y, ws, n0, n1)``
    the inference forward pass: ``y = net(x)`` (dropout is the identity). It
    reads the trained parameters from ``params``; with batchnorm also the
    per-channel coefficients that ``fold`` writes into ``folded`` (layout
    ``inference_params`` in the manifest): a conv or dense with a batchnorm
    folded in computes ``(W x) * scale + bias`` in registers, so the weights are
    never copied, and a change to them (by any path) holds from the next call.
``infer_split(params, folded, arena, x, y, ws, bar, part_i64, n0, n1)``
    (networks of at least ``split.MIN_MACS`` multiply-adds per image) the same
    pass on images ``[n0, n1)`` run by ``split.PARTS`` threads at once, thread
    ``part`` doing its share of every layer, meeting at barriers in ``bar``
    (``cnnc.codegen.split``): small batches on every core.
``infer_claim(params, folded, arena, x, y, ws, counter, n0, n1)``
    (a network that is one direct convolution over whole output rows, ``conv.claim_bands``) the same pass
    run by every pool thread of a call at once on the same range, each taking the next image, and in the
    last images the next band of output rows, from the int64 at ``counter`` (zeroed before the call).
``fold(params, state, folded, n0, n1)``
    (networks with batchnorm) the inference coefficients from the trained
    parameters and the running statistics: for each batchnorm folded into the
    conv or dense before it, that layer's scale and bias (``scale = gamma /
    sqrt(var + eps)``, ``bias = (b - mean) * scale + beta``); the others, a
    per-channel scale and shift. A few floats per channel: negligible per call.
``step_cross_entropy`` / ``step_mse``
``(params, grads, arena, x, y, target, losses, ws, stats, bn, seed_i64, image0_i64, scale_f32, smooth_f32, n0, n1)``
    one training step's native work: the forward pass in training mode (dropout
    masks drawn from ``seed`` and each image's index ``image0 + n`` in the whole
    batch), ``y`` = the output, ``losses[n]`` = each image's
    loss, and ``grads += scale * d(sum of losses)/d(params)``. With
    cross-entropy a final softmax is skipped: the loss has its own. With
    batchnorm the step is split into phases ``step_LOSS``, ``step_LOSS_1``, ...
    at each batchnorm's reduction (``phases`` in the manifest): every shard
    runs a phase, writing its float64 partial sums to its own ``stats``, then the
    reduction writes the per-channel coefficients into ``bn``, read by every
    shard's next phase.
``phased_cross_entropy`` / ``phased_mse`` ``(ctx, thread_i64)``
    (networks with batchnorm) the phases of ``step_LOSS`` on one thread's shards and the reductions between
    them, called once by every pool thread, meeting at barriers (``cnnc.codegen.bnphases``; ``ctx``:
    ``cnnc_runtime.batchnorm.PHASED_FIELDS``); a data-parallel rank's runtime calls the phases one by one.

``jitter(x, seed_i64, image0_i64, sigma_f32, ws, n0, n1)``
    adds N(0, sigma^2) noise to a batch of inputs in place (training's input jitter), drawn
    from ``seed`` and each image's index ``image0 + n`` in the whole batch.
``augment(x, seed_i64, image0_i64, pad_i64, flip_i64, fill, ws, n0, n1)``
    crops (after zero padding) and flips a batch of inputs in place (``cnnc.codegen.augment``), drawn
    from ``seed`` and each image's index ``image0 + n`` in the whole batch.
``gather_u8`` / ``gather_f32`` ``(src, rows, x, geometry, norm, n0, n1)``
    gathers images ``[n0, n1)`` of a training batch from a stored uint8 or float32 set, prepared by the
    input rule (``cnnc.codegen.gather``).
``update_KIND`` ``(params, grads, mask, s1, s2, hyper, n0, n1)``, one per optimizer of the table
    one optimizer step over parameters ``[n0, n1)`` (``cnnc.codegen.optim``).
``run_cross_entropy`` / ``run_mse`` ``(ctx, thread_i64)``
    (networks without batchnorm) a run of training steps, called once by every pool thread: the gathers,
    ``augment``, ``jitter``, ``step_LOSS``, the gradient's sum, the L2 decay and ``update_KIND`` of each step,
    with barriers between the threads (``cnnc.codegen.runloop``; ``ctx``: ``cnnc_runtime.steploop``).

``params``/``grads`` are the flat parameter and gradient buffers (layout in the
manifest), ``arena`` the per-image activation slots, ``ws`` one thread's
scratch space for the conv kernels.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import llvmlite.ir as ir
import networkx as nx

from cnnc.codegen import emit, handoff, optim, split
from cnnc.codegen.augment import emit_augment
from cnnc.codegen.batchnorm import emit_bn_fold
from cnnc.codegen.bnphases import Reduction, emit_phased
from cnnc.codegen.conv import (
    claim_bands,
    conv_workspace_floats,
    emit_conv_forward,
    images_in_lanes,
    weight_cache_floats,
)
from cnnc.codegen.elementwise import emit_copy, emit_gaussian_noise
from cnnc.codegen.emit import I64, PTR
from cnnc.codegen.gather import ARGS as GATHER_ARGS
from cnnc.codegen.gather import emit_gather
from cnnc.codegen.instrument import Stopwatch, Timing
from cnnc.codegen.loss import emit_loss
from cnnc.codegen.lowering import BACKWARD, FORWARD, conv_spec, covers_input
from cnnc.codegen.plan import ALIGN, Plan, Tensor, aligned, plan_memory
from cnnc.codegen.runloop import emit_runs
from cnnc.codegen.specs import AugmentSpec, ConvSpec, CopySpec, DenseSpec, FoldSpec, GatherSpec, LossSpec, NoiseSpec
from cnnc.codegen.target import GLUE, TILED
from cnnc.ir import execution_order
from cnnc_runtime.artifact import BN_COEFS  # a batchnorm's per-channel float32 arrays in ``bn``: part of the format
from cnnc_runtime.batchnorm import PHASED_FIELDS
from cnnc_runtime.losses import LOSSES
from cnnc_runtime.steploop import FIELDS as RUN_FIELDS

STEP_ARGS = ["params", "grads", "arena", "x", "y", "target", "losses", "ws", "stats", "bn", "seed_i64", "image0_i64",
             "scale_f32", "smooth_f32", "n0", "n1"]
FOLD_ARGS = ["params", "state", "folded", "n0", "n1"]
INFER_ARGS = ["params", "folded", "arena", "x", "y", "ws", "n0", "n1"]
INFER_SPLIT_ARGS = ["params", "folded", "arena", "x", "y", "ws", "bar", "part_i64", "n0", "n1"]
INFER_CLAIM_ARGS = ["params", "folded", "arena", "x", "y", "ws", "counter", "n0", "n1"]
AUGMENT_ARGS = ["x", "seed_i64", "image0_i64", "pad_i64", "flip_i64", "fill", "ws", "n0", "n1"]
SMALL_OUTPUT = 4096  # floats per image: an inference output this small is copied out (see _like_training)
SHARE_MAX_FLOATS = 16384  # per image (64 KiB: 16 MiB per 256-image chunk) that sharing kernels may add
CHUNK_FLOATS = 65536  # a training step's image chunk: its largest tensor's floats (256 KiB; best of 64 KiB-1 MiB)
# how a training step runs each kernel (``Entry.flush``): per-image kernels a chunk of images at a time,
# the weight gradient (which sums over the images of its call) on the whole range after them. The loss and the
# copy of its input to y are per image too: chunked, a step without batchnorm is one pass of chunks from the
# forward to the last input gradient, the output and its gradient read from the cache (a 64-channel 32x32 conv's
# backward: ~1.5% less CPU on 2 threads; the same bits)
CHUNKED = {name: "chunk" for name in (
    "conv_forward", "bn_stats", "bn_apply", "bn_apply_add", "sum", "activation_forward", "copy", "loss",
    "conv_backward_data", "bn_backward", "bn_grad_sums", "bn_grad_sums_fan_out", "activation_backward", "fan_out")}
CHUNKED["conv_backward_weights"] = "after"


@dataclass(frozen=True)
class ParamSlot:
    name: str  # "c1.weight"
    layer: str
    kind: str  # "weight" or "bias"
    shape: tuple[int, ...]
    offset: int
    size: int
    buffer: str = "params"  # the entry argument it lives in: "params", or (inference) "folded"


def param_layout(g: nx.DiGraph, what: str = "params") -> tuple[list[ParamSlot], int]:
    """Every parameter's (``what="state"``: state's) place in its flat buffer, 64-byte aligned, in execution order."""
    slots, at = [], 0
    for n in execution_order(g):
        for kind, shape in g.nodes[n].get(what, {}).items():
            size = 1
            for d in shape:
                size *= d
            slots.append(ParamSlot(f"{n}.{kind}", n, kind, tuple(shape), at, size))
            at += aligned(size)
    return slots, max(at, ALIGN)


@dataclass(frozen=True)
class BatchNormSlot:
    """Where one batchnorm's partial sums (float64, in each shard's ``stats``) and coefficients (``bn``) live."""

    layer: str
    channels: int
    count: int  # values per channel of one image (its positions)
    stats: int  # offset in doubles: sum, then the second sum, `channels` each
    coefs: int  # offset in floats of BN_COEFS, `aligned(channels)` apart

    def coef(self, which: str) -> int:
        """Offset in ``bn`` of per-channel coefficient `which` (one of BN_COEFS)."""
        return self.coefs + BN_COEFS.index(which) * aligned(self.channels)


def bn_layout(g: nx.DiGraph) -> tuple[list[BatchNormSlot], int, int]:
    """The batchnorms' slots, the doubles of one shard's ``stats`` and the floats of ``bn``."""
    slots, stats, coefs = [], 0, 0
    for n in execution_order(g):
        if g.nodes[n]["op"] != "batchnorm":
            continue
        shape = g.nodes[g.nodes[n]["inputs"][0]]["shape"]
        c = shape[0]
        slots.append(BatchNormSlot(n, c, int(math.prod(shape[1:])), stats, coefs))
        stats += aligned(2 * c)
        coefs += len(BN_COEFS) * aligned(c)
    return slots, max(stats, ALIGN), max(coefs, ALIGN)


@dataclass(frozen=True)
class KernelSource:
    """One kernel's module, built when asked for: by whichever process compiles it (``cnnc.codegen.target``)."""

    name: str
    emitter: Callable[..., ir.Function]
    spec: object
    vector_width: int

    @property
    def tiled(self) -> bool:
        """Register-blocked and vectorised by its emitter (the conv and dense kernels): LLVM's short pipeline."""
        return isinstance(self.spec, (ConvSpec, DenseSpec))

    def build(self) -> ir.Module:
        own = ir.Module(name=self.name)
        self.emitter(own, self.name, self.spec, self.vector_width)
        if self.tiled:
            own.add_named_metadata(TILED)
        return own


class Builder:
    """Holds the entry-point module and the kernels declared so far (one function per distinct spec).

    Each kernel gets a module of its own, declared in the entry module and
    built later (``KernelSource``), so that processes compiling in parallel
    each build and optimise their share of them.
    """

    def __init__(self, g: nx.DiGraph, vector_width: int, profile: bool = False) -> None:
        self.g = g
        self.vw = vector_width
        self.module = ir.Module(name=g.graph["network"])
        self.stopwatch = Stopwatch(self.module) if profile else None  # the profiling build (cnnc.codegen.instrument)
        self.kernel_sources: list[KernelSource] = []
        self._kernels: dict[tuple, ir.Function] = {}
        self.chunked: dict[str, str] = {}  # kernel name -> how a training step runs it (CHUNKED)
        self.in_lanes: set[str] = set()  # chunked kernels that run vw images at a time (conv.images_in_lanes)
        self.ws_floats = 0  # scratch one thread needs: the largest conv kernel's workspace
        # inference keeps each layer's Winograd weights between calls in a region of its own, in front of `ws`
        # (the runtime allocates ``ws_cache_floats`` floats before the pointer it passes): key -> (start, floats)
        self.cache_regions: dict[tuple, tuple[int, int]] = {}
        self.cache_floats = 0
        self.slots, self.param_floats = param_layout(g)
        self.slot = {(s.layer, s.kind): s for s in self.slots}
        self.state_slots, self.state_floats = param_layout(g, "state")
        self.bn_slots, self.stats_doubles, self.bn_floats = bn_layout(g)
        self.bn = {s.layer: s for s in self.bn_slots}

    def kernel(self, emitter, spec) -> ir.Function:
        key = (emitter.__name__, spec)
        if key not in self._kernels:
            name = f"{self.g.graph['network']}.{emitter.__name__.removeprefix('emit_')}_{len(self._kernels)}"
            self.kernel_sources.append(KernelSource(name, emitter, spec, self.vw))
            if emitter.__name__.removeprefix("emit_") in CHUNKED:
                self.chunked[name] = CHUNKED[emitter.__name__.removeprefix("emit_")]
            if isinstance(spec, ConvSpec) and images_in_lanes(emitter.__name__, spec, self.vw):
                self.in_lanes.add(name)
            self._kernels[key] = ir.Function(self.module, emit.signature(emitter, name, spec, self.vw), name=name)
            if isinstance(spec, ConvSpec):
                self.ws_floats = max(self.ws_floats, aligned(conv_workspace_floats(spec, self.vw)))
        return self._kernels[key]


class Late(ABC):
    """An argument of ``Entry.call`` computed from the entry's arguments where the call is emitted
    (``Entry._values``)."""

    @abstractmethod
    def at(self, b: ir.IRBuilder, args: dict[str, ir.Value]) -> ir.Value:
        """The value, emitted by `b` at the call."""


@dataclass(frozen=True)
class Pointer(Late):
    """Element `offset` of the entry's argument `base` (parameters, their gradients, batchnorm's sums)."""

    base: str
    offset: int
    etype: ir.Type = emit.F32
    name: str = ""  # (the value's name in the IR: "c1.weight")

    def at(self, b: ir.IRBuilder, args: dict[str, ir.Value]) -> ir.Value:
        return b.gep(args[self.base], [emit.i64(self.offset)], source_etype=self.etype, inbounds=True,
                     name=self.name)


@dataclass(frozen=True)
class Seed(Late):
    """A dropout layer's 64-bit seed: the step's seed xor a constant of the layer's own."""

    mix: int

    def at(self, b: ir.IRBuilder, args: dict[str, ir.Value]) -> ir.Value:
        return b.xor(args["seed_i64"], ir.Constant(I64, self.mix))


class Entry:
    """One entry-point function being emitted: resolves tensors and parameters to pointers."""

    def __init__(self, builder: Builder, plan: Plan, name: str, args: list[str], g: nx.DiGraph | None = None,
                 slots: dict | None = None, caches_weights: bool = False) -> None:
        self.builder = builder
        self.caches_weights = caches_weights  # inference: conv kernels keep their Winograd weights (ConvSpec.cached)
        self.g = builder.g if g is None else g
        self.slots = builder.slot if slots is None else slots
        self.plan = plan
        self.name, self.arg_names = name, args
        self.fn, self.b, self.args = emit.kernel(builder.module, name, args)
        self.ws = self.args.get("ws")
        self._written: set[str] = set()
        self.step = None  # the autodiff Step being emitted
        self.written: dict[str, tuple[int, list]] = {}  # infer_split: node -> (its place, each part's spans written)
        self.syncs: list[dict] = []  # the reductions that end each phase but the last
        self.act_grads_done: set[str] = set()  # fused activations whose gradient a pool's backward applied
        self.residual: dict[str, str] = {}  # training: add -> the batchnorm it applies (lowering.residual_tail)
        self.fused_acts: set[str] = set()  # activations applied by the residual add before them
        self.bn_sums_done: set[str] = set()  # batchnorms whose gradient sums a residual add's backward took
        self.timing = Timing(builder.stopwatch, name) if builder.stopwatch else None
        self._pending: list[tuple[ir.Function, tuple, int]] = []  # calls of the chunk loop to come
        self._after: list[tuple[ir.Function, tuple]] = []  # whole-range calls to follow that loop
        if self.timing:
            self.timing.start(self.b)

    def sync(self, kind: str, layer: str) -> None:
        """End this phase at `layer`'s reduction (``kind``: ``"forward"`` or ``"backward"``); go on in the next."""
        self.flush()
        if self.timing:
            self.timing.pause(self.b)
        self.b.ret_void()
        self.syncs.append({"kind": kind, "layer": layer})
        self.fn, self.b, self.args = emit.kernel(self.builder.module, f"{self.name}_{len(self.syncs)}",
                                                 self.arg_names)
        self.ws = self.args.get("ws")
        if self.timing:
            self.timing.start(self.b)

    def timed(self, phase: str, layer: str):
        """A block whose code is `layer`'s `phase`: counted apart in the profiling build, nothing otherwise."""
        if self.timing is None:
            return nullcontext()
        return self.timing.region(lambda: self.b, phase, layer, self.g, self.step)

    def bn_partial(self, layer: str) -> Pointer:
        """This shard's float64 partial sums of batchnorm `layer`."""
        return Pointer("stats", self.builder.bn[layer].stats, ir.DoubleType())

    def bn_coef(self, layer: str, which: str) -> Pointer:
        """Batchnorm `layer`'s reduced per-channel coefficient `which` (one of BN_COEFS)."""
        return Pointer("bn", self.builder.bn[layer].coef(which))

    def node(self, name: str) -> dict:
        return self.g.nodes[name]

    def value(self, name: str) -> Tensor:
        return self.plan.value[self.plan.root[name]]

    def grad(self, name: str) -> Tensor:
        return self.plan.grad[self.plan.root[name]]

    def wants_grad(self, name: str) -> bool:
        """Whether the step being emitted sends a gradient into input `name` (decided by autodiff)."""
        return name in self.step.inputs

    def trainable(self, name: str) -> bool:
        return self.step.params

    def accumulate(self, name: str) -> bool:
        """Whether the next gradient written into `name`'s slot must add to what is there."""
        root = self.plan.root[name]
        if root in self._written:
            return True
        self._written.add(root)
        return False

    def param(self, layer: str, kind: str, grad: bool = False) -> Pointer | ir.Value:
        slot = self.slots.get((layer, kind))
        if slot is None:
            return ir.Constant(PTR, None)
        return Pointer("grads" if grad else slot.buffer, slot.offset, name=slot.name)

    def seed_for(self, name: str) -> Seed:
        """A distinct 64-bit seed per dropout layer, derived from the step's seed."""
        index = list(self.g.nodes).index(name) + 1
        return Seed((index * 0x9E3779B97F4A7C15) % (1 << 63))

    def kernel(self, emitter, spec) -> ir.Function:
        return self.builder.kernel(emitter, spec)

    def weight_cache(self, spec: ConvSpec, key: tuple) -> list[ir.Value]:
        """The `cache` argument of a conv forward of `spec` (none unless ``spec.cached``): the region kept for
        `key` (a layer and the rows of its output channels a kernel computes), in front of this thread's `ws`."""
        if not spec.cached:
            return []
        floats = weight_cache_floats(spec, self.builder.vw)
        regions = self.builder.cache_regions
        if key not in regions:
            regions[key] = (self.builder.cache_floats, floats)
            self.builder.cache_floats += aligned(floats)
        start, size = regions[key]
        assert size == floats, f"cache region {key} taken by kernels of different sizes"
        return [self.b.gep(self.args["ws"], [emit.i64(-(start + aligned(size)))], source_etype=emit.F32)]

    def pointer(self, t: Tensor) -> ir.Value:
        return emit.gep(self.b, self.args[t.base], t.offset) if t.offset else self.args[t.base]

    def call(self, fn: ir.Function, *args) -> None:
        """Call kernel `fn` on the images [n0, n1) of this entry; in a training step (not profiled), a run of
        per-image kernels is gathered and run a chunk of images at a time, and a weight gradient after them
        (``flush``)."""
        how = self.builder.chunked.get(fn.name)
        if how and self.plan is not None and self.plan.training and self.timing is None:
            if how == "chunk":
                self._pending.append((fn, args, max([a.size for a in args if isinstance(a, Tensor)], default=1)))
            else:
                self._after.append((fn, args))
            return
        self.flush()
        self.b.call(fn, [*self._values(args), self.args["n0"], self.args["n1"]])

    def _values(self, args: tuple) -> list[ir.Value]:
        """A call's arguments, each pointer computed here, just before the call that takes it: one computed before
        a chunk loop would be live across every call in it (the register allocator's work then grew with the
        square of a long chain's length)."""
        return [self.pointer(a) if isinstance(a, Tensor) else a.at(self.b, self.args) if isinstance(a, Late) else a
                for a in args]

    def flush(self) -> None:
        """Emit the gathered calls: each chunk of images through all of the per-image kernels in turn, so that
        what one writes the next reads from the L2 cache, not memory (a shard of ResNet-20's first stage is
        2 MiB a tensor), then the weight gradients on the whole range (their sums over the images of a call
        set their bits; nothing in a step's pass writes their inputs after their layer's turn). Each image's
        values do not depend on the range of its call: the results are those of calls in program order."""
        pending, after, self._pending, self._after = self._pending, self._after, [], []
        b, n0, n1 = self.b, self.args["n0"], self.args["n1"]
        if pending:
            step = max(1, CHUNK_FLOATS // max(size for _, _, size in pending))
            if any(fn.name in self.builder.in_lanes for fn, _, _ in pending):  # whole groups of vw images
                step = -(-step // self.builder.vw) * self.builder.vw
            with emit.for_range(b, n0, n1, step, name="chunk") as c0:
                c1 = b.add(c0, emit.i64(step))
                c1 = b.select(b.icmp_signed("<", c1, n1), c1, n1, name="chunk.end")
                for fn, args, _ in pending:
                    b.call(fn, [*self._values(args), c0, c1])
        for fn, args in after:
            b.call(fn, [*self._values(args), n0, n1])


def build_module(g: nx.DiGraph, vector_width: int,
                 profile: bool = False) -> tuple[list[ir.Module | KernelSource], dict]:
    """Emit the network's code: the entry-point module first, then one source per kernel (``KernelSource``: its
    module is built when asked for), and the layout facts.

    ``profile``: the profiling build (``cnnc.codegen.instrument``), whose regions ``facts["profile"]`` lists.
    """
    builder = Builder(g, vector_width, profile)
    order = execution_order(g)
    train_plan = plan_memory(g, training=True)
    inf = g.graph.get("inference", g)  # (folded batchnorms, fused adds: cnnc.passes.fold)
    infer_plan = _like_training(plan_memory(inf, training=False), train_plan, inf.graph["output"])
    infer_where, folded_slots, folded_floats = inference_layout(builder, inf)

    entry = Entry(builder, infer_plan, "infer", INFER_ARGS, inf, infer_where, caches_weights=True)
    for n in execution_order(inf):
        with entry.timed("forward", n):
            FORWARD[inf.nodes[n]["op"]](entry, n)
    out_value = entry.value(inf.graph["output"])
    y = Tensor("y", 0, out_value.size, out_value.size)
    copy_out = None
    if out_value.base != "y":  # the output is a view of the input, or small (_like_training): copy it out
        def copy_out(entry: Entry) -> None:
            entry.call(builder.kernel(emit_copy, _copy_spec(out_value, y)), out_value, y)

        with entry.timed("output", inf.graph["output"]):
            copy_out(entry)
    entry.b.ret_void()
    parts = 0
    if g.graph["totals"]["total_macs"] >= split.MIN_MACS:  # (in the profiling build too: its layers are timed)
        shared = Entry(builder, infer_plan, "infer_split", INFER_SPLIT_ARGS, inf, entry.slots, caches_weights=True)
        split.emit_split_entry(shared, execution_order(inf), copy_out, (split.span(out_value), split.span(y)))
        handoff.emit_handoff(builder.module, shared.fn)
        parts = split.PARTS

    claims = _emit_claim(builder, entry, infer_plan, inf)

    if builder.bn_slots:
        _emit_fold(builder, inf, infer_where)
    phases = {loss: _emit_step(builder, train_plan, order, loss) for loss in LOSSES}

    size = infer_plan.value[g.graph["input"]].size  # jitter: Gaussian noise on a batch of inputs, in place
    jitter = Entry(builder, infer_plan, "jitter", ["x", "seed_i64", "image0_i64", "sigma_f32", "ws", "n0", "n1"])
    jitter.call(builder.kernel(emit_gaussian_noise, NoiseSpec(size=size, x_stride=size)), jitter.args["x"],
                jitter.args["seed_i64"], jitter.args["image0_i64"], jitter.args["sigma_f32"])
    jitter.b.ret_void()

    shape = tuple(g.nodes[g.graph["input"]]["shape"])  # augment: crop and flip a batch of images in place
    c, h, w = shape if len(shape) == 3 else (1, 1, shape[0])
    augment = Entry(builder, infer_plan, "augment", AUGMENT_ARGS)
    augment.call(builder.kernel(emit_augment, AugmentSpec(c, h, w, x_stride=size)),
                 *(augment.args[k] for k in AUGMENT_ARGS[:-2]))
    augment.b.ret_void()
    builder.ws_floats = max(builder.ws_floats, aligned(size))  # (augment keeps one image there)

    for kind, byte in (("u8", True), ("f32", False)):  # a training batch from the stored set, by the input rule
        gather = Entry(builder, infer_plan, f"gather_{kind}", GATHER_ARGS)
        gather.call(builder.kernel(emit_gather, GatherSpec(c, h, w, byte)), *(gather.args[k] for k in GATHER_ARGS[:-2]))
        gather.b.ret_void()

    for kind in optim.constants():
        fn, b, _ = emit.kernel(builder.module, f"update_{kind}", optim.ARGS)
        b.call(builder.kernel(optim.emit_update, kind), list(fn.args))
        b.ret_void()

    if not builder.bn_slots:  # (batchnorm's steps are phases, with reductions between them)
        emit_runs(builder.module, sorted(optim.constants()), builder.vw, g, builder.stopwatch)
    else:
        for loss, syncs in phases.items():
            _emit_phased(builder, loss, syncs)

    facts = {
        "param_floats": builder.param_floats,
        "params": builder.slots,
        "arena_infer": infer_plan.arena_floats,
        "infer_parts": parts,
        "infer_handoff": parts == 2,
        "infer_claim": claims,
        "arena_train": train_plan.arena_floats,
        "ws_floats": builder.ws_floats,
        "ws_cache_floats": builder.cache_floats,
        "updates": optim.constants(),  # each loop's constants, in order
        "state": builder.state_slots,
        "state_floats": builder.state_floats,
        "inference_params": folded_slots if builder.bn_slots else None,
        "inference_floats": folded_floats,
        "batchnorm": builder.bn_slots,
        "stats_doubles": builder.stats_doubles,
        "bn_floats": builder.bn_floats,
        "phases": phases,
        "run_fields": [] if builder.bn_slots else list(RUN_FIELDS),  # (the ctx layout run_LOSS reads)
        "phased_fields": list(PHASED_FIELDS) if builder.bn_slots else [],  # (and phased_LOSS)
        "profile": builder.stopwatch.finish() if builder.stopwatch else None,
    }
    builder.module.add_named_metadata(GLUE)
    return [builder.module, *builder.kernel_sources], facts


def _emit_claim(builder: Builder, entry: Entry, plan: Plan, inf: nx.DiGraph) -> bool:
    """``infer_claim`` where the network is one convolution that ``conv.claim_bands`` allows; whether it was.

    A batch split by images between threads ends when the slower share
    does, and two equal shares end some 50-300 us apart on this VM (a 64->64
    conv on 32x32 images takes ~700 us an image); here every thread takes
    the next image, and near the end the next band of an image's rows, until
    none is left, so they end within a band of each other.
    """
    order = [n for n in execution_order(inf) if inf.nodes[n]["op"] != "input"]
    if builder.stopwatch or len(order) != 1 or inf.nodes[order[0]]["op"] != "conv":
        return False
    name = order[0]
    if (covers_input(entry, name) or entry.plan.pre.get(name) is not None or entry.value(name).base != "y"
            or inf.nodes[name].get("residual") is not None):
        return False
    spec = dataclasses.replace(conv_spec(entry, name), claim=True)
    if spec.cached or claim_bands(spec, builder.vw) is None:
        return False
    claim = Entry(builder, plan, "infer_claim", INFER_CLAIM_ARGS, inf, entry.slots)
    args = (claim.value(inf.nodes[name]["inputs"][0]), claim.param(name, "weight"), claim.param(name, "bias"),
            claim.value(name), claim.ws)
    claim.b.call(builder.kernel(emit_conv_forward, spec),
                 [*claim._values(args), claim.args["counter"], claim.args["n0"], claim.args["n1"]])
    claim.b.ret_void()
    return True


def _like_training(plan: Plan, train: Plan, output: str) -> Plan:
    """The inference `plan` laid out so that inference calls the training pass's forward kernels, when that is cheap.

    Kernels bake in per-image strides, so the inference arena gets the
    training one's per-image stride (the offsets unchanged), and a small
    output is written to a free slot of it and copied out, as the training
    step copies it, instead of straight into ``y``. Inference then compiles no
    kernels of its own: about a quarter less LLVM work (LeNet-5). The wider
    slots cost memory (numpy backs large arrays with huge pages, so the gaps
    become resident), hence only when they add at most SHARE_MAX_FLOATS per image.
    """
    stride = max(train.arena_floats, plan.arena_floats)
    root = plan.root[output]
    out = plan.value[root]
    if out.base == "y" and out.size <= SMALL_OUTPUT:
        stride = max(stride, plan.arena_floats + aligned(out.size))
    if stride - plan.arena_floats > SHARE_MAX_FLOATS:
        return plan
    if out.base == "y" and out.size <= SMALL_OUTPUT:
        plan.value[root] = Tensor("arena", plan.arena_floats, 0, out.size)
    for table in (plan.value, plan.grad, plan.mask):
        for k, t in table.items():
            if t.base == "arena":
                table[k] = Tensor("arena", t.offset, stride, t.size)
    plan.arena_floats = stride
    return plan


def _copy_spec(src: Tensor, dst: Tensor) -> CopySpec:
    return CopySpec(count=src.size, src_stride=src.stride, dst_stride=dst.stride)


def inference_layout(builder: Builder, inf: nx.DiGraph) -> tuple[dict[tuple[str, str], ParamSlot], list[ParamSlot],
                                                                 int]:
    """Where inference reads each parameter of the inference graph `inf`, the ``folded`` slots and their floats.

    Weights and biases as trained are read from ``params`` where they are.
    ``fold`` writes the rest into ``folded``: a layer with a batchnorm folded
    in gets its ``bias`` and, right after it, its ``scale``; an unfolded
    batchnorm its scale (``weight``) and shift (``bias``).
    """
    where: dict[tuple[str, str], ParamSlot] = {}
    folded: list[ParamSlot] = []
    at = 0
    for n in execution_order(inf):
        node = inf.nodes[n]
        if node["op"] == "batchnorm":
            kinds = ("weight", "bias")
        elif node.get("bn") is not None:
            kinds = ("bias", "scale")
            where[(n, "weight")] = builder.slot[(n, "weight")]
        else:
            where.update({(n, kind): builder.slot[(n, kind)] for kind in node.get("params", {})})
            continue
        o = node["shape"][0]
        for kind in kinds:
            slot = ParamSlot(f"{n}.{kind}", n, kind, (o,), at, o, "folded")
            folded.append(slot)
            where[(n, kind)] = slot
            at += aligned(o)
    return where, folded, max(at, ALIGN)


def _emit_fold(builder: Builder, inf: nx.DiGraph, where: dict[tuple[str, str], ParamSlot]) -> None:
    """fold: each batchnorm's per-channel coefficients (`where`, in ``folded``) from the trained parameters and
    the running statistics."""
    entry = Entry(builder, None, "fold", FOLD_ARGS)
    state = {(s.layer, s.kind): s for s in builder.state_slots}

    def at(base: str, slot: ParamSlot | None) -> ir.Value:
        return ir.Constant(PTR, None) if slot is None else emit.gep(entry.b, entry.args[base], slot.offset)

    for n in execution_order(inf):
        node = inf.nodes[n]
        bn = n if node["op"] == "batchnorm" else node.get("bn")
        if bn is None:
            continue
        own = n != bn  # a conv or dense with `bn` folded in, else an unfolded batchnorm
        spec = FoldSpec(o=node["shape"][0], eps=float(builder.g.nodes[bn]["args"]["eps"]),
                        bias=bool(own and node["own_bias"]))
        entry.call(builder.kernel(emit_bn_fold, spec), at("params", builder.slot.get((n, "bias")) if own else None),
                   at("params", builder.slot[(bn, "weight")]), at("params", builder.slot[(bn, "bias")]),
                   at("state", state[(bn, "running_mean")]), at("state", state[(bn, "running_var")]),
                   at("folded", where[(n, "scale" if own else "weight")]), at("folded", where[(n, "bias")]))
    entry.b.ret_void()


def _emit_phased(builder: Builder, loss: str, syncs: list[dict]) -> None:
    """phased_LOSS: the phases of step_LOSS and the batchnorm reductions between them, one call per thread."""
    module, g = builder.module, builder.g
    state = {(s.layer, s.kind): s.offset for s in builder.state_slots}
    reductions = []
    for sync in syncs:
        layer, slot = sync["layer"], builder.bn[sync["layer"]]
        args = g.nodes[layer]["args"]
        reductions.append(Reduction(
            kind=sync["kind"], channels=slot.channels, count=slot.count, stats=slot.stats,
            coefs={k: slot.coef(k) for k in BN_COEFS}, weight=builder.slot[(layer, "weight")].offset,
            bias=builder.slot[(layer, "bias")].offset, running_mean=state[(layer, "running_mean")],
            running_var=state[(layer, "running_var")], eps=float(args["eps"]), momentum=float(args["momentum"])))
    phases = [module.get_global(f"step_{loss}" + (f"_{k}" if k else "")) for k in range(len(syncs) + 1)]
    emit_phased(module, loss, phases, reductions, g, builder.stopwatch)


def _emit_step(builder: Builder, plan: Plan, order: list[str], loss: str) -> list[dict]:
    """step_LOSS: forward in training mode, copy the loss's input to y, the loss, then the autodiff steps."""
    g = builder.g
    entry = Entry(builder, plan, f"step_{loss}", STEP_ARGS)
    start = g.graph["loss_input"][loss]
    forward = order if start == g.graph["output"] else [n for n in order if n != g.graph["output"]]
    for n in forward:
        with entry.timed("forward", n):
            FORWARD[g.nodes[n]["op"]](entry, n)
    out, dx = entry.value(start), entry.grad(start)
    y = Tensor("y", 0, out.size, out.size)
    with entry.timed("loss", start):
        entry.call(builder.kernel(emit_copy, _copy_spec(out, y)), out, y)
        entry.accumulate(start)
        spec = LossSpec(kind=loss, k=out.size, x_stride=out.stride, dx_stride=dx.stride)
        entry.call(builder.kernel(emit_loss, spec), out, entry.args["target"], dx, entry.args["losses"],
                   entry.args["scale_f32"], entry.args["smooth_f32"])
    for step in g.graph["backward"][loss]:
        entry.step = step
        with entry.timed("backward", step.node):
            BACKWARD[g.nodes[step.node]["op"]](entry, step.node)
    entry.flush()
    entry.b.ret_void()
    return entry.syncs


__all__ = ["KernelSource", "build_module", "param_layout"]
