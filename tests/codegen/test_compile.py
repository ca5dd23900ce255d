"""Turning a network's modules into object code: kernel sharing, the parallel compile and its failures."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import llvmlite.ir as ir
import numpy as np
import pytest

from cnnc.codegen import emit, target
from cnnc.codegen.module import build_module
from cnnc.codegen.target import emit_objects, host_target
from cnnc.errors import Diagnostics
from cnnc.pipeline import check_source, optimize
from cnnc_runtime.native import NativeLibrary, bundle

LENET = Path(__file__).resolve().parents[2] / "examples" / "lenet5.cnn"


def lenet_modules() -> list:
    """LeNet-5's entry module, then its kernels' sources (``KernelSource``: built when asked for)."""
    fused = optimize(check_source(LENET.read_text(), str(LENET), Diagnostics()))
    modules, _ = build_module(fused, host_target().vector_width)
    return modules


def calls(entry_ir: str, function: str) -> set[str]:
    body = entry_ir.split(f'define void @"{function}"', 1)[1].split("\n}", 1)[0]
    return set(re.findall(r'call void @"([^"]+)"', body))


def test_inference_calls_only_kernels_the_training_step_calls():
    entry = str(lenet_modules()[0])
    infer, step = calls(entry, "infer"), calls(entry, "step_cross_entropy")
    assert infer and infer <= step


def test_kernel_specs_are_all_distinct():
    names = [m.name for m in lenet_modules()[1:]]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("stem", ["lenet5", "mnist_modern", "resnet_tiny"])
def test_each_kernel_is_declared_as_its_body_defines_it(stem):
    """The entry module declares each kernel from its emitter stopped at its signature; the body built later
    (in whichever process compiles it) defines the same function type."""
    path = LENET.parent / f"{stem}.cnn"
    fused = optimize(check_source(path.read_text(), str(path), Diagnostics()))
    entry, *kernels = build_module(fused, host_target().vector_width)[0]
    for source in kernels:
        module = source.build()
        assert not module.get_global(source.name).is_declaration
        assert module.get_global(source.name).ftype == entry.get_global(source.name).ftype, source.name


@pytest.mark.parametrize("stem", ["lenet5", "mnist_modern", "resnet_tiny"])
def test_a_training_steps_calls_take_pointers_computed_beside_them(stem):
    """Every pointer a kernel call of a training step takes (activations, parameters, their gradients, batchnorm's
    sums) is computed in the call's own block: one computed before a chunk loop would be live across every call
    in it, and the register allocator's work grew with the square of a chain's length (2000 relus: 1.4 s of it)."""
    path = LENET.parent / f"{stem}.cnn"
    entry = build_module(optimize(check_source(path.read_text(), str(path), Diagnostics())),
                         host_target().vector_width)[0][0]
    steps = [fn for fn in entry.functions if fn.name.startswith("step_") and fn.blocks]
    calls = [(ins, block) for fn in steps for block in fn.blocks for ins in block.instructions
             if isinstance(ins, ir.CallInstr)]
    assert len(calls) > 10
    far = [(ins.callee.name, op) for ins, block in calls for op in ins.args
           if isinstance(op, ir.Instruction) and not isinstance(op, ir.PhiInstr) and op.parent is not block]
    assert not far  # (the chunk loops' counters, phis, are the only values from other blocks)


def test_a_kernels_signature_is_its_own_not_a_helpers_declared_first():
    def emit_with_helper(module, name, spec, width):
        _, hb, _ = emit.kernel(module, f"{name}.helper", ["x"])
        hb.ret_void()
        fn, b, _ = emit.kernel(module, name, ["x", "y", "scale_f32", "n0", "n1"])
        b.ret_void()
        return fn

    ftype = emit.signature(emit_with_helper, "k", None, 8)
    assert [str(t) for t in ftype.args] == ["ptr", "ptr", "float", "i64", "i64"]


def adder(i: int) -> ir.Module:
    """A module with one function: out[0] = i."""
    m = ir.Module(name=f"m{i}")
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [ir.PointerType()]), name=f"set{i}")
    b = ir.IRBuilder(fn.append_basic_block())
    b.store(ir.Constant(ir.FloatType(), float(i)), fn.args[0])
    b.ret_void()
    return m


def broken() -> ir.Module:
    """A module LLVM rejects: a block without a terminator."""
    m = ir.Module(name="broken")
    ir.Function(m, ir.FunctionType(ir.VoidType(), []), name="broken").append_basic_block()
    return m


def no_children_left() -> bool:
    try:
        return os.waitpid(-1, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def assert_each_sets_its_number(objects, t, n: int) -> None:
    """The bundled objects load, and function ``set{i}`` of each of the `n` adders writes i."""
    lib = NativeLibrary(bundle(objects), t.triple, t.cpu, t.features)
    out = np.zeros(1, dtype=np.float32)
    for i in range(n):
        lib.function(f"set{i}", [ctypes.c_void_p])(out.ctypes.data)
        assert out[0] == i


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_parallel_compile_gives_every_function(monkeypatch):
    """An object file per module, in the modules' order, whichever process compiled it: the same bytes as one
    process alone gives (ranks of an MPI job compare them)."""
    monkeypatch.setattr(target, "PARALLEL_MIN_COST", 0)
    t = host_target()
    objects = emit_objects([adder(i) for i in range(7)], t, processes=3)
    assert objects == emit_objects([adder(i) for i in range(7)], t, processes=1)
    assert_each_sets_its_number(objects, t, 7)
    assert no_children_left()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.parametrize("processes", [1, 3])
def test_the_callers_own_work_runs_once_here_while_the_children_compile(monkeypatch, processes):
    """`meanwhile` (the compile imports the runtime there) runs once, in this process, whether or not children
    compile beside it; an error in it stops the compile and leaves no child behind."""
    monkeypatch.setattr(target, "PARALLEL_MIN_COST", 0)
    calls = []
    t = host_target()
    objects = emit_objects([adder(i) for i in range(5)], t, processes=processes,
                           meanwhile=lambda: calls.append(os.getpid()))
    assert calls == [os.getpid()]
    assert_each_sets_its_number(objects, t, 5)

    def fails():
        raise ValueError("meanwhile failed")

    with pytest.raises(ValueError, match="meanwhile failed"):
        emit_objects([adder(i) for i in range(5)], t, processes=processes, meanwhile=fails)
    assert no_children_left()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.parametrize("bad", [0, 2, 4])
def test_parallel_compile_errors_surface_here(monkeypatch, bad):
    """Whichever process takes the bad module, the error is raised here, and no child is left."""
    monkeypatch.setattr(target, "PARALLEL_MIN_COST", 0)
    modules = [adder(i) for i in range(5)]
    modules[bad] = broken()
    with pytest.raises(RuntimeError, match="parsing error"):
        emit_objects(modules, host_target(), processes=3)
    assert no_children_left()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_parallel_compile_without_a_descriptor_for_its_work_pipe_compiles_here(monkeypatch):
    """No file descriptor left (EMFILE) for the pipe of tokens: the modules are compiled in this process, as when
    no child can be started, rather than the compile failing."""
    monkeypatch.setattr(target, "PARALLEL_MIN_COST", 0)

    def no_descriptors():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(target.os, "pipe", no_descriptors)
    t = host_target()
    objects = emit_objects([adder(i) for i in range(3)], t, processes=2)
    monkeypatch.undo()
    assert objects == emit_objects([adder(i) for i in range(3)], t, processes=1)  # (the same bytes)
    assert_each_sets_its_number(objects, t, 3)
    assert no_children_left()


class SlowKernel:
    """A kernel source whose body takes a while to build, counting the builds made in the process that asks."""

    tiled = False
    built_here: list[str] = []

    def __init__(self, i: int) -> None:
        self.i, self.name = i, f"set{i}"

    def build(self) -> ir.Module:
        time.sleep(0.05)
        SlowKernel.built_here.append(self.name)  # (a child's list is its own copy)
        m = adder(self.i)
        return m


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_kernel_bodies_are_built_by_the_processes_sharing_the_compile(monkeypatch):
    monkeypatch.setattr(target, "PARALLEL_MIN_COST", 0)
    monkeypatch.setattr(SlowKernel, "built_here", [])
    t = host_target()
    objects = emit_objects([SlowKernel(i) for i in range(12)], t, processes=2)
    assert 0 < len(SlowKernel.built_here) < 12  # this process built some, the child the others
    assert_each_sets_its_number(objects, t, 12)
    assert no_children_left()


def test_conv_and_dense_kernels_and_the_entry_points_take_the_short_pipeline(monkeypatch):
    """The kernels block and vectorise themselves, the entry points are calls and hand-vectorised loops; pooling's
    and the elementwise kernels' scalar loops still need O2."""
    chosen = {}
    passes = target.passes

    def spy(ref, tm, tiled: bool) -> None:
        for fn in ref.functions:
            if not fn.is_declaration:
                chosen[fn.name] = tiled
        passes(ref, tm, tiled)

    monkeypatch.setattr(target, "passes", spy)
    modules = lenet_modules()
    emit_objects(modules, host_target(), processes=1)
    kernel = {name.split(".")[1].rsplit("_", 1)[0]: tiled for name, tiled in chosen.items() if "." in name}
    assert {k for k, tiled in kernel.items() if tiled} == {
        "conv_forward", "conv_backward_data", "conv_backward_weights",
        "dense_forward", "dense_backward_data", "dense_backward_weights"}
    assert {k for k, tiled in kernel.items() if not tiled} >= {"pool_forward", "gather", "update"}
    entry = {name: tiled for name, tiled in chosen.items() if "." not in name}
    assert {"infer", "step_cross_entropy", "run_steps"} <= set(entry) and all(entry.values())


