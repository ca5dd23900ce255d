"""Small batches on two threads at once (``infer_split``), and ResNet-20's inference against PyTorch.

Tolerances are relative to the largest output magnitude: 1e-5 against the float64 references (cnnc's own,
and PyTorch's functional ops in float64 for ResNet-20; measured there: 2e-7).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cnnc.pipeline import optimize
from cnnc.reference import reference_forward
from cnnc_runtime.engine import SplitChoice
from cnnc_runtime.parallel import shared_pool
from tests.reference import EXAMPLES, graph
from tests.runtime.test_batchnorm import assert_close, batch, everything, model, randomize

# Every kind of share: output channels split unevenly (33 = 17 + 16), a Winograd conv split by tile rows (c2 by
# F(4x4) on 32x32: 16 + 16 rows of every channel) and one by output channels (c4 by F(4x4) on 16x16: 16 tiles,
# fewer than its 33 channels, so that each thread transforms the input whole and reads half the Winograd
# weights), a strided 1x1 conv (im2col), a pool and
# an unfolded batchnorm by channels, add and gelu by floats, concat and softmax run whole by one thread, a
# dense layer with a batchnorm folded in; 12M multiply-adds per image, enough for infer_split.
SPLITNET = """
network splitnet {
    input image: 3x32x32
    a   = image -> conv(30, 3x3, pad=1) as c1 -> batchnorm as bn1 -> relu
    b   = a -> conv(33, 3x3, pad=1, bias=false) as c2 -> tanh
    s   = b -> conv(33, 1x1, stride=2) as c3
    p   = b -> maxpool(2x2) -> batchnorm as bn2
    r   = add(s, p) -> gelu -> conv(33, 3x3, pad=1) as c4
    k   = concat(r, p) -> avgpool(2x2)
    f   = k -> flatten -> dropout(0.5) -> dense(7) as fc1 -> batchnorm as bn3 -> relu
    out = f -> dense(5) as fc2 -> softmax
}
"""


def randomized(m, shared: bool = True):
    """`m` with random weights and statistics of a trained net's size (outputs neither saturated nor tiny), small
    batches pinned to infer_split (`shared`) or to one thread."""
    m.split_choice = SplitChoice(fixed=shared)
    randomize(m)
    for k, v in m.params.items():
        if k.endswith(".weight") and v.ndim > 1:
            v *= np.float32(np.sqrt(1.0 / np.prod(v.shape[1:])))
    return m


def test_a_network_of_every_share_kind_compiles_infer_split():
    assert model(SPLITNET).manifest["infer_parts"] == 2
    assert model((EXAMPLES / "lenet5.cnn").read_text()).manifest["infer_parts"] == 0  # too little work to share


@pytest.mark.parametrize("n", [1, 2, 7])
def test_small_batches_on_two_threads_match_the_reference(n):
    m = randomized(model(SPLITNET, threads=2))
    assert m._infer_split is not None
    x, _ = batch(m, n)
    want = reference_forward(graph(SPLITNET), everything(m), x)
    assert_close(m(x), want, 1e-5)
    one = model(SPLITNET, threads=1)
    assert one._infer_split is None
    for name, v in everything(m).items():
        everything(one)[name][...] = v
    assert_close(m(x), one(x), 1e-6)


# Residual blocks whose last conv does the add and its activation at inference (cnnc.passes.fold.fuse_residuals),
# one by each forward path: F(4x4) split by tile rows (32x32), F(2x2) split by output channels (8x8), a direct
# 5x5, a 1x1 on the im2col path, and one with no batchnorm.
RESIDUALS = """
network residuals {
    input image: 3x32x32
    x  = image -> conv(16, 3x3, pad=1) -> batchnorm -> relu
    a  = x -> conv(16, 3x3, pad=1) -> batchnorm -> relu -> conv(16, 3x3, pad=1) -> batchnorm
    b  = add(a, x) -> relu
    c  = b -> conv(16, 5x5, pad=2) -> batchnorm
    d  = add(c, b) -> tanh -> maxpool(4x4)
    e  = d -> conv(64, 1x1) -> batchnorm -> relu
    f  = e -> conv(64, 3x3, pad=1) -> batchnorm -> relu -> conv(64, 3x3, pad=1)
    g  = add(e, f) -> relu
    h  = g -> conv(64, 1x1)
    i  = add(h, g) -> global_avgpool -> flatten -> dense(5)
}
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_convs_that_do_their_blocks_add_match_the_reference(threads):
    g = graph(RESIDUALS)
    inf = optimize(graph(RESIDUALS)).graph["inference"]
    residual = {n: inf.nodes[n]["residual"] for n in inf if inf.nodes[n].get("residual") is not None}
    assert len(residual) == 4 and not any(inf.nodes[n]["op"] == "add" for n in inf)
    for shared in (True, False):
        m = randomized(model(RESIDUALS, threads=threads), shared)
        for n in (1, 2, 5):
            x, _ = batch(m, n)
            assert_close(m(x), reference_forward(g, everything(m), x), 1e-5)


