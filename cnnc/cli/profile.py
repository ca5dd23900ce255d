"""`cnnc profile`: where a network's inference call or training step spends its time, layer by layer, against
the machine's FMA peak (``cnnc_runtime.profiler``; this module only formats)."""

from __future__ import annotations

import argparse
import json
import sys

from cnnc.cli.common import integer, source_of
from cnnc.errors import Diagnostics
from cnnc.pipeline import compile_source
from cnnc_runtime.peak import fma_peak
from cnnc_runtime.profiler import Profile, ProfiledModel, profile_inference, profile_training

PHASE_NAMES = {"forward": "forward", "backward": "backward", "loss": "loss", "output": "output copy",
               "wait": "threads meet", "other": ""}


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="time each layer of an inference call or a training step",
                       description="Run a profiling build of the network on random inputs and show, per layer, "
                                   "forward (and with --train backward) time, GFLOP/s, share of the FMA peak "
                                   "(the best sample kept per CPU) and share of the step; then the optimizer, "
                                   "the data preparation, batchnorm's reductions and the remaining overhead.")
    p.add_argument("file", metavar="FILE", help="the network (.cnn)")
    p.add_argument("--batch", type=integer(1, 1 << 16), default=None,
                   help="images per call or step (default: the train section's batch, else 64)")
    p.add_argument("--train", action="store_true",
                   help="profile training steps of fit (the train section's recipe) instead of inference")
    p.add_argument("--threads", type=integer(1), default=None, help="threads (default: CNNC_THREADS, else every "
                                                                     "core this process may use)")
    p.add_argument("--steps", type=integer(1, 100_000), default=None,
                   help="training steps (default 20) or inference calls (default: about 0.3 s worth) to measure")
    p.add_argument("--measure-peak", action="store_true",
                   help="measure the FMA peak again at length (it is kept per CPU, and each run adds a short sample; "
                        "a measurement taken while the machine was busy is too low: the best one is kept)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(run=run)


QUICK = {"seconds": 0.05, "repeats": 3}  # the sample each run adds (about 0.3 s on 2 threads)
FULL = {"seconds": 0.25, "repeats": 5}


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    source = source_of(args.file, "profile")
    manifest, obj = compile_source(source, args.file, profile=True, diag=diag)
    model = ProfiledModel(manifest, obj, threads=args.threads)
    batch = args.batch or int(model.manifest["train"].get("batch", 64))
    if not args.json:
        print(f"measuring... (a sample of the FMA peak, then {'training steps' if args.train else 'calls'})",
              file=sys.stderr, flush=True)
    # Every run takes a short sample too and the cache keeps the best: a first measurement on a busy
    # machine is too low, and would otherwise show layers above 100% of the peak for good.
    peak = fma_peak(model.threads, fresh=True, **(FULL if args.measure_peak else QUICK))
    if args.train:
        profile = profile_training(model, peak, batch, steps=args.steps or 20)
    else:
        profile = profile_inference(model, peak, batch, calls=args.steps)
    if args.json:
        print(json.dumps(profile.as_dict(), indent=1))
    else:
        print(as_table(profile))
    return 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def as_table(p: Profile) -> str:
    """The profile as a table a person reads: one line per layer and pass, then the other parts and the total."""
    what = f"training step of {p.batch} images (fit)" if p.mode == "train" else f"inference call of {p.batch} " \
           "image" + ("s" if p.batch > 1 else "")
    peaks = ", ".join(f"{g:.0f} GFLOP/s on {t} thread{'s' if t > 1 else ''}" for t, g in p.peak_gflops.items())
    head = [f"{p.network}: {what}, {p.threads} thread{'s' if p.threads > 1 else ''}, mean of {p.steps}: "
            f"{_ms(p.step_seconds)} ms",
            f"CPU {p.cpu}: measured FMA peak {peaks}"]
    cols = ("layer", "op", "pass", "ms", "share", "GFLOP/s", "% peak")
    rows = []
    for line in p.lines:
        rows.append((line.name, line.op, PHASE_NAMES.get(line.phase, line.phase), _ms(line.seconds),
                     f"{100 * line.share:.1f}%", "-" if line.gflops is None else f"{line.gflops:.1f}",
                     "-" if line.peak_share is None else f"{100 * line.peak_share:.0f}%"))
    for phase in ("forward", "backward"):
        lines = [x for x in p.lines if x.phase == phase]
        if lines:
            seconds, flops = sum(x.seconds for x in lines), sum(x.flops for x in lines)
            rows.append((f"all layers, {phase}", "", "", _ms(seconds), f"{100 * seconds / p.step_seconds:.1f}%",
                         f"{flops / seconds / 1e9:.1f}" if seconds > 0 and flops else "-", ""))
    rows.append(("total (measured step)", "", "", _ms(p.step_seconds),
                 f"{100 * sum(x.share for x in p.lines):.1f}%", "", ""))
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    rule = "  ".join("-" * w for w in widths)

    def fmt(r) -> str:
        return "  ".join(x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))).rstrip()

    body = [fmt(cols), rule]
    layers = len(p.lines) - sum(1 for x in p.lines if x.phase == "other")
    for i, r in enumerate(rows):
        if i in (layers, len(p.lines)):
            body.append(rule)
        body.append(fmt(r))
    counted, timed = p.native["counted"], p.native["timed"]
    check = (f"check: the layers' cycle counts add up to {100 * counted / timed:.1f}% of the native calls' time "
             "measured around them from Python (the rest: entering and leaving native code, and on several threads "
             "taking the GIL back)" if timed > 0 else "")
    return "\n".join([*head, "", *body, "", *(f"note: {n}" for n in p.notes), check]).rstrip()
