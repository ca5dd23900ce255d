"""Data-parallel scaling over MPI: ``python benchmarks/mpi_scaling.py`` (needs ``pip install '.[mpi]'``).

Trains LeNet-5 (the bundled MNIST) and the CIFAR-style net (synthetic images) at batch 64 in three set-ups:
1 process x 1 thread, 1 process x 2 threads, and 2 MPI ranks x 1 thread (``mpiexec -n 2``); with a hydra
launcher (MPICH's, Intel MPI's) a fourth, the 2 ranks each bound to a core (``-bind-to core``). Each sample is a
fresh process (or job) that compiles from a warm cache, takes a few untimed steps, then times ``fit`` over
``--steps`` steps; the set-ups alternate sample by sample, so background load hits them alike.

Per set-up it reports the median [min-max] of: images/s (the epoch's wall clock, as ``fit`` measures it); an
estimate for otherwise idle cores from CPU time (compute CPU per image shared by the workers, plus the fastest
all-reduce; for a loaded machine, where wall clocks mislead); CPU seconds per 1000 images summed over every
process; the all-reduces' share of rank 0's epoch, the time of the gradient's fastest all-reduce and the CPU
seconds per 1000 images spent in all-reduces (a rank waiting there for its peer included; with a sharded update,
``cnnc_runtime.sharded``, its two meetings a step count with the sum: the fastest of each); and the share of the
machine other processes used meanwhile (``run.py``'s ``CpuMeter``). Each sample's line on stderr also gives
``arrival_spread_ms``: the median over the steps of how much later the last rank reached the gradient's sum
than the first (the ranks' clocks are the machine's monotonic clock: one machine only), i.e. how long the
first rank waited there.
Options: ``--repeats N`` (default 5), ``--steps N`` (default: 300 LeNet-5, 30 CIFAR), ``--only lenet|cifar``,
``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from run import CpuMeter  # (benchmarks/run.py: this script's folder is on sys.path)

import cnnc
from cnnc_runtime.data import load_dataset
from cnnc_runtime.distributed import mpiexec_path, world

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NETS = {"lenet": REPO / "examples" / "lenet5.cnn", "cifar": REPO / "examples" / "cifar_small.cnn"}
STEPS = {"lenet": 300, "cifar": 30}
BATCH = 64
WARMUP_STEPS = 5
GRADIENT_MIN = 1000  # a sum of more values is the gradient's (with a step's verdict and counts riding along)
# name -> (ranks, threads per rank, the launcher's options)
SETUPS = {"1 process x 1 thread": (1, 1, ()), "1 process x 2 threads": (1, 2, ()), "2 ranks x 1 thread": (2, 1, ()),
          "2 ranks x 1 thread, -bind-to core": (2, 1, ("-bind-to", "core"))}
BOUND = "2 ranks x 1 thread, -bind-to core"  # (hydra's option: a set-up only where the launcher is hydra)


# ---- one sample: runs in the child process (every rank of a job) ------------------------------------------


def worker(net: str, steps: int) -> None:
    """Time `steps` steps of fit; rank 0 prints one JSON line."""
    comm = world()
    model = cnnc.compile(NETS[net])
    x, y = data(net, model, steps * BATCH)
    settings = dict(epochs=1, batch=BATCH, progress=False, seed=0)
    model.fit(x[:WARMUP_STEPS * BATCH], y[:WARMUP_STEPS * BATCH], **settings)
    calls = time_reductions(comm)
    cpu = time.process_time()
    epoch = model.fit(x, y, **settings).epochs[0]
    cpu = time.process_time() - cpu
    grads = sorted(wall for wall, _, kind, _ in calls if kind == "gradient")
    meets = sorted(wall for wall, _, kind, _ in calls if kind == "meet")
    ranks = comm.gather_object({"cpu": cpu, "reduce_wall": sum(c[0] for c in calls),
                                "reduce_cpu": sum(c[1] for c in calls),
                                # (a step's sum and meetings at their fastest: what they cost on idle cores)
                                "fastest": (grads[0] if grads else 0.0) + (meets[0] * len(meets) / steps if meets
                                                                          else 0.0),
                                "arrivals": [start for _, _, kind, start in calls if kind == "gradient"]})
    if comm.is_root:
        print(json.dumps({"images_per_second": epoch.images_per_second, "images": len(x), "steps": steps,
                          "cpu_seconds": sum(r["cpu"] for r in ranks),
                          "compute_cpu_seconds": sum(r["cpu"] - r["reduce_cpu"] for r in ranks),
                          "reduce_share": ranks[0]["reduce_wall"] / epoch.seconds,  # (every sum of the ranks)
                          "reduce_fast_seconds": max(r["fastest"] for r in ranks),
                          "arrival_spread_ms": arrival_spread(r["arrivals"] for r in ranks)}))


def arrival_spread(arrivals) -> float:
    """The median over the steps of the last rank's arrival at the gradient's sum minus the first's, in ms."""
    per_step = np.array(list(zip(*arrivals)))  # (steps, ranks); zip: as many steps as every rank summed
    if per_step.size == 0 or per_step.shape[1] < 2:
        return 0.0
    return float(np.median(per_step.max(axis=1) - per_step.min(axis=1)) * 1000)


