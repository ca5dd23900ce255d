"""`cnnc gradcheck`: the native gradients against float64 central differences."""

from __future__ import annotations

import argparse
import sys

from cnnc.cli.common import integer, path, real, source_of
from cnnc.errors import Diagnostics
from cnnc.pipeline import Build
from cnnc_runtime.losses import LOSSES

MAX_GRADCHECK_BATCH = 1024  # a random batch to check gradients on; its float64 reference runs per sample


def add_parser(sub: argparse._SubParsersAction) -> None:
    gc = sub.add_parser("gradcheck", help="native gradients against float64 central differences",
                        description="Compare the native (float32) gradients with central finite differences of "
                                    "an independent float64 numpy evaluation of the same network, on a small "
                                    "random batch, per parameter. Dropout is switched off for the check.")
    gc.add_argument("file", type=path, help="the .cnn file")
    gc.add_argument("--batch", type=integer(1, MAX_GRADCHECK_BATCH), default=4,
                    help=f"images in the random batch, 1 to {MAX_GRADCHECK_BATCH} (default 4)")
    gc.add_argument("--samples", type=integer(1), default=12, help="entries checked per parameter (default 12)")
    gc.add_argument("--loss", choices=list(LOSSES), help="default: the train section's loss")
    gc.add_argument("--seed", type=integer(0), default=0)
    gc.add_argument("--tolerance", type=real(0, what="a non-negative number"), default=1e-2,
                    help="exit 1 above this relative error (1e-2)")
    gc.set_defaults(run=run)


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    from cnnc.gradcheck import gradcheck  # lazy: the float64 reference and networkx, for this command only

    checked = Build(source_of(args.file, "gradcheck"), args.file, diag).checked()
    native, ref, rows = gradcheck(checked, batch=args.batch, seed=args.seed, loss=args.loss, samples=args.samples)
    print(f"loss: native (float32) {native:.8f}, reference (float64) {ref:.8f}, "
          f"relative difference {abs(native - ref) / max(abs(ref), 1e-12):.2e}")
    width = max(len(r.name) for r in rows) if rows else 9
    print(f"{'parameter':<{width}}  checked  max abs error  max rel error")
    for r in rows:
        print(f"{r.name:<{width}}  {r.checked:>7}  {r.max_abs:>13.2e}  {r.max_rel:>13.2e}")
    if not rows:
        print("no trainable parameters")
        return 0
    worst = max(rows, key=lambda r: r.max_rel)
    print(f"largest relative error: {worst.max_rel:.2e} ({worst.name}); float32 gradients against float64 "
          f"central differences")
    if worst.max_rel > args.tolerance:
        print(f"gradcheck failed: {worst.max_rel:.2e} > {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0
