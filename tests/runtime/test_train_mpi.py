"""``fit`` in every rank of an MPI job trains one model: the same weights as one process at the same global batch.

Each test runs a small job (``mpiexec -n 2``, one thread per rank) on the first images of the bundled MNIST,
with dropout, input jitter, crop and flip on, so that every random draw must follow the image's global index,
and the gradient's norm clipped, which must happen to the whole batch's gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnc_runtime.data import load_dataset
from cnnc_runtime.train import TrainingStopped
from tests.runtime.mpijob import mpiexec_path, needs_mpi, run_command, run_job

pytestmark = needs_mpi

REPO = Path(__file__).resolve().parents[2]
IMAGES = 615  # 9 batches of 64 and one of 39: the last is shared out unevenly (20 + 19)

# Shared by the jobs and by the single-process runs they are compared with (exec'd here).
PRELUDE = '''
import os, sys
import numpy as np
import cnnc

NET = """
network small {
    input image: 1x28x28
    c = image -> conv(4, 5x5) -> relu -> maxpool(2x2)
    h = c -> flatten -> dense(32) -> relu -> dropout(0.3)
    logits = h -> dense(10)
}
"""
SETTINGS = dict(batch=64, optimizer="adam", lr=0.001, jitter=0.2, crop=2, flip=True, clip_norm=0.5, seed=3,
                progress=False)


def data(path="data.npz"):
    with np.load(path) as d:
        return d["x"], d["y"]


def model():
    return cnnc.compile_string(NET)
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A directory holding data.npz: the first IMAGES training images of the bundled MNIST, uint8 as stored."""
    work = tmp_path_factory.mktemp("mpi")
    mnist = load_dataset(REPO / "examples" / "data" / "mnist", raw=True)["train"]
    np.savez(work / "data.npz", x=mnist.x[:IMAGES], y=mnist.y[:IMAGES])
    return work


def single_process(work: Path, **settings) -> np.ndarray:
    """The flat weights one process gets with PRELUDE's model, data and settings (overridden by `settings`)."""
    ns: dict = {}
    exec(PRELUDE, ns)
    model = ns["model"]()
    x, y = ns["data"](work / "data.npz")
    model.fit(x, y, **{**ns["SETTINGS"], **settings})
    return model.flat_params.copy()