def time_reductions(comm) -> list[tuple[float, float, str, float]]:
    """(wall, this thread's CPU seconds, what: "gradient", "small" or "meet", when it began) of every all-reduce
    and every meeting of a sharded update (``comm.meet``) from now on.

    A rank that arrives first spins until its peer comes, so under load the wall time is mostly waiting; the
    fastest of the gradient's calls (and of the meetings) comes closest to what they cost themselves.
    """
    calls: list[tuple[float, float, str, float]] = []
    plain, meet = comm.sum_in_place, comm.meet

    def timed(buf: np.ndarray, extra: np.ndarray | None = None, **how) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        plain(buf, extra, **how)
        kind = "gradient" if buf.size > GRADIENT_MIN else "small"
        calls.append((time.perf_counter() - wall, time.thread_time() - cpu, kind, wall))

    def timed_meet(values: np.ndarray | None = None) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        meet(values)
        calls.append((time.perf_counter() - wall, time.thread_time() - cpu, "meet", wall))

    comm.sum_in_place, comm.meet = timed, timed_meet
    return calls


def data(net: str, model, n: int) -> tuple[np.ndarray, np.ndarray]:
    """LeNet-5: the first n MNIST training images, uint8 as stored; CIFAR: n random float32 images."""
    if net == "lenet":
        train = load_dataset(REPO / "examples" / "data" / "mnist", raw=True)["train"]
        return train.x[:n], train.y[:n]
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, *model.input_shape), dtype=np.float32), rng.integers(0, 10, n)


# ---- the driver --------------------------------------------------------------------------------------------