def drive(choice: SplitChoice, calls: int, seconds) -> str:
    """`calls` calls as the runtime makes them (`seconds(shared)`: a call's time): the ways taken, s for shared
    and 1 for one thread."""
    ways = ""
    for _ in range(calls):
        way = choice.shared()
        ways += "s" if way else "1"
        choice.record(way, seconds(way))
    return ways


def test_the_faster_way_runs_and_the_other_is_tried_now_and_then():
    choice = SplitChoice()
    one_thread_faster = lambda shared: 2e-3 if shared else 1e-3  # noqa: E731
    # unmeasured: a probe of sharing, then one thread once
    assert drive(choice, SplitChoice.BURST + 1, one_thread_faster) == "s" * SplitChoice.BURST + "1"
    ways = drive(choice, 3 * (SplitChoice.PROBE + SplitChoice.BURST), one_thread_faster)
    # one thread is faster: shared only as a probe, BURST calls in a row after every PROBE - 1 one-thread calls
    assert re.findall("s+", ways) == ["s" * SplitChoice.BURST] * 3
    assert set(re.findall("(?<=s)1+(?=s)", ways)) == {"1" * (SplitChoice.PROBE - 1)}


def test_a_probe_times_only_its_last_calls_so_a_cold_core_does_not_lose_it():
    """A probe's first calls wake and warm the other core: on this VM shared calls after a run of one-thread
    calls took 700-1,000 us for several calls, then 245-250 us (one thread: 390-420)."""
    choice = SplitChoice()
    core = {"ones": 0, "shared": 0}  # one-thread calls in a row; shared calls since the other core last idled

    def seconds(shared):  # after a run of one-thread calls the other core is slow for BURST - TIMED shared calls
        if not shared:
            core["ones"] += 1
            core["shared"] = 0 if core["ones"] >= 3 else core["shared"]
            return 1e-3
        core["ones"], core["shared"] = 0, core["shared"] + 1
        return 0.5e-3 if core["shared"] > SplitChoice.BURST - SplitChoice.TIMED else 5e-3

    ways = drive(choice, SplitChoice.BURST + 1 + 2 * SplitChoice.PROBE, seconds)
    assert 5e-3 not in choice.times[True]  # the probe's warm calls counted, its cold first calls not
    assert "11" not in ways[SplitChoice.BURST:]  # sharing won at the first probe: one thread only as probes
    assert choice.shared() is True