def job(work: Path, body: str, timeout: float = 120):
    r = run_job(work, PRELUDE + body, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_two_ranks_train_the_weights_one_process_trains(work):
    """20 Adam steps (2 epochs, a cosine schedule), dropout, jitter, crop and flip, the gradient's norm clipped:
    the replicas stay identical and match one process bit for bit. (Each rank computes one of the two shards one
    process cuts a batch into, ``engine.part_shards``, and the all-reduce of two ranks is the one addition one
    process makes; any other share would match within float32 rounding, < 1e-5.)"""
    job(work, """
from cnnc_runtime.distributed import world
m = model()
x, y = data()
m.fit(x, y, epochs=2, schedule="cosine", **SETTINGS)
np.save(f"weights{world().rank}.npy", m.flat_params)
""")
    rank0, rank1 = np.load(work / "weights0.npy"), np.load(work / "weights1.npy")
    np.testing.assert_array_equal(rank0, rank1)
    np.testing.assert_array_equal(rank0, single_process(work, epochs=2, schedule="cosine"))


SHARDED = """
from cnnc_runtime import distributed, steploop
distributed.SHARDED_MIN_BYTES = {min_bytes}  # (0: this small network's update sharded too)
sharded = []
made = steploop.NativeRun.__init__
def noted(self, *args, **kwargs):
    made(self, *args, **kwargs)
    sharded.append(self.shared is not None)
steploop.NativeRun.__init__ = noted
"""


@pytest.mark.parametrize("sharded", [False, True])
def test_two_ranks_run_their_steps_natively_and_train_the_weights_one_process_trains(work, sharded):
    """Without clipping (a global norm, which keeps the per-step path) each rank runs its steps natively in runs,
    the run calling back for the ranks' sum between the backward pass and the update; with the update sharded
    (the ranks share a machine: each updates its part of one copy of the weights) or not; L2 decay on top:
    still one process's weights bit for bit."""
    job(work, SHARDED.format(min_bytes=0 if sharded else "1 << 40") + """
from cnnc_runtime.distributed import world
m = model()
runs = []
plain = m.run_steps
m.run_steps = lambda *args: (runs.append(1), plain(*args))
x, y = data()
m.fit(x, y, epochs=2, schedule="cosine", **{**SETTINGS, "clip_norm": None, "weight_decay": 1e-3})
assert runs, "no native run"
assert sharded == [""" + str(sharded) + """], sharded
np.save(f"native{world().rank}.npy", m.flat_params)
""")
    rank0, rank1 = np.load(work / "native0.npy"), np.load(work / "native1.npy")
    np.testing.assert_array_equal(rank0, rank1)
    np.testing.assert_array_equal(rank0, single_process(work, epochs=2, schedule="cosine", clip_norm=None,
                                                        weight_decay=1e-3))


def test_a_nan_stops_every_rank_where_one_process_stops(work):
    """An update that overflows (SGD at lr 1e30) in the sharded native runs: every rank stops at the step one
    process stops at, with its message, its weights (the snapshot from before the update, kept in the ranks'
    shared memory) and the whole batch's gradient (gathered from the ranks' parts of the sum)."""
    settings = {"clip_norm": None, "optimizer": "sgd", "lr": 1e30}
    job(work, SHARDED.format(min_bytes=0) + f"""
from cnnc_runtime.distributed import world
from cnnc_runtime.train import TrainingStopped
m = model()
x, y = data()
try:
    m.fit(x, y, epochs=2, **{{**SETTINGS, **{settings!r}}})
    raise SystemExit("training did not stop")
except TrainingStopped as e:
    open(f"stop{{world().rank}}.txt", "w").write(str(e))
assert sharded == [True], sharded
np.save(f"stop_weights{{world().rank}}.npy", m.flat_params)
np.save(f"stop_grads{{world().rank}}.npy", m.flat_grads)
""")
    ns: dict = {}
    exec(PRELUDE, ns)
    alone = ns["model"]()
    x, y = ns["data"](work / "data.npz")
    with pytest.raises(TrainingStopped) as stopped:
        alone.fit(x, y, epochs=2, **{**ns["SETTINGS"], **settings})
    assert "became" in str(stopped.value)
    for rank in (0, 1):
        assert (work / f"stop{rank}.txt").read_text() == str(stopped.value)
        np.testing.assert_array_equal(np.load(work / f"stop_weights{rank}.npy"), alone.flat_params)
        np.testing.assert_array_equal(np.load(work / f"stop_grads{rank}.npy"), alone.flat_grads)


def test_native_runs_report_the_losses_and_accuracies_the_per_step_path_reports(work):
    """A run's losses, right predictions and interrupts ride along with each step's gradient sum (one collective
    a step, none between runs): each epoch's loss and accuracy are the per-step path's bits on every rank (which
    adds them up after each step), and one process's up to the grouping of the float64 loss sums (< 1e-12)."""
    job(work, """
import json
from cnnc_runtime.distributed import world
x, y = data()
seen = {}
for native in (True, False):
    m = model()
    m.native_runs = native
    history = m.fit(x, y, epochs=2, **{**SETTINGS, "clip_norm": None})
    seen[native] = [(e.loss, e.accuracy, e.steps) for e in history.epochs]
open(f"history{world().rank}.json", "w").write(json.dumps(seen))
""")
    histories = [json.loads((work / f"history{rank}.json").read_text()) for rank in (0, 1)]
    assert histories[0] == histories[1] and histories[0]["true"] == histories[0]["false"]
    ns: dict = {}
    exec(PRELUDE, ns)
    alone = ns["model"]()
    x, y = ns["data"](work / "data.npz")
    epochs = alone.fit(x, y, epochs=2, **{**ns["SETTINGS"], "clip_norm": None}).epochs
    for (loss, accuracy, steps), e in zip(histories[0]["true"], epochs, strict=True):
        assert (accuracy, steps) == (e.accuracy, e.steps)
        assert loss == pytest.approx(e.loss, rel=1e-12)


@pytest.mark.slow
# (the per-step path; native runs; native runs with the update sharded)
@pytest.mark.parametrize("clip_norm,sharded", [(0.5, False), (None, False), (None, True)])
def test_resuming_under_mpi_continues_exactly(work, clip_norm, sharded):
    job(work, SHARDED.format(min_bytes=0 if sharded else "1 << 40") + f"""
SETTINGS["clip_norm"] = {clip_norm}
from cnnc_runtime.distributed import world
x, y = data()
whole = model()
whole.fit(x, y, epochs=2, **SETTINGS)
first = model()
first.fit(x, y, epochs=1, checkpoint="run.ckpt", **SETTINGS)
resumed = model()
resumed.fit(x, y, epochs=2, resume="run.ckpt", **SETTINGS)
np.save(f"whole{{world().rank}}.npy", whole.flat_params)
np.save(f"resumed{{world().rank}}.npy", resumed.flat_params)
assert (sharded and all(sharded)) if {sharded} else not any(sharded), sharded
""")
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(work / f"resumed{rank}.npy"), np.load(work / f"whole{rank}.npy"))