def sample(net: str, steps: int, ranks: int, threads: int, launch: tuple[str, ...], env: dict[str, str]) -> dict:
    """One timed run of `net` as `ranks` processes of `threads` threads each (`launch`: mpiexec's options), with
    the machine's load meanwhile."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", net, "--steps", str(steps)]
    if ranks > 1:
        command = [mpiexec(), *launch, "-n", str(ranks), *command]
    meter = CpuMeter()
    r = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**env, "CNNC_THREADS": str(threads)})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{r.stdout}{r.stderr}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["others"] = meter.others()
    return result


def mpiexec() -> str:
    found = mpiexec_path()
    if found is None:
        raise SystemExit("no mpiexec: pip install '.[mpi]' (mpi4py and an MPI wheel, into this Python's prefix)")
    return found


def hydra() -> bool:
    """Whether mpiexec is hydra (MPICH's or Intel MPI's launcher), which binds ranks with ``-bind-to core``."""
    r = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True, timeout=60)
    return "HYDRA" in r.stdout.upper()


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    v = sorted(x * scale for x in values)
    return f"{v[len(v) // 2]:,.{digits}f} [{v[0]:,.{digits}f}-{v[-1]:,.{digits}f}]"


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def idle_estimate(name: str, s: dict) -> float:
    """Images/s on otherwise idle cores, from CPU time: each worker (thread or rank) busy all the time on the
    compute, plus (for ranks) the fastest all-reduce at every step. An upper bound: it assumes the work splits
    evenly and no rank waits for another."""
    ranks, threads, _ = SETUPS[name]
    per_image = s["compute_cpu_seconds"] / s["images"] / (ranks * threads)
    return 1 / (per_image + s["reduce_fast_seconds"] * s["steps"] / s["images"])


def report(net: str, results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows for `net`: one per set-up, then the speed-ups of 2 ranks (bound or not) over 1 process x 1
    thread."""
    lines = []
    for name, samples in results.items():
        others = [s["others"] for s in samples if s["others"] is not None]
        ranks = SETUPS[name][0] > 1
        in_sums = [1000 * (s["cpu_seconds"] - s["compute_cpu_seconds"]) / s["images"] for s in samples]
        reduce = (f"{spread([s['reduce_share'] for s in samples], 100, 1)}% of the time; "
                  f"{spread([s['reduce_fast_seconds'] for s in samples], 1e6)} us; {spread(in_sums, digits=3)}; "
                  f"{spread([s.get('arrival_spread_ms', 0.0) for s in samples], digits=2)} ms"
                  if ranks else "-")
        lines.append(f"| {net} | {name} | {spread([s['images_per_second'] for s in samples])} | "
                     f"{spread([idle_estimate(name, s) for s in samples])} | "
                     f"{spread([1000 * s['cpu_seconds'] / s['images'] for s in samples], digits=2)} | {reduce} | "
                     f"{spread(others, 100) + '%' if others else '?'} |")
    one = results["1 process x 1 thread"]
    for name in [n for n in results if SETUPS[n][0] > 1]:
        two = results[name]
        wall = median([s["images_per_second"] for s in two]) / median([s["images_per_second"] for s in one])
        idle = median([idle_estimate(name, s) for s in two]) / median(
            [idle_estimate("1 process x 1 thread", s) for s in one])
        lines.append(f"| {net} | speed-up of {name} over 1 process x 1 thread | {wall:.2f}x | {idle:.2f}x | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, help="timed steps per sample (default: 300 LeNet-5, 30 CIFAR)")
    ap.add_argument("--only", choices=sorted(NETS), help="one network only")
    ap.add_argument("--json", default="-", help="also write the samples here")
    ap.add_argument("--worker", choices=sorted(NETS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps or STEPS[args.worker])
        return 0
    cache = tempfile.mkdtemp(prefix="cnnc-mpi-bench-")
    env = {**os.environ, "CNNC_CACHE_DIR": cache}
    everything: dict[str, dict[str, list[dict]]] = {}
    try:
        names = [name for name in SETUPS if name != BOUND or hydra()]
        for net in [args.only] if args.only else list(NETS):
            steps = args.steps or STEPS[net]
            sample(net, WARMUP_STEPS, 1, 1, (), env)  # compiles into the cache once
            results: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(args.repeats):
                first = r % len(names)
                for name in names[first:] + names[:first]:  # a different set-up first each round
                    results[name].append(sample(net, steps, *SETUPS[name], env))
                    print(f"{net} round {r + 1}: {name}: {results[name][-1]}", file=sys.stderr, flush=True)
            everything[net] = results
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print("| network | set-up | images/s | idle-cores estimate from CPU time, images/s | CPU s per 1000 images (all "
          "processes) | all-reduces' share of rank 0's epoch; the gradient's fastest call; CPU s per 1000 images in "
          "them (waits included); the ranks' arrival spread at a step's sum | others' CPU share |")
    print("|---|---|---|---|---|---|---|")
    for net, results in everything.items():
        print("\n".join(report(net, results)))
    if args.json != "-":
        Path(args.json).write_text(json.dumps(everything, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