def test_a_probe_forgets_the_way_s_older_times_so_a_change_of_load_is_followed():
    choice = SplitChoice()
    loaded = [True]
    seconds = lambda shared: (3e-3 if loaded[0] else 0.5e-3) if shared else 1e-3  # noqa: E731
    ways = drive(choice, 1 + SplitChoice.BURST + SplitChoice.PROBE, seconds)
    assert ways[SplitChoice.BURST:].startswith("1" * (SplitChoice.PROBE // 2))  # a busy second core: one thread
    loaded[0] = False
    ways = drive(choice, SplitChoice.PROBE + 2 * SplitChoice.BURST, seconds)
    assert ways.endswith("s" * SplitChoice.BURST)  # the next probe won (its older times forgotten), and sharing ran
    loaded[0] = True
    ways = drive(choice, SplitChoice.KEEP + SplitChoice.PROBE, seconds)
    assert ways[:SplitChoice.KEEP // 2 + 1] == "s" * (SplitChoice.KEEP // 2 + 1)  # sharing's own calls, timed,
    assert ways[SplitChoice.KEEP // 2 + 1:].startswith("1" * (SplitChoice.PROBE // 2))  # give it up: load is back


def test_calls_from_several_threads_race_on_the_choice_without_failing():
    """A model is used from several threads at once: a probe forgetting a way's times while another thread
    records one must not leave that thread a list to take a median of that is empty."""
    choice, errors = SplitChoice(), []

    def calls():
        try:
            for i in range(20_000):
                way = choice.shared()
                choice.record(way, (i % 7 + 1) * 1e-4)
        except Exception as e:  # noqa: BLE001 - the test's subject
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (the threads switch between any two bytecodes: the race shows in seconds)
    try:
        threads = [threading.Thread(target=calls) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert 0 < choice.seconds[True] < 1e-3 and 0 < choice.seconds[False] < 1e-3  # (medians of times recorded)


def test_a_probe_of_sharing_is_timed_without_its_wait_for_the_server_to_start():
    """The server leaves when idle, so a probe of sharing after a run of one-thread calls starts it: that wait is
    not part of sharing's time (timing it made one thread win for good once chosen)."""
    m = randomized(model(SPLITNET, threads=2))
    x, _ = batch(m, 1)
    want = m(x)
    pool = shared_pool(2)
    pool.run([lambda: None, lambda: None])  # (sends any server away)
    recorded = []
    m.split_choice = SplitChoice()
    m.split_choice.record = lambda shared, seconds: recorded.append((shared, seconds))
    waits = []
    run_served = pool.run_served
    pool.run_served = lambda *a: waits.append(run_served(*a)) or waits[-1]
    try:
        start = time.perf_counter()
        assert np.array_equal(m(x), want)  # the first call: shared, and a server had to start
        took = time.perf_counter() - start
    finally:
        del pool.run_served
    assert len(waits) == 1 and 0 < waits[0] < took
    assert recorded[0][0] is True and recorded[0][1] <= took - waits[0]
    assert pool.run_served(m._lib, lambda blk, seq: 1, None) == 0.0  # a server waited: no wait


@pytest.mark.parametrize("n,shared", [(3, True), (3, False), (40, False)])
def test_inference_sees_weights_and_statistics_written_into_views(n, shared):
    """The batchnorm coefficients are folded at every call and the Winograd weights kept between calls are
    checked against the weights' bits (c2 runs by Winograd: its whole layer, and each thread's share): an
    in-place write to a view counts at once, on every path (one image shared, a small batch on one thread, a
    batch split between threads)."""
    m = randomized(model(SPLITNET, threads=2), shared)
    assert m.manifest["ws_cache_floats"] > 0
    x, _ = batch(m, n)
    before = m(x)
    assert_close(before, reference_forward(graph(SPLITNET), everything(m), x), 1e-5)
    m.params["c1.weight"][0] *= -1.5
    m.params["c2.weight"][4, 7] *= -2.0  # (a row of the second thread's share too)
    m.params["c2.weight"][30, 0, 1, 1] += 0.5
    m.buffers["bn1.running_var"][...] += 2.0
    m.params["bn3.bias"][2] += 1.0
    want = reference_forward(graph(SPLITNET), everything(m), x)
    got = m(x)
    assert np.abs(got - before).max() > 1e-2
    assert_close(got, want, 1e-5)
    m.params["c2.weight"][4, 7] *= -0.5  # only c2, and back to where it was but for a factor
    assert_close(m(x), reference_forward(graph(SPLITNET), everything(m), x), 1e-5)


def test_a_weight_written_while_another_thread_infers_counts_once_the_write_returns():
    """Inference takes no lock, so a call may run while another thread writes a weight: that call's output may mix
    old and new weights, but the Winograd weights it keeps must be the transform of the copy it keeps, so every call
    after the write returns sees the new weight (not U of the old weight kept beside a copy of the new)."""
    m = randomized(model(SPLITNET, threads=2), shared=False)  # (one thread: no pool between the two threads)
    x, _ = batch(m, 1)
    w = m.params["c2.weight"]
    old, new = np.float32(w[4, 7, 1, 1]), np.float32(1.0 - 3.0 * w[4, 7, 1, 1])
    w[4, 7, 1, 1] = new
    want = m(x)
    stale = 0

    def flip(stop: threading.Event) -> None:
        while not stop.is_set():
            w[4, 7, 1, 1] = old
            w[4, 7, 1, 1] = new

    for _ in range(150):
        stop = threading.Event()
        writer = threading.Thread(target=flip, args=(stop,))
        writer.start()
        for _ in range(3):
            m(x)
        stop.set()
        writer.join()
        stale += not np.array_equal(m(x), want)
    assert stale == 0, f"{stale} of 150 calls after the write returned used the Winograd weights of the old weight"


def test_the_second_share_goes_to_a_pool_thread_waiting_in_native_code():
    """infer_split's part 1 is handed to a server on pool worker 1 (cnnc.codegen.handoff): the same outputs on
    every turn of its life (started, waiting, stopped by a batch through the pool, gone after its idle time,
    replaced by another model's), and from two Python threads at once."""
    from cnnc.codegen import handoff
    from cnnc_runtime.parallel import HANDOFF_INT64S, HANDOFF_STOP

    assert HANDOFF_INT64S >= handoff.INT64S and HANDOFF_STOP == handoff.STOP  # (the runtime's copy of the layout)
    m, other = randomized(model(SPLITNET, threads=2)), randomized(model(SPLITNET, threads=2))
    assert m.manifest["infer_handoff"] and m._split_handoff is not None
    pool = shared_pool(2)
    x1, _ = batch(m, 1)
    x9, _ = batch(m, 9)
    want1, want9 = (reference_forward(graph(SPLITNET), everything(m), x) for x in (x1, x9))
    first = m(x1)
    assert_close(first, want1, 1e-5)
    assert pool._served and pool._server_key is m._lib
    for _ in range(5):
        assert np.array_equal(m(x1), first)
    assert_close(m(x9), want9, 1e-5)  # a batch through pool.run: the server is told to stop first
    assert not pool._served
    assert np.array_equal(m(x1), first)
    deadline = time.monotonic() + 5
    while pool.handoff[handoff.STATE] != 0 and time.monotonic() < deadline:  # it leaves after its idle time
        time.sleep(0.01)
    assert pool.handoff[handoff.STATE] == 0
    assert np.array_equal(m(x1), first)  # (a new server)
    other_first = other(x1)
    assert pool._server_key is other._lib
    assert_close(other_first, reference_forward(graph(SPLITNET), everything(other), x1), 1e-5)
    assert np.array_equal(m(x1), first)
    results = [[], []]

    def calls(k: int) -> None:
        for _ in range(20):
            results[k].append(m(x1) if k == 0 else other(x1))

    threads = [threading.Thread(target=calls, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(np.array_equal(y, first) for y in results[0]) and len(results[0]) == 20
    assert all(np.array_equal(y, other_first) for y in results[1]) and len(results[1]) == 20



def test_ctrl_c_while_a_server_is_told_to_stop_leaves_no_stop_for_the_next_server():
    """Another model's shared call stops the server first (``Pool._stop_server``, not deferring signals); a
    Ctrl-C during its wait left ``stop`` set, and every later server of the first model left at once: its next
    call hung (20 calls took no time before, none returned in 15 s)."""
    from cnnc_runtime.parallel import HANDOFF_STOP

    m, other = randomized(model(SPLITNET, threads=2)), randomized(model(SPLITNET, threads=2))
    pool = shared_pool(2)
    x1, _ = batch(m, 1)
    first = m(x1)
    done = pool._done[1]

    class CtrlCInWait:  # the flag, but Ctrl-C comes as the stop starts to wait for the server
        def __getattr__(self, name: str):
            return getattr(done, name)

        def wait(self) -> None:
            pool._done[1] = done
            raise KeyboardInterrupt

    pool._done[1] = CtrlCInWait()
    with pytest.raises(KeyboardInterrupt):
        other(x1)
    pool._done[1] = done
    outputs = []
    caller = threading.Thread(target=lambda: outputs.extend(m(x1) for _ in range(20)), daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "batch-1 calls hung after an interrupted stop"
    assert len(outputs) == 20 and all(np.array_equal(y, first) for y in outputs)
    assert pool.handoff[HANDOFF_STOP] == 0


def _outputs_in_child(m, x: np.ndarray, results) -> None:
    results.put([m(x) for _ in range(3)])


# A batch-1 loop of the model for argv[1] seconds while another thread sends SIGINT every 0.5-5 ms (each interrupt
# raised inside a call, wherever Python runs between its native calls); prints what it saw.
INTERRUPTED = """
import json, os, signal, sys, threading, time
import numpy as np
from tests.runtime.test_batchnorm import batch, model
from tests.runtime.test_inference_split import SPLITNET, randomized

m = randomized(model(SPLITNET, threads=2), True)
x, _ = batch(m, 1)
want = m(x).copy()
stop = threading.Event()
armed = False


def interrupt(*_):
    if armed:  # (only inside a call: this loop's own bookkeeping is not what is tested)
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, interrupt)

def pester():
    rng = np.random.default_rng(0)
    while not stop.is_set():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(rng.uniform(0.0005, 0.005))

thread = threading.Thread(target=pester, daemon=True)
thread.start()
calls = caught = wrong = 0
start = time.monotonic()
while time.monotonic() - start < float(sys.argv[1]):
    try:
        armed = True
        out = m(x)
        armed = False
    except KeyboardInterrupt:
        armed = False
        caught += 1
        continue
    wrong += not np.array_equal(out, want)
    calls += 1
stop.set()
thread.join()
after = all(np.array_equal(m(x), want) for _ in range(5))
print(json.dumps({"calls": calls, "caught": caught, "wrong": wrong, "after": after}))
"""


def test_interrupts_during_shared_batch_1_calls_never_hang_or_corrupt_a_later_call():
    """Ctrl-C is raised as a native call returns: between posting a call to the server and running the caller's
    share it left the server waiting at a barrier for ever, and the next call hung (within 5 s of this loop).
    Now posting, both shares and the wait are one native call. Run in a child, so a hang fails the test."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", INTERRUPTED, "4"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["caught"] > 0 and seen["calls"] > 0
    assert seen["wrong"] == 0 and seen["after"]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
def test_a_process_forked_while_the_server_waits_shares_images_in_its_own_pool():
    """The server thread does not exist in a forked child: the child's pool (made anew) starts its own."""
    m = randomized(model(SPLITNET, threads=2))
    x1, _ = batch(m, 1)
    out = m(x1)  # the server waits now
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_outputs_in_child, args=(m, x1, results))
    child.start()
    try:
        got = results.get(timeout=30)  # (fails, never hangs, if the child waits for a server it does not have)
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    assert all(np.array_equal(y, out) for y in got)


torch = pytest.importorskip("torch")


def torch_resnet20_outputs(m, x: np.ndarray) -> np.ndarray:
    """examples/resnet20.cnn in float64 PyTorch (functional ops, batchnorm in eval mode) with `m`'s weights."""
    from tests.reference import torch_forward

    state = {k: torch.tensor(v, dtype=torch.float64) for k, v in everything(m).items()}
    x = m.prepare(x)  # (the train section's per-channel normalize)
    with torch.no_grad():
        return torch_forward(graph(RESNET20), state, torch.from_numpy(x.astype(np.float64))).numpy()


RESNET20 = (EXAMPLES / "resnet20.cnn").read_text()


@pytest.mark.slow  # (compiling ResNet-20: ~7 s)
@pytest.mark.parametrize("threads,shared", [(1, False), (2, False), (2, True)])
def test_resnet20_inference_matches_pytorch(threads, shared):
    """Batch 1 and 5 (on two threads: one image shared, or each small batch on one), 12 (images split between
    threads)."""
    m = randomized(model(RESNET20, threads=threads), shared)
    x, _ = batch(m, 12)
    want = torch_resnet20_outputs(m, x)
    for n in (1, 5, 12):
        assert_close(m(x[:n]), want[:n], 1e-5)