def test_only_rank_0_writes_files(work):
    """Every file a rank opens for writing (or renames into place) is recorded by an audit hook."""
    job(work, """
import sys
from cnnc_runtime.distributed import world
written = []
def audit(event, args):
    if event == "open" and isinstance(args[0], str) and not args[0].endswith(".written"):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
            written.append(os.path.basename(args[0]))
    elif event in ("os.rename", "os.replace"):
        written.append("rename " + os.path.basename(args[1]))
sys.addaudithook(audit)
m = model()
x, y = data()
m.fit(x, y, epochs=2, checkpoint="w.ckpt", log="w.jsonl", validation=0.1, **SETTINGS)
open(f"rank{world().rank}.written", "w").write("\\n".join(written))
""")
    assert (work / "rank1.written").read_text() == ""
    rank0 = (work / "rank0.written").read_text().splitlines()
    assert "rename w.ckpt" in rank0 and "w.jsonl" in rank0
    assert len(Path(work / "w.jsonl").read_text().splitlines()) == 2  # one line per epoch, not one per rank


def failing_job(work: Path, body: str):
    """A job one of whose ranks fails: it must end, all of it, non-zero and within 30 s."""
    t0 = time.monotonic()
    r = run_job(work, PRELUDE + body, timeout=60)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 30
    return r


def test_a_rank_with_a_bad_file_ends_the_job_with_its_message(work):
    """Rank 1's labels are out of range (its file only): it fails while rank 0 waits for it at the start."""
    r = failing_job(work, """
from cnnc_runtime.distributed import world
m = model()
x, y = data()
if world().rank == 1:
    y = y + 10
m.fit(x, y, epochs=50, **SETTINGS)
""")
    assert "rank 1 of 2: failed, ending the job: ValueError: label" in r.stderr


@pytest.mark.slow
def test_a_rank_that_raises_mid_training_ends_the_job(work):
    r = failing_job(work, """
from cnnc_runtime.distributed import world
m = model()
x, y = data()
if world().rank == 1:
    steps, plain = [], m.gradients
    def failing(*args, **kwargs):
        steps.append(1)
        if len(steps) == 15:
            raise RuntimeError("something broke in step 15")
        return plain(*args, **kwargs)
    m.gradients = failing
m.fit(x, y, epochs=50, **SETTINGS)
""")
    assert "rank 1 of 2: failed, ending the job: Traceback" in r.stderr
    assert "RuntimeError: something broke in step 15" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("clip_norm,sharded", [(0.5, False), (None, False), (None, True)])
def test_a_rank_killed_mid_training_ends_the_job(work, clip_norm, sharded):
    """On the per-step path (clipping), or inside a native run (without), where its peer waits in the ranks' sum
    the run called back for (or, the update sharded, in a meeting): the launcher ends that one too."""
    failing_job(work, SHARDED.format(min_bytes=0 if sharded else "1 << 40") + f"""
import signal, threading
from cnnc_runtime.distributed import world
m = model()
x, y = data()
if world().rank == 1:
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGKILL)).start()
m.fit(x, y, epochs=1000, **{{**SETTINGS, "clip_norm": {clip_norm}}})
""")


@pytest.mark.slow
def test_ranks_given_different_data_are_stopped_at_the_start(work):
    r = failing_job(work, """
from cnnc_runtime.distributed import world
m = model()
x, y = data()
if world().rank == 1:
    x, y = x[::-1].copy(), y[::-1].copy()
m.fit(x, y, epochs=1, **SETTINGS)
""")
    assert "the ranks of this MPI job differ in their training data: rank 1 disagrees with rank 0" in r.stderr


CLI_NET = """network small {
    input image: 1x28x28
    c = image -> conv(4, 5x5) -> relu -> maxpool(2x2)
    logits = c -> flatten -> dense(10)
}
train {
    loss cross_entropy
    optimizer adam(lr=0.001)
    batch 64
    epochs 2
}
"""


