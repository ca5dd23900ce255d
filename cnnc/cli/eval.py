"""`cnnc eval`: loss, accuracy and confusion matrix of trained weights on a dataset."""

from __future__ import annotations

import argparse
import json

import numpy as np

from cnnc.cli.common import UsageError, dataset, existing, is_artifact, load_model, path, percent
from cnnc.errors import Diagnostics
from cnnc_runtime.train import confusion_matrix, evaluate


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="loss, accuracy and confusion matrix on the test split",
                        description="Evaluate trained weights on the test split of the data (the train split "
                                    "when there is no test split).")
    ev.add_argument("file", type=path, help="the .cnn file or artifact")
    ev.add_argument("--weights", type=path, metavar="W.npz",
                    help="the trained weights (required for a .cnn file; default for an artifact: its own)")
    ev.add_argument("--data", type=path, metavar="DIR|FILE.npz")
    ev.add_argument("--json", action="store_true", help='print {"loss", "accuracy", "n", "confusion"}')
    ev.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    ev.set_defaults(run=run)


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    artifact = is_artifact(existing(args.file), "eval")
    if not args.weights and not artifact:
        raise UsageError(f"cnnc eval: {args.file} is a .cnn file: give its trained weights with --weights W.npz")
    model = load_model(args.file, args, diag)
    if not args.weights and not model.carries_weights:
        raise UsageError(f"cnnc eval: the artifact {args.file} has no weights (compiled without --weights): "
                         f"give them with --weights W.npz")
    data, source = dataset(args, model)
    split = "test" if "test" in data else "train"
    x, y = data[split]
    try:
        loss, acc, pred = evaluate(model, x, y)
    except ValueError as e:
        raise UsageError(f"cnnc eval: {e}") from None
    k = int(np.prod(model.output_shape))
    conf = confusion_matrix(y, pred, k) if acc is not None else None
    if args.json:
        print(json.dumps({"loss": loss, "accuracy": acc, "n": len(x),
                          "confusion": conf.tolist() if conf is not None else None, "split": split}))
        return 0
    print(f"{model.name} on the {split} split of {source}: {len(x):,} images")
    print(f"loss {loss:.4f}  accuracy {percent(acc)}  error {percent(None if acc is None else 1 - acc)}")
    if conf is not None:
        width = max(5, len(str(conf.max())) + 1)
        print("confusion (rows: true class, columns: predicted)")
        print("     " + "".join(f"{j:>{width}}" for j in range(k)))
        for i, row in enumerate(conf):
            print(f"{i:>4} " + "".join(f"{v:>{width}}" for v in row))
    return 0