def test_zero_and_undefined_vectors_are_written_short():
    """llvmlite writes a vector constant lane by lane; zeros and undef are written ``zeroinitializer`` and
    ``undef`` instead (a sixth of LeNet-5's IR text, formatted by Python and parsed by LLVM)."""
    modules = lenet_modules()
    text = "".join(str(m if isinstance(m, ir.Module) else m.build()) for m in modules)
    assert "zeroinitializer" in text and "undef" in text
    assert "float 0.0, float 0.0" not in text and "float undef, float undef" not in text


def test_small_kernels_are_compiled_in_groups_with_the_same_code():
    """LLVM's fixed cost per module is paid once for a few small O2 kernels: each group is one object file, and
    every function in it is the code its kernel compiles to alone."""
    modules = lenet_modules()
    units = target.units(modules)
    groups = [u for u in units if isinstance(u, target.Group)]
    assert groups and len(units) < len(modules)
    assert all(1 < len(g) <= target.GROUP and not any(k.tiled for k in g) for g in groups)
    assert sum(len(g) for g in groups) + len(units) - len(groups) == len(modules)  # each module in one unit
    t = host_target()
    tm = t.machine()
    together = target.function_assembly(tm.emit_assembly(target._prepared(groups[-1], t, tm)))
    for kernel in groups[-1]:
        alone = target.function_assembly(tm.emit_assembly(target._prepared(kernel, t, tm)))
        assert len(together[kernel.name]) > 5 and together[kernel.name] == alone[kernel.name], kernel.name
    objects = emit_objects(modules, t, processes=1)
    assert len(objects) == len(units)
    lib = NativeLibrary(bundle(objects), t.triple, t.cpu, t.features)
    for kernel in (k for g in groups for k in g):
        lib.function(kernel.name, [])  # (found: KeyError otherwise)


