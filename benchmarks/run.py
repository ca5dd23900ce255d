"""cnnc vs PyTorch (and onnxruntime), measured in one run on the same threads: ``python benchmarks/run.py``.

Options: ``--quick`` (fewer repeats and steps), ``--only NAME[,NAME]`` (see ``--list``),
``--threads N`` (default 2), ``--json PATH`` (default benchmarks/results.json; ``--json -`` to skip).

Every number is a sample of ``repeats`` measurements taken after warm-up, cnnc and
PyTorch alternating sample by sample (so a burst of background load hits both
sides alike); the table shows the median and [min-max]. The last column is
cnnc/PyTorch oriented so that > 1 always means cnnc is better (faster, or less
time or memory). The inference rows also run LeNet-5 exported to ONNX (``Model.export_onnx``) in
onnxruntime, the deployment runtime people would pick, with the same threads (``intra_op_num_threads``);
that column needs ``pip install 'cnnc[onnx,onnxruntime]'``. benchmarks/README.md says what each row measures.

The run starts by measuring the machine's FMA peak (``cnnc_runtime.peak``, the kernel ``cnnc profile`` uses) and
gives every training and inference row as a share of it: training counts 6 x the network's MACs per image (the
forward, the input gradient and the weight gradient, each as many multiply-adds as the forward, 2 FLOP each),
inference 2 x MACs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch_nets import torch_resnet20  # (benchmarks/: this script's folder)

from cnnc_runtime.host import cpu_model, host_cpu
from cnnc_runtime.inputs import Inputs
from cnnc_runtime.peak import FmaKernel, measure

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LENET = REPO / "examples" / "lenet5.cnn"
CIFAR = REPO / "examples" / "cifar_small.cnn"
RESNET20 = REPO / "examples" / "resnet20.cnn"
MNIST = REPO / "examples" / "data" / "mnist"
MNIST_EPOCH = 60000
SETTLE = 0.02  # seconds of pause between a cnnc and a PyTorch sample (lets spinning OpenMP threads go to sleep)

CONV_N, CONV_C, CONV_HW = 32, 64, 32
CONV_MACS = CONV_N * CONV_C * CONV_C * 9 * CONV_HW * CONV_HW  # 64->64, 3x3, pad 1, 32x32, batch 32
CONV_ONE = f"""network conv_one {{
    input x: {CONV_C}x{CONV_HW}x{CONV_HW}
    y = x -> conv({CONV_C}, 3x3, pad=1)
}}"""
# The same conv behind a per-channel scale (a depthwise 1x1 conv: 64 MACs per pixel), so that the conv's
# input is no longer the network input and the training step must compute the conv's input gradient too.
CONV_TWO = f"""network conv_two {{
    input x: {CONV_C}x{CONV_HW}x{CONV_HW}
    h = x -> conv({CONV_C}, 1x1, groups={CONV_C})
    y = h -> conv({CONV_C}, 3x3, pad=1)
}}"""

ROW_NAMES = ("lenet_train", "lenet_infer1", "lenet_infer256", "resnet20_train", "resnet20_infer1",
             "resnet20_infer256", "cifar_train", "conv", "fma", "compile", "import",
             "first_step", "rss")
TRAIN_FLOPS_PER_MAC = 6  # forward, input gradient, weight gradient: 3 x the multiply-adds, 2 FLOP each
INFER_FLOPS_PER_MAC = 2


# ---- results ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower": what is better for this metric
    cnnc: list[float] | None = None
    torch: list[float] | None = None
    ort: list[float] | None = None  # onnxruntime, on the inference rows
    note: str = ""
    extra: dict = field(default_factory=dict)
    others: float | None = None  # share of the machine's CPU other processes used while the row ran
    flops: float | None = None  # FLOP per unit of the metric (per image for images/s, per call for us)

    def peak_share(self, samples: list[float] | None, peak: float) -> float | None:
        """The median of `samples` as a share of `peak` GFLOP/s (None for rows that do no counted FLOPs)."""
        if not samples or not self.flops or not peak:
            return None
        v = median(samples)
        rate = v * self.flops if self.unit == "images/s" else self.flops / (v * 1e-6) if self.unit == "us" else None
        return None if rate is None else rate / (peak * 1e9)

    def ratio(self, other: str = "torch") -> float | None:
        """cnnc/PyTorch (or cnnc/onnxruntime: `other` "ort"), oriented so that > 1 means cnnc is better."""
        peer = getattr(self, other)
        if not self.cnnc or not peer:
            return None
        c, t = median(self.cnnc), median(peer)
        if c <= 0 or t <= 0:
            return None
        return c / t if self.better == "higher" else t / c

    def as_dict(self) -> dict:
        def stats(s):
            return None if not s else {"median": median(s), "min": min(s), "max": max(s), "samples": s}

        return {"key": self.key, "label": self.label, "unit": self.unit, "better": self.better,
                "cnnc": stats(self.cnnc), "torch": stats(self.torch), "ratio_cnnc_better_if_gt_1": self.ratio(),
                "onnxruntime": stats(self.ort), "ratio_vs_onnxruntime_cnnc_better_if_gt_1": self.ratio("ort"),
                "note": self.note, "extra": self.extra, "others_cpu_share": self.others, "flops_per_unit": self.flops}


def median(s: list[float]) -> float:
    return float(np.median(s))


def fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def cell(s: list[float] | None) -> str:
    if not s:
        return "-"
    if len(s) == 1:
        return fmt(s[0])
    return f"{fmt(median(s))} [{fmt(min(s))}-{fmt(max(s))}]"


def print_table(rows: list[Row], meta: dict) -> None:
    print()
    print(f"cnnc {meta['cnnc_version']} vs PyTorch {meta['torch_version'] or '(not installed)'}, "
          f"{meta['threads']} thread(s) each, {meta['cpu']}{' (--quick)' if meta['quick'] else ''}")
    peak = meta["peak_gflops"]
    print(f"CPU {meta['cpu']} ({meta['llvm_cpu']}): measured FMA peak {meta['fma_1']:.0f} GFLOP/s on 1 thread, "
          f"{peak:.0f} on {meta['threads']} (the best sample, or {meta['threads']} x the 1-thread one if higher).\n"
          "% PEAK = a row's FLOP rate / that peak: training counts 6 x the network's MACs per image (forward, "
          "input gradient, weight gradient: 3 x the multiply-adds, 2 FLOP each), inference 2 x MACs")
    print("values: median [min-max] over repeats.  RATIO = cnnc/PyTorch, oriented so that > 1 means cnnc is better "
          "(higher throughput, or lower time / memory); RATIO ORT the same against onnxruntime "
          f"{meta.get('onnxruntime_version') or '(not installed)'}.\nothers: share of the machine's CPU used by other "
          "processes while the row ran (should be ~0%)")
    ratio = lambda r, other: "-" if r.ratio(other) is None else f"{r.ratio(other):.2f}x"  # noqa: E731
    share = lambda r, s: "-" if r.peak_share(s, peak) is None else f"{100 * r.peak_share(s, peak):.0f}%"  # noqa: E731
    head = ("#", "benchmark", "unit", "better", "cnnc", "PyTorch", "ratio", "onnxruntime", "ratio ort", "cnnc %peak",
            "PyTorch %peak", "others")
    body = [(str(i + 1), r.label, r.unit, r.better, cell(r.cnnc), cell(r.torch), ratio(r, "torch"), cell(r.ort),
             ratio(r, "ort"), share(r, r.cnnc), share(r, r.torch),
             "?" if r.others is None else f"{100 * r.others:.0f}%") for i, r in enumerate(rows)]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print(line)
    for b in body:
        print("  ".join(x.rjust(w) if i >= 4 else x.ljust(w) for i, (x, w) in enumerate(zip(b, widths))))
    print(line)
    notes = [(i + 1, r.note) for i, r in enumerate(rows) if r.note]
    if notes:
        print("notes:")
        for i, n in notes:
            print(f"  {i:>2}. {n}")


# ---- measurement helpers -----------------------------------------------------------------------------------


class Ctx:
    """What every row needs: options, the torch module (or None), data, compiled models."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.threads = args.threads
        self.torch = None
        self.torch_error = ""
        try:
            import torch

            torch.set_num_threads(self.threads)
            # PyTorch's best setting here: on LeNet-5 with cnnc's initial weights it meets denormals and
            # trains ~1.5x slower without this (cnnc's kernels measured the same with or without it)
            torch.set_flush_denormal(True)
            self.torch = torch
        except Exception as e:  # noqa: BLE001 - any failure means "no torch column"
            self.torch_error = f"{type(e).__name__}: {e}"
        self.ort, self.ort_error = import_onnxruntime()
        self.cache_dir = tempfile.mkdtemp(prefix="cnnc-bench-cache-")
        self._mnist = None
        self._models: dict[str, object] = {}
        self.fma: dict | None = None
        self.fma_others: float | None = None

    def rep(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def mnist(self) -> tuple[np.ndarray, np.ndarray]:
        """MNIST train images prepared for LeNet-5 (N, 1, 32, 32) float32 and int64 labels."""
        if self._mnist is None:
            from cnnc_runtime.data import load_dataset, prepare_images

            train = load_dataset(MNIST)["train"]
            self._mnist = (prepare_images(train.x, (1, 32, 32)), np.asarray(train.y))
        return self._mnist

    def model(self, key: str, source: Path | str, **options):
        if key not in self._models:
            import cnnc

            m = (cnnc.compile(source, **options) if isinstance(source, Path)
                 else cnnc.compile_string(source, name=key, **options))
            if m.threads != self.threads:
                raise RuntimeError(f"cnnc model runs on {m.threads} threads, expected {self.threads}")
            self._models[key] = m
        return self._models[key]

    def ort_session(self, key: str, model):
        """An onnxruntime session on `model` exported to ONNX (its current weights), on this run's threads."""
        path = Path(self.cache_dir) / f"{key}.onnx"
        model.export_onnx(path)
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        return self.ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Python's default: modules load from cached bytecode, as after `pip install` (which compiles it); a
        # PYTHONDONTWRITEBYTECODE in the environment would compile every module from source in each child
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["CNNC_THREADS"] = str(self.threads)
        env["CNNC_CACHE_DIR"] = self.cache_dir
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env


def import_onnxruntime():
    """(the onnxruntime module or None, why not), imported with $HOME in a temporary directory: onnxruntime writes a
    device id under ~/.cache when it is first imported, and a benchmark run should leave the user's home alone."""
    saved = {k: os.environ.get(k) for k in ("HOME", "XDG_CACHE_HOME")}
    home = tempfile.mkdtemp(prefix="cnnc-bench-ort-home-")
    os.environ.update(HOME=home, XDG_CACHE_HOME=os.path.join(home, ".cache"))
    try:
        import onnx  # noqa: F401 - (the export needs it: no onnx, no column)
        import onnxruntime

        return onnxruntime, ""
    except Exception as e:  # noqa: BLE001 - any failure means "no onnxruntime column"
        return None, f"{type(e).__name__}: {e}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)


def alternate(ctx: Ctx, row: Row, repeats: int, cnnc_sample: Callable[[], float],
              torch_sample: Callable[[], float] | None, warmup: int = 1,
              ort_sample: Callable[[], float] | None = None, torch_note: bool = True) -> None:
    """Warm the sides up, then take `repeats` samples of each, alternating; a failing torch or onnxruntime side is
    noted (`ort_sample`: the onnxruntime side of an inference row; `torch_note`: say when PyTorch is missing)."""
    if ctx.torch is None and torch_note:
        torch_sample = None
        row.note = (row.note + "; " if row.note else "") + f"PyTorch unavailable ({ctx.torch_error})"
    row.cnnc = []
    row.torch = [] if torch_sample is not None else None
    row.ort = [] if ort_sample is not None else None
    for i in range(warmup + repeats):
        value = cnnc_sample()
        if i >= warmup:
            row.cnnc.append(value)
        if ort_sample is not None:
            time.sleep(SETTLE)
            try:
                value = ort_sample()
            except Exception as e:  # noqa: BLE001 - keep the other columns
                row.note = (row.note + "; " if row.note else "") + f"onnxruntime failed: {type(e).__name__}: {e}"
                ort_sample, row.ort = None, None
            else:
                if i >= warmup:
                    row.ort.append(value)
        if torch_sample is not None:
            time.sleep(SETTLE)
            try:
                value = torch_sample()
            except Exception as e:  # noqa: BLE001 - keep the cnnc column
                row.note = (row.note + "; " if row.note else "") + f"PyTorch side failed: {type(e).__name__}: {e}"
                torch_sample, row.torch = None, None
                continue
            if i >= warmup:
                row.torch.append(value)
            time.sleep(SETTLE)


def block_median(fn: Callable[[], object], calls: int, budget: float = 2.0) -> float:
    """Median seconds of `calls` timed calls of fn (fewer, at least 5, if they take more than `budget` s)."""
    ts = []
    end = time.perf_counter() + budget
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        ts.append(t1 - t0)
        if t1 > end and i >= 4:
            break
    return float(np.median(ts))


def run_child(ctx: Ctx, script: str, params: dict, timeout: float = 600) -> dict:
    """Run benchmarks/`script` in a fresh interpreter (argv[1] = JSON params); it prints one JSON object as its
    last line."""
    proc = subprocess.run([sys.executable, str(HERE / script), json.dumps(params)], capture_output=True, text=True,
                          env=ctx.env(), cwd=str(REPO), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- PyTorch equivalents -------------------------------------------------------------------------------------


def torch_lenet(torch, c3_mask: np.ndarray):
    """LeNet-5 as in examples/lenet5.cnn: tanh, average pooling, C3 by a masked 6->16 conv weight."""
    nn, F = torch.nn, torch.nn.functional

    class LeNet5(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 6, 5)
            self.c3 = nn.Conv2d(6, 16, 5)
            self.c5 = nn.Conv2d(16, 120, 5)
            self.f6 = nn.Linear(120, 84)
            self.logits = nn.Linear(84, 10)
            self.register_buffer("c3_mask", torch.from_numpy(c3_mask)[:, :, None, None].clone())

        def forward(self, x):
            x = F.avg_pool2d(torch.tanh(self.c1(x)), 2)
            x = F.avg_pool2d(torch.tanh(F.conv2d(x, self.c3.weight * self.c3_mask, self.c3.bias)), 2)
            x = torch.tanh(self.c5(x)).flatten(1)
            return self.logits(torch.tanh(self.f6(x)))

    return LeNet5()


def torch_cifar(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10))


def copy_weights_to_torch(torch, model, net) -> None:
    """cnnc's parameters, in layout order (layer by layer, weight then bias), into the torch module's, in order."""
    ours = [model.params[p["name"]] for p in model.manifest["params"]]
    theirs = list(net.parameters())
    if [a.shape for a in ours] != [tuple(t.shape) for t in theirs]:
        raise RuntimeError(f"parameter shapes differ: {[a.shape for a in ours]} vs {[tuple(t.shape) for t in theirs]}")
    with torch.no_grad():
        for a, t in zip(ours, theirs):
            t.copy_(torch.from_numpy(a.copy()))


def c3_mask_of(model) -> np.ndarray:
    p = next(p for p in model.manifest["params"] if p["connect"] is not None)
    return model.connect_mask(p)


def torch_fit_epoch(torch, net, opt, x, y, batch: int, seed: int) -> None:
    """What cnnc's fit does per epoch: shuffle, then per batch forward, loss, backward, Adam; loss and accuracy."""
    F = torch.nn.functional
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    total, correct = 0.0, 0
    for start in range(0, len(x), batch):
        idx = order[start:start + batch]
        xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        out = net(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        correct += int((out.argmax(1) == yb).sum())


# the same update rule on both sides: (cnnc's fit settings, PyTorch's optimizer)
RECIPES = {
    "adam": ({"optimizer": "adam", "lr": 1e-3}, lambda torch, params: torch.optim.Adam(params, lr=1e-3)),
    "momentum": ({"optimizer": "momentum", "lr": 0.01, "momentum": 0.9},
                 lambda torch, params: torch.optim.SGD(params, lr=0.01, momentum=0.9)),
}


def train_row(ctx: Ctx, row: Row, model, x: np.ndarray, y: np.ndarray, make_torch_net, batch: int = 64,
              recipe: str = "adam", breakdown: bool = True) -> None:
    """images/s of one epoch of `fit` over the first n images of (x, y) at `batch`, vs the same loop in PyTorch,
    with the optimizer of `recipe` (RECIPES), no augmentation, no weight decay.

    The warm-up epoch is 5 steps; from its speed each side picks n (whole batches, at least 5, at most
    len(x)) so that one sample takes about 1.5 s (0.6 s with --quick): slow sides do not blow the time budget.
    """
    target = ctx.rep(1.5, 0.6)
    seeds = iter(range(10**6))
    sizes: dict[str, int] = {}
    settings, make_optimizer = RECIPES[recipe]

    def sized(side: str, epoch: Callable[[int], None]) -> float:
        n = sizes.get(side, 5 * batch)
        t0 = time.perf_counter()
        epoch(n)
        dt = time.perf_counter() - t0
        if side not in sizes:
            sizes[side] = int(min(max(round(target * n / dt / batch), 5), len(x) // batch)) * batch
        return n / dt

    def cnnc_epoch(n: int) -> None:
        # the network's input as it is (no normalize: the PyTorch side gets the same images)
        model.fit(Inputs(x[:n], model.input_shape), y[:n], epochs=1, batch=batch, **settings, progress=False,
                  jitter=0.0, crop=0, flip=False, validation=0.0, weight_decay=0.0, restarts=1, seed=next(seeds))

    torch_sample = None
    if ctx.torch is not None:
        torch = ctx.torch
        net = make_torch_net()
        copy_weights_to_torch(torch, model, net)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        with torch.no_grad():
            ref = float(torch.nn.functional.cross_entropy(net(tx[:64]), ty[:64]))
        mine = model.gradients(x[:64], model.check_targets(y[:64], 64, "cross_entropy"), "cross_entropy")
        row.extra["same_weights_loss_cnnc_vs_torch"] = [mine, ref]
        if abs(mine - ref) > 1e-3 * max(1.0, abs(ref)):
            row.note = f"WARNING: the PyTorch model disagrees with cnnc (loss {ref:.5f} vs {mine:.5f})"
        opt = make_optimizer(torch, net.parameters())

        def torch_epoch(n: int) -> None:
            torch_fit_epoch(torch, net, opt, tx[:n], ty[:n], batch, next(seeds))

        torch_sample = lambda: sized("torch", torch_epoch)  # noqa: E731

    alternate(ctx, row, ctx.rep(5, 3), lambda: sized("cnnc", cnnc_epoch), torch_sample)
    row.extra["images_per_sample"] = sizes
    if breakdown:
        row.extra["cnnc_step_breakdown"] = step_breakdown(model, x, y)
    row.flops = TRAIN_FLOPS_PER_MAC * macs(model)


def macs(model) -> int:
    """Multiply-adds of one image through the network (``cnnc check``'s count)."""
    return int(model.manifest["summary_json"]["total_macs"])


def step_breakdown(model, x: np.ndarray, y: np.ndarray, rounds: int = 3) -> dict:
    """Milliseconds per batch-64 step of fit, of the native step_cross_entropy call alone and of the Adam update
    alone, timed in alternating short blocks (so that all three see the same background load)."""
    from cnnc_runtime.optimizers import Adam

    xb, tb = x[:64], y[:64].astype(np.int32)
    k = model.manifest["loss_inputs"]["cross_entropy"]
    out, losses = np.empty((64, k), np.float32), np.empty(64, np.float32)
    opt = Adam(lr=1e-3)
    opt.use_native(model.native_update(opt))  # as fit binds it
    steps = 10

    def native() -> None:
        model.gradients(xb, tb, "cross_entropy", out=out, losses=losses)

    def fit_step() -> None:
        model.fit(Inputs(x[:64 * steps], model.input_shape), y[:64 * steps], epochs=1, batch=64, optimizer="adam",
                  lr=1e-3, progress=False, jitter=0.0, validation=0.0, weight_decay=0.0, restarts=1)

    native()
    grads = np.zeros_like(model.flat_grads)  # a zero gradient: Adam does all its work but the weights stay put
    opt.step(model.flat_params, grads)
    got: dict[str, list[float]] = {"fit_step_ms": [], "native_step_ms": [], "adam_ms": []}
    for _ in range(rounds):
        got["fit_step_ms"].append(block_median(fit_step, 1) * 1e3 / steps)
        got["native_step_ms"].append(block_median(native, steps) * 1e3)
        got["adam_ms"].append(block_median(lambda: opt.step(model.flat_params, grads), steps) * 1e3)
    model.initialize(0)
    return {key: median(v) for key, v in got.items()}


def breakdown_note(b: dict) -> str:
    rest = b["fit_step_ms"] - b["native_step_ms"] - b["adam_ms"]
    return (f"cnnc fit step {b['fit_step_ms']:.3g} ms = native fwd+bwd {b['native_step_ms']:.3g} + Adam "
            f"{b['adam_ms']:.2g} + rest {rest:.2g} (batch gather, loop; timed apart from the samples)")


# ---- rows ------------------------------------------------------------------------------------------------


def row_lenet_train(ctx: Ctx) -> list[Row]:
    model = ctx.model("lenet5", LENET)
    x, y = ctx.mnist()
    row = Row("lenet_train", "LeNet-5 training, batch 64 (fit + Adam)", "images/s", "higher")
    mask = c3_mask_of(model)
    train_row(ctx, row, model, x, y, lambda: torch_lenet(ctx.torch, mask))
    row.note = (row.note + "; " if row.note else "") + breakdown_note(row.extra["cnnc_step_breakdown"])
    epoch = Row("lenet_epoch", "  one MNIST epoch (60000/throughput)", "s", "lower",
                [MNIST_EPOCH / v for v in row.cnnc], [MNIST_EPOCH / v for v in row.torch] if row.torch else None)
    return [row, epoch]


def inference_sample(fn: Callable[[], object], batch: int, calls: int) -> float:
    """One sample of an inference row: the median latency in us of `calls` calls at batch 1, else images/s."""
    if batch == 1:
        return block_median(fn, calls) * 1e6
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return batch * calls / (time.perf_counter() - t0)


def infer_row(ctx: Ctx, key: str, label: str, batch: int, model, xb: np.ndarray, make_torch_net: Callable,
              calls: int, repeats: int) -> Row:
    """Latency (batch 1) or images/s of `model` on `xb` against PyTorch (the same weights, eval mode) and
    onnxruntime (the model exported by cnnc), in alternating samples of `calls` calls."""
    single = batch == 1
    row = Row(key, label, "us" if single else "images/s", "lower" if single else "higher")

    sample = lambda fn: inference_sample(fn, batch, calls)  # noqa: E731

    torch_sample = None
    if ctx.torch is not None:
        torch = ctx.torch
        net = make_torch_net(torch)
        copy_weights_to_torch(torch, model, net)
        net.eval()
        tx = torch.from_numpy(xb)

        def torch_call():
            with torch.inference_mode():
                return net(tx)

        torch_sample = lambda: sample(torch_call)  # noqa: E731
    ort_sample = None
    if ctx.ort is not None:
        session = ctx.ort_session(key, model)
        feed = {session.get_inputs()[0].name: xb}
        ort_sample = lambda: sample(lambda: session.run(None, feed))  # noqa: E731
    else:
        row.note = f"onnxruntime unavailable ({ctx.ort_error})"
    out = np.empty((batch, *model.output_shape), np.float32)
    ran = dict(model.split_choice.ran)
    alternate(ctx, row, repeats, lambda: sample(lambda: model.infer_into(xb, out)), torch_sample,
              ort_sample=ort_sample)
    row.extra["calls_per_sample"] = calls
    if single:  # how often the image was shared between the threads (SplitChoice: else one thread ran it)
        shared, alone = (model.split_choice.ran[way] - ran[way] for way in (True, False))
        row.extra["shared_calls"] = f"{shared} of {shared + alone}"
        row.note = (row.note + "; " if row.note else "") + f"cnnc shared {shared} of {shared + alone} calls' image " \
                                                           "between its threads (the rest: one thread)"
    row.flops = INFER_FLOPS_PER_MAC * macs(model)
    return row


def lenet_infer_row(ctx: Ctx, key: str, label: str, batch: int) -> Row:
    model = ctx.model("lenet5", LENET)
    x, _ = ctx.mnist()
    return infer_row(ctx, key, label, batch, model, np.ascontiguousarray(x[:batch]),
                     lambda torch: torch_lenet(torch, c3_mask_of(model)),
                     ctx.rep(400, 200) if batch == 1 else ctx.rep(10, 5), ctx.rep(7, 4))


def row_lenet_infer1(ctx: Ctx) -> list[Row]:
    return [lenet_infer_row(ctx, "lenet_infer1", "LeNet-5 inference, batch 1 (latency)", 1)]


def row_lenet_infer256(ctx: Ctx) -> list[Row]:
    return [lenet_infer_row(ctx, "lenet_infer256", "LeNet-5 inference, batch 256", 256)]


def resnet20_infer_row(ctx: Ctx, key: str, label: str, batch: int) -> Row:
    """examples/resnet20.cnn on random 3x32x32 images (benchmarks/torch_nets.py on PyTorch's side; the running
    statistics are fresh on both sides: 0 and 1)."""
    model = ctx.model("resnet20", RESNET20)
    xb = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    return infer_row(ctx, key, label, batch, model, xb, torch_resnet20,
                     ctx.rep(100, 40) if batch == 1 else ctx.rep(3, 2), ctx.rep(5, 3))


def row_resnet20_train(ctx: Ctx) -> list[Row]:
    """ResNet-20 training at batch 128, SGD with momentum on both sides, on synthetic CIFAR-sized images."""
    model = ctx.model("resnet20_train", RESNET20)
    rng = np.random.default_rng(0)
    n = 128 * 8  # a sample uses the first 5-8 batches (see train_row)
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, n)
    row = Row("resnet20_train", "ResNet-20 training, batch 128 (fit + SGD momentum)", "images/s", "higher")
    train_row(ctx, row, model, x, y, lambda: torch_resnet20(ctx.torch), batch=128, recipe="momentum",
              breakdown=False)
    row.note = (row.note + "; " if row.note else "") + ("batchnorm in training mode (batch statistics) on both "
                                                         "sides; no augmentation; `cnnc profile --train "
                                                         "examples/resnet20.cnn` splits cnnc's step by layer")
    return [row]


def row_resnet20_infer1(ctx: Ctx) -> list[Row]:
    return [resnet20_infer_row(ctx, "resnet20_infer1", "ResNet-20 inference, batch 1 (latency)", 1)]


def row_resnet20_infer256(ctx: Ctx) -> list[Row]:
    return [resnet20_infer_row(ctx, "resnet20_infer256", "ResNet-20 inference, batch 256", 256)]


def row_cifar_train(ctx: Ctx) -> list[Row]:
    model = ctx.model("cifar_small", CIFAR)
    rng = np.random.default_rng(0)
    n = 64 * 40  # synthetic 3x32x32 images; a sample uses the first 5-40 batches (see train_row)
    x = rng.random((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, n)
    row = Row("cifar_train", "CIFAR-style net training, batch 64 (fit + Adam)", "images/s", "higher")
    train_row(ctx, row, model, x, y, lambda: torch_cifar(ctx.torch))
    row.note = (row.note + "; " if row.note else "") + breakdown_note(row.extra["cnnc_step_breakdown"])
    return [row]


def fma_peak(ctx: Ctx) -> dict:
    if ctx.fma is None:
        meter = CpuMeter()
        k = FmaKernel()
        reps = ctx.rep(5, 3)
        sec = ctx.rep(0.25, 0.15)
        ctx.fma = {"width": k.width, "chains": k.chains, "1": measure(1, sec, reps, k),
                   str(ctx.threads): measure(ctx.threads, sec, reps, k)}
        ctx.fma_others = meter.others()
    return ctx.fma


def peak_reference(ctx: Ctx) -> float:
    """The machine's FMA peak on ctx.threads cores (GFLOP/s): max(best N-thread sample, N x best 1-thread sample)."""
    f = fma_peak(ctx)
    return max(max(f[str(ctx.threads)]), ctx.threads * max(f["1"]))


def row_fma(ctx: Ctx) -> list[Row]:
    f = fma_peak(ctx)
    note = f"<{f['width']} x float> x {f['chains']} independent llvm.fma chains (cnnc_runtime.peak)"
    rows = [Row("fma_1", "FMA peak, 1 thread (machine)", "GFLOP/s", "higher", f["1"], note=note)]
    if ctx.threads != 1:
        rows.append(Row(f"fma_{ctx.threads}", f"FMA peak, {ctx.threads} threads (machine)", "GFLOP/s", "higher",
                        f[str(ctx.threads)]))
    for r in rows:
        r.others = ctx.fma_others
    if ctx.threads > 1 and median(f[str(ctx.threads)]) < 0.8 * ctx.threads * median(f["1"]):
        rows[-1].note = (f"less than {ctx.threads} x the 1-thread peak: other processes held a core "
                         "(see 'others')")
    return rows


def row_conv(ctx: Ctx) -> list[Row]:
    """A conv 64->64 3x3 pad 1 on 32x32, batch 32: forward and backward (input + weight gradients) GFLOP/s."""
    one = ctx.model("conv_one", CONV_ONE)
    two = ctx.model("conv_two", CONV_TWO)
    direct = ctx.model("conv_one_direct", CONV_ONE, winograd=False), ctx.model("conv_two_direct", CONV_TWO,
                                                                               winograd=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((CONV_N, CONV_C, CONV_HW, CONV_HW), dtype=np.float32)
    k = CONV_C * CONV_HW * CONV_HW
    target = np.zeros((CONV_N, k), np.float32)
    out, losses = np.empty((CONV_N, k), np.float32), np.empty(CONV_N, np.float32)

    for m in (two, direct[1]):
        m.params["h.weight"][...] = 1.0  # the per-channel scale is the identity
    for m in direct:  # the same weights as the default models
        m.flat_params[...] = (one if m is direct[0] else two).flat_params

    def step(m) -> float:
        t0 = time.perf_counter()
        m.gradients(x, target, "mse", out=out, losses=losses)
        return time.perf_counter() - t0

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    fwd_flop, bwd_flop = 2 * CONV_MACS, 4 * CONV_MACS
    parts: dict[str, list[float]] = {"fwd": []}

    def cnnc_fwd(one=one, parts=parts) -> float:
        t = block_median(lambda: one.forward(x), 3)
        parts["fwd"].append(t)
        return fwd_flop / t / 1e9

    def cnnc_bwd(one=one, two=two, parts=parts) -> float:
        # conv_two's training step minus its forward: input + weight gradients of the 3x3 conv (plus the
        # mse loss and the negligible per-channel scale); conv_one's step minus forward: weight gradient only.
        # Each is the median of 3 alternating timings, so one preempted call does not make a difference absurd.
        got: dict[str, list[float]] = {"step_two": [], "fwd_two": [], "step_one": [], "fwd_one": []}
        for _ in range(3):
            got["step_two"].append(step(two))
            got["fwd_two"].append(timed(lambda: two.forward(x)))
            got["step_one"].append(step(one))
            got["fwd_one"].append(timed(lambda: one.forward(x)))
        for key, v in got.items():
            parts.setdefault(key, []).append(median(v))
        return bwd_flop / max(median(got["step_two"]) - median(got["fwd_two"]), 1e-9) / 1e9

    fwd = Row("conv_fwd", "conv 64->64 3x3 32x32 b32: forward", "GFLOP/s", "higher")
    bwd = Row("conv_bwd", "conv 64->64 3x3 32x32 b32: backward (dX+dW)", "GFLOP/s", "higher")
    t_fwd = t_bwd = None
    if ctx.torch is not None:
        torch = ctx.torch
        F = torch.nn.functional
        tx = torch.from_numpy(x.copy())
        w = torch.from_numpy(one.params["y.weight"].copy())
        b = torch.from_numpy(one.params["y.bias"].copy())

        def t_fwd() -> float:
            with torch.inference_mode():
                t = block_median(lambda: F.conv2d(tx, w, b, padding=1), 3)
            return fwd_flop / t / 1e9

        xg, wg = tx.clone().requires_grad_(True), w.clone().requires_grad_(True)
        yg = F.conv2d(xg, wg, b, padding=1)
        g = torch.randn_like(yg)

        def t_bwd() -> float:
            # the gradient of (y * g).sum() with respect to x and w, on a kept graph: backward only
            t = block_median(lambda: torch.autograd.grad(yg, (xg, wg), grad_outputs=g, retain_graph=True), 3)
            return bwd_flop / t / 1e9

    reps = ctx.rep(7, 4)
    alternate(ctx, fwd, reps, cnnc_fwd, t_fwd)
    alternate(ctx, bwd, reps, cnnc_bwd, t_bwd)
    # drop the warm-up samples of the parts
    for key in parts:
        parts[key] = parts[key][-reps:]
    med = {key: median(v) * 1e3 for key, v in parts.items()}
    dw = 2 * CONV_MACS / max(med["step_one"] - med["fwd_one"], 1e-9) / 1e6
    dx = 2 * CONV_MACS / max(med["step_two"] - med["fwd_two"] - (med["step_one"] - med["fwd_one"]), 1e-9) / 1e6
    bwd.extra.update(cnnc_ms=med, cnnc_dW_gflops=dw, cnnc_dX_gflops=dx)
    bwd.note = (f"cnnc: step(mse) - forward = {med['step_two'] - med['fwd_two']:.1f} ms; "
                f"split: dW ~{dw:.0f} GFLOP/s, dX ~{dx:.0f} GFLOP/s")
    # the same layer with every convolution direct (cnnc.compile(..., winograd=False)): the kernels' efficiency
    direct_fwd = Row("conv_fwd_direct", "forward, direct kernel (winograd=False)", "GFLOP/s", "higher")
    direct_bwd = Row("conv_bwd_direct", "backward (dX+dW), direct kernels", "GFLOP/s", "higher")
    direct_parts: dict[str, list[float]] = {"fwd": []}
    alternate(ctx, direct_fwd, reps, lambda: cnnc_fwd(direct[0], direct_parts), None)
    alternate(ctx, direct_bwd, reps, lambda: cnnc_bwd(*direct, direct_parts), None)
    fwd.note = ("GFLOP/s = 2 x the direct convolution's multiply-adds / time on both sides; cnnc runs this layer's "
                "forward and input gradient by Winograd F(2x2, 3x3), 2.25x fewer multiply-adds, so its figure can "
                "pass the FMA peak; the direct-kernel rows below measure cnnc.compile(..., winograd=False)")
    rows = [fwd, bwd]
    peak = peak_reference(ctx)
    for r in (fwd, bwd, direct_fwd, direct_bwd):
        label = r.label.split(": ")[-1]
        rows.append(Row(r.key + "_peak", f"  {label} as % of {ctx.threads}-thread FMA peak", "%",
                        "higher", [100 * v / peak for v in r.cnnc], [100 * v / peak for v in r.torch]
                        if r.torch else None))
    rows[2].note = (f"peak = {peak:.0f} GFLOP/s: the best FMA sample on {ctx.threads} threads, or {ctx.threads} x the "
                    f"best on 1 thread if higher (another process holding a core depresses the {ctx.threads}-thread "
                    "number; the FMA can only be slowed down, so the best sample is the estimate)")
    return rows


def row_compile(ctx: Ctx) -> list[Row]:
    cold = Row("compile_cold", "compile LeNet-5, cold (cache=False)", "s", "lower")
    numpy_first = Row("compile_numpy", "compile LeNet-5, warm (from the cache), fresh process with numpy imported",
                      "s", "lower")
    warm = Row("compile_warm", "  warm, fresh process, numpy's import included", "s", "lower")
    again = Row("compile_again", "  warm, in a process that has compiled before", "s", "lower")
    run_child(ctx, "child_compile.py", {"path": str(LENET), "cache": True})  # fills this run's cache dir
    cold.cnnc = [run_child(ctx, "child_compile.py", {"path": str(LENET), "cache": False})["compile"]
                 for _ in range(ctx.rep(3, 1))]
    samples = [run_child(ctx, "child_compile.py", {"path": str(LENET), "cache": True}) for _ in range(ctx.rep(5, 3))]
    warm.cnnc = [r["compile"] for r in samples]
    again.cnnc = [r["again"] for r in samples]
    numpy_first.cnnc = [run_child(ctx, "child_compile.py", {"path": str(LENET), "cache": True, "numpy_first": True})
                        ["compile"] for _ in range(ctx.rep(5, 3))]
    imports = [run_child(ctx, "child_imports.py", {}) for _ in range(ctx.rep(5, 3))]
    cold.note = "whole cnnc.compile (parse, passes, LLVM, object code, load) in a fresh process; " \
                "eager PyTorch has no compile step"
    numpy_first.note = ("cnnc.compile of a file compiled before, to a model ready to run, in a fresh process that has "
                        "imported numpy (as any script that makes arrays for the model has); medians of {} processes; "
                        "the next rows: the same with numpy's import ({:.0f} ms alone) counted, and a second compile "
                        "in one process; llvmlite.binding ({:.0f} ms to import) is not loaded from the cache").format(
        len(numpy_first.cnnc), median([r["numpy"] for r in imports]) * 1e3,
        median([r["llvmlite"] for r in imports]) * 1e3)
    return [cold, numpy_first, warm, again]


def row_import(ctx: Ctx) -> list[Row]:
    row = Row("import", "import time (fresh process)", "s", "lower")
    cnnc_sample = lambda: run_child(ctx, "child_import.py", {"module": "cnnc"})["seconds"]  # noqa: E731
    torch_sample = lambda: run_child(ctx, "child_import.py", {"module": "torch"})["seconds"]  # noqa: E731
    alternate(ctx, row, ctx.rep(5, 3), cnnc_sample, torch_sample)
    return [row]


def row_first_step(ctx: Ctx) -> list[Row]:
    row = Row("first_step", "time to first training step (process start)", "s", "lower")
    run_child(ctx, "child_compile.py", {"path": str(LENET), "cache": True})  # warm the cache
    parts: dict[str, list[dict]] = {"cnnc": [], "torch": []}
    params = {"lenet": str(LENET), "mnist": str(MNIST), "threads": ctx.threads,
              "mask": c3_mask_of(ctx.model("lenet5", LENET)).tolist()}

    def sample(side: str, code: str) -> float:
        start = time.time()
        r = run_child(ctx, code, params)
        parts[side].append(r)
        return r["end"] - start

    alternate(ctx, row, ctx.rep(3, 1), lambda: sample("cnnc", "child_first_step_cnnc.py"),
              lambda: sample("torch", "child_first_step_torch.py"), warmup=0)
    desc = []
    for side, rs in parts.items():
        if rs:
            med = {k: median([r[k] for r in rs]) for k in ("import", "build", "data", "step")}
            row.extra[side] = med
            desc.append(f"{side}: import {med['import']:.2f} + build {med['build']:.2f} + data {med['data']:.2f} "
                        f"+ step {med['step']:.3f} s")
    row.note = "; ".join(desc) + " (build = compile from warm cache / nn.Module; same MNIST loader both sides)"
    return [row]


def row_rss(ctx: Ctx) -> list[Row]:
    steps = ctx.rep(300, 100)
    total = Row("rss", f"peak RSS, LeNet-5 {steps} training steps on MNIST", "MiB", "lower")
    during = Row("rss_train", "  peak RSS while training (data loaded)", "MiB", "lower")
    growth = Row("rss_growth", "  RSS growth in training (peak - before)", "MiB", "lower")
    model = ctx.model("lenet5", LENET)
    params = {"lenet": str(LENET), "mnist": str(MNIST), "steps": steps, "threads": ctx.threads,
              "mask": c3_mask_of(model).tolist(), "max_seconds": ctx.rep(40, 15),
              "normalize": model.manifest["train"]["normalize"]}
    run_child(ctx, "child_compile.py", {"path": str(LENET), "cache": True})  # warm the cache
    results: dict[str, dict] = {}

    def sample(side: str, code: str) -> float:
        results[side] = run_child(ctx, code, params)
        return results[side]["peak"]

    alternate(ctx, total, 1, lambda: sample("cnnc", "child_rss_cnnc.py"), lambda: sample("torch", "child_rss_torch.py"),
              warmup=0)
    total.extra.update(results)
    for side in ("cnnc", "torch"):
        r = results.get(side)
        if r and r["train_peak"] is not None:
            setattr(during, side, [r["train_peak"]])
            setattr(growth, side, [r["train_peak"] - r["before"]])
    total.note = ("whole process: imports, loading all 60000 MNIST images (same loader both sides, kept uint8 28x28 "
                  "as stored = 45 MiB) and training, each batch scaled, padded to 32x32 and normalized on the fly "
                  "(cnnc: Model.fit on the uint8 array; PyTorch: the uint8 tensor as torchvision's MNIST keeps it, "
                  "ToTensor + Pad + Normalize per batch); peak while loading: " +
                  ", ".join(f"{k} {v['load_peak']:.0f} MiB" for k, v in results.items()) + "; steps done: " +
                  ", ".join(f"{k} {v['steps']} in {v['seconds']:.1f} s" for k, v in results.items()) +
                  " (the PyTorch loop stops early after max_seconds)")
    if during.cnnc is None:
        during.note = "cannot reset the peak RSS here (/proc/self/clear_refs not writable)"
    else:
        during.note = "peak reset (/proc/self/clear_refs) after loading the data; growth = that peak - RSS before"
    return [total, during, growth]


ROWS: dict[str, Callable[[Ctx], list[Row]]] = {
    "lenet_train": row_lenet_train, "lenet_infer1": row_lenet_infer1, "lenet_infer256": row_lenet_infer256,
    "resnet20_train": row_resnet20_train, "resnet20_infer1": row_resnet20_infer1,
    "resnet20_infer256": row_resnet20_infer256,
    "cifar_train": row_cifar_train, "fma": row_fma, "conv": row_conv, "compile": row_compile,
    "import": row_import, "first_step": row_first_step, "rss": row_rss,
}


# ---- main ------------------------------------------------------------------------------------------------


class CpuMeter:
    """How much of the machine other processes used between start() and stop(): (busy CPU time of all cores,
    from /proc/stat, incl. steal) minus (this process's and its waited-for children's CPU time), as a fraction
    of the machine. 0.5 on 2 cores = one core's worth of someone else's work. None where /proc/stat is missing."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = self._read()

    def _read(self):
        import resource

        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        busy = (user + nice + system + irq + softirq + steal) / self.hz
        total = busy + (idle + iowait) / self.hz
        ours = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))
        return busy, total, ours

    def others(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        busy, total, ours = (e - s for e, s in zip(end, self._start))
        return min(1.0, max(0.0, (busy - ours) / total))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and steps (about a minute)")
    ap.add_argument("--only", default="", help="comma-separated rows to run: " + ", ".join(ROW_NAMES))
    ap.add_argument("--threads", type=int, default=2, help="threads for both cnnc and PyTorch (default 2)")
    ap.add_argument("--json", default=str(HERE / "results.json"), help="where to write the results ('-': nowhere)")
    ap.add_argument("--list", action="store_true", help="list the row names and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(ROW_NAMES))
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(ROW_NAMES)
    unknown = [s for s in only if s not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROW_NAMES)}")
    # before anything builds a Model: cnnc's thread count comes from CNNC_THREADS
    os.environ["CNNC_THREADS"] = str(args.threads)
    sys.path.insert(0, str(HERE))
    started = time.perf_counter()
    run_meter = CpuMeter()
    ctx = Ctx(args)
    try:
        return run_rows(ctx, only, started, run_meter)
    finally:
        shutil.rmtree(ctx.cache_dir, ignore_errors=True)


def run_rows(ctx: Ctx, only: list[str], started: float, run_meter: CpuMeter) -> int:
    args = ctx.args
    os.environ["CNNC_CACHE_DIR"] = ctx.cache_dir  # in-process compiles use (and warm) this run's cache too
    import cnnc

    meta = {"cnnc_version": cnnc.__version__, "torch_version": ctx.torch.__version__ if ctx.torch else None,
            "onnxruntime_version": ctx.ort.__version__ if ctx.ort else None,
            "threads": args.threads, "cpu": cpu_model(), "cores": os.cpu_count(), "quick": args.quick,
            "python": platform.python_version(), "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": os.getloadavg()}
    print(f"[{time.perf_counter() - started:6.1f}s] FMA peak of {meta['cpu']} ...", file=sys.stderr, flush=True)
    meta["peak_gflops"] = peak_reference(ctx)
    meta["fma_1"] = max(ctx.fma["1"])
    meta["llvm_cpu"] = host_cpu()[1]
    print(f"          {meta['fma_1']:.0f} GFLOP/s on 1 thread, {meta['peak_gflops']:.0f} on {args.threads}",
          file=sys.stderr, flush=True)
    rows: list[Row] = []
    for name in ROW_NAMES:
        if name not in only:
            continue
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", file=sys.stderr, flush=True)
        meter = CpuMeter()
        try:
            new = ROWS[name](ctx)
        except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
            traceback.print_exc()
            new = [Row(name, name, "-", "-", note=f"FAILED: {type(e).__name__}: {e}")]
        others = meter.others()
        for r in new:
            if r.others is None:
                r.others = others
        rows.extend(new)
        print(f"          {name} took {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    meta["seconds"] = time.perf_counter() - started
    meta["load_average_at_end"] = os.getloadavg()
    meta["others_cpu_share"] = run_meter.others()
    if ctx.fma:
        meta["fma_peak_gflops"] = {k: median(v) for k, v in ctx.fma.items() if isinstance(v, list)}
    sys.stderr.flush()
    print_table(rows, meta)
    share = meta["others_cpu_share"]
    print(f"total {meta['seconds']:.0f} s; other processes used "
          f"{'?' if share is None else f'{100 * share:.0f}%'} of the machine's CPU time during the run "
          f"(column 'others': during each row); load average {meta['load_average_at_start'][0]:.2f} at the start, "
          f"{meta['load_average_at_end'][0]:.2f} at the end")
    if share is not None and share > 0.1:
        print("WARNING: the machine was not idle; PyTorch's OpenMP threads suffer more than cnnc's from contention, "
              "so ratios from this run are not representative")
    if args.json != "-":
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