@pytest.mark.slow
def test_cnnc_train_under_mpiexec_prints_and_writes_once(work):
    """`mpiexec -n 2 cnnc train`: one progress report, one weights file, the test split evaluated once."""
    with np.load(work / "data.npz") as d:
        np.savez(work / "split.npz", x=d["x"][:500], y=d["y"][:500], x_test=d["x"][500:], y_test=d["y"][500:])
    (work / "small.cnn").write_text(CLI_NET)
    r = run_command(work, [sys.executable, "-m", "cnnc", "train", "small.cnn", "--data", "split.npz", "-o", "w.npz",
                           "--log", "m.jsonl"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("training small on split.npz (500 images)") == 1 and ", 2 MPI ranks" in r.stdout
    assert r.stdout.count("epoch 1/2") == r.stdout.count("epoch 2/2") == 1
    assert r.stdout.count("test: loss") == 1
    assert len((work / "m.jsonl").read_text().splitlines()) == 2
    with np.load(work / "w.npz") as w:
        assert set(w.files) == {"c.weight", "c.bias", "logits.weight", "logits.bias"}


@pytest.mark.slow
def test_cnnc_train_with_a_bad_file_on_one_rank_ends_the_job(work):
    (work / "small.cnn").write_text(CLI_NET)
    t0 = time.monotonic()
    # rank 1 is told to read a file that is not there: it fails before training, rank 0 waits at the start-up check
    r = subprocess.run([mpiexec_path(), "-n", "1", sys.executable, "-m", "cnnc", "train", "small.cnn", "--data",
                        "data.npz", "--epochs", "1", ":", "-n", "1", sys.executable, "-m", "cnnc", "train",
                        "small.cnn", "--data", "missing.npz", "--epochs", "1", "-o", "other.npz",
                        "--checkpoint", "other.ckpt"], capture_output=True, text=True, cwd=work, timeout=60,
                       env={**os.environ, "CNNC_THREADS": "1"})
    assert r.returncode != 0
    assert "rank 1 of 2: failed, ending the job: UsageError: cnnc train:" in r.stderr and "missing.npz" in r.stderr
    assert time.monotonic() - t0 < 30


# Batchnorm on maps and on a vector: every rank normalizes with the statistics of the whole global batch.
BATCHNORM = '''
NET = """
network normed {
    input image: 1x28x28
    c = image -> conv(4, 5x5, bias=false) -> batchnorm -> relu -> maxpool(2x2)
    h = c -> flatten -> dense(32, bias=false) -> batchnorm -> relu -> dropout(0.3)
    logits = h -> dense(10)
}
"""
'''


def test_two_ranks_train_a_batchnorm_network_as_one_process_does(work):
    """20 steps (the last batch of each epoch shared 20 + 19), with dropout, jitter, crop, flip and clipping:
    weights and running statistics match one process (measured: the same bits, as each rank runs one of the
    shards one process runs), and the replicas are identical."""
    job(work, BATCHNORM + """
from cnnc_runtime.distributed import world
from cnnc_runtime.batchnorm import Reducer
m = model()
if world().rank == 1:  # rank 0's running statistics (and weights) are what every rank starts from
    m.flat_state[...] = 0.5
x, y = data()
m.fit(x, y, epochs=2, **SETTINGS)
assert type(m.statistics.reducer) is Reducer  # (fit puts the reducer back)
np.save(f"bn_weights{world().rank}.npy", m.flat_params)
np.save(f"bn_state{world().rank}.npy", m.flat_state)
""")
    ns: dict = {}
    exec(PRELUDE + BATCHNORM, ns)
    one = ns["model"]()
    one.fit(*ns["data"](work / "data.npz"), epochs=2, **ns["SETTINGS"])
    for name, single in (("bn_weights", one.flat_params), ("bn_state", one.flat_state)):
        rank0, rank1 = np.load(work / f"{name}0.npy"), np.load(work / f"{name}1.npy")
        np.testing.assert_array_equal(rank0, rank1)
        assert relative_difference(rank0, single) < 1e-5, name


def test_a_batchnorm_batch_smaller_than_the_ranks_is_refused(work):
    """577 images in batches of 64 leave a last batch of 1 image: rank 1 would have none and never join the
    batchnorm reductions; every rank refuses at the start instead of waiting forever."""
    r = failing_job(work, BATCHNORM + """
m = model()
x, y = data()
m.fit(x[:577], y[:577], epochs=1, **SETTINGS)
""")
    assert "ValueError: a network with batchnorm needs at least one image per rank in every batch: the last batch " \
           "of each epoch (577 images) has 1 images for 2 ranks" in r.stderr


@pytest.mark.slow
def test_resuming_a_batchnorm_network_under_mpi_continues_exactly(work):
    """Rank 0's checkpoint carries the running statistics; every rank resumes from its bytes."""
    job(work, BATCHNORM + """
from cnnc_runtime.distributed import world
x, y = data()
whole = model()
whole.fit(x, y, epochs=2, **SETTINGS)
first = model()
first.fit(x, y, epochs=1, checkpoint="bn.ckpt", **SETTINGS)
resumed = model()
resumed.fit(x, y, epochs=2, resume="bn.ckpt", **SETTINGS)
for name in ("whole", "resumed"):
    np.save(f"{name}{world().rank}.npy", np.concatenate([locals()[name].flat_params, locals()[name].flat_state]))
""")
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(work / f"resumed{rank}.npy"), np.load(work / f"whole{rank}.npy"))