THREADED_COMPILES = """
import threading, sys
import llvmlite.binding as llvm
import numpy as np
import cnnc
from cnnc.codegen import emit, target

target.PARALLEL_MIN_COST = 0  # every compile forks, however small
nets = [f"network n{i} {{ input x: 1x{8 + i}x{8 + i}  c = x"
        f" -> conv({2 + i}, 3x3) -> relu -> flatten  y = c -> dense(3) }}"
        for i in range(3)]
stop = threading.Event()

def busy_llvm():  # another user of llvmlite in this process, taking its lock all the time
    llvm.initialize_native_target()
    while not stop.is_set():
        llvm.parse_assembly("define i32 @f() { ret i32 0 }").verify()
        llvm.get_host_cpu_features()

def compile_net(i, out):
    model = cnnc.compile_string(nets[i], f"net{i}.cnn", cache=False)
    out[i] = model(np.ones((2, *model.input_shape), np.float32)).shape

MODEL_POOL
busy = threading.Thread(target=busy_llvm, daemon=True)
busy.start()
out = {}
threads = [threading.Thread(target=compile_net, args=(i, out)) for i in range(len(nets))]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert out == {i: (2, 3) for i in range(len(nets))}, out
stop.set()
print("ok")
"""

POOL_THREADS = """
pooled = cnnc.compile_string(nets[0], "pooled.cnn", cache=False)
pooled(np.ones((64, *pooled.input_shape), np.float32))  # a batch large enough to start the model's thread pool
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.parametrize("pool", [False, True], ids=["threads", "threads-and-model-pool"])
def test_compiles_on_several_threads_while_llvmlite_is_busy_never_hang(tmp_path, pool):
    """Forking while another thread holds llvmlite's lock left children waiting for ever, and the parent on them."""
    script = THREADED_COMPILES.replace("MODEL_POOL", POOL_THREADS if pool else "")
    env = {**os.environ, "CNNC_CACHE_DIR": str(tmp_path), "CNNC_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_stuck_child_is_killed_and_its_modules_compiled_here(monkeypatch):
    monkeypatch.setattr(target, "PARALLEL_MIN_COST", 0)
    monkeypatch.setattr(target, "CHILD_WAIT_MIN", 0.2)
    parent, prepared = os.getpid(), target._prepared

    def stuck_in_children(module, t, tm):
        while os.getpid() != parent:
            time.sleep(1)
        return prepared(module, t, tm)

    monkeypatch.setattr(target, "_prepared", stuck_in_children)
    t = host_target()
    objects = emit_objects([adder(i) for i in range(4)], t, processes=2)
    assert_each_sets_its_number(objects, t, 4)
    assert no_children_left()


INTERRUPTED = """
import os, sys, time
from pathlib import Path
from cnnc.codegen import emit, target
import cnnc

target.PARALLEL_MIN_COST = 0
prepared = target._prepared

def slow(module, t, tm):  # each process says who it is, then takes its time
    os.write(1, f"{os.getpid()}\\n".encode())  # (one write: the two processes' lines do not interleave)
    time.sleep(0.5)
    return prepared(module, t, tm)

target._prepared = slow
try:
    cnnc.compile(sys.argv[1], cache=False)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_an_interrupt_during_a_parallel_compile_leaves_no_process_behind(tmp_path):
    """Ctrl-C (SIGINT to this process only: the child is not told) while both processes compile: the interrupt
    comes through, and the child is killed and reaped."""
    env = {**os.environ, "CNNC_CACHE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(LENET)], stdout=subprocess.PIPE, text=True,
                            env=env)
    pids = set()
    while len(pids) < 2:  # this process's pid and its child's, each before its first module
        line = proc.stdout.readline()
        assert line, "the compile ended before both processes started on their modules"
        pids.add(int(line))
    assert proc.pid in pids
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert "interrupted" in out
    for pid in pids - {proc.pid}:
        with pytest.raises(ProcessLookupError):  # (reaped by the parent: not even a zombie left)
            os.kill(pid, 0)
