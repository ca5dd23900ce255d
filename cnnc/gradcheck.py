"""`cnnc gradcheck`: the native gradients against central differences of the float64 reference.

The native code computes in float32; the reference (``cnnc.reference``) is an
independent numpy interpreter of the same graph in float64, so its central
differences are accurate to about 1e-8 and any disagreement beyond float32
rounding is a bug in a kernel, a gradient rule or the reference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import networkx as nx
import numpy as np

from cnnc.pipeline import Build
from cnnc.reference import reference_loss
from cnnc_runtime.model import Model

NOISE = 1e-4  # of the largest gradient: what float32 rounding leaves in a gradient that is zero in theory


@dataclass
class Row:
    name: str
    checked: int
    max_abs: float
    max_rel: float


def _without_dropout(checked: nx.DiGraph) -> nx.DiGraph:
    """Dropout masks are random per step; the check runs with p = 0 (dropout's own gradient is the mask)."""
    g = copy.deepcopy(checked)
    for n in g.nodes:
        if g.nodes[n]["op"] == "dropout":
            g.nodes[n]["args"] = {**g.nodes[n]["args"], "p": 0.0}
    return g


def gradcheck(checked: nx.DiGraph, *, batch: int = 4, seed: int = 0, loss: str | None = None, samples: int = 12,
              step: float = 1e-6, floor: float = 1e-6) -> tuple[float, float, list[Row]]:
    """(native loss, reference loss, per-parameter rows) on a random batch.

    For up to `samples` entries of each trainable parameter, the numeric
    derivative is (L(w + h) - L(w - h)) / 2h of the float64 reference loss,
    h = `step` * max(1, |w|); the relative error is |native - numeric| /
    max(|native|, |numeric|, `floor`, 1e-4 * the largest native gradient of the
    network): float32 rounding is relative to the gradients' scale, and some
    entries are zero in theory (a bias before a batchnorm, which subtracts it
    again) and come out as rounding noise of that scale.
    """
    if batch < 1 or samples < 1:
        raise ValueError(f"gradcheck needs batch >= 1 and samples >= 1, got batch={batch}, samples={samples}")
    g = _without_dropout(checked)
    compiled = Build.of_checked(g).compiled()
    model = Model(compiled.manifest, compiled.obj, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.manifest["params"]:
        if p["kind"] == "bias" and p["trainable"]:
            model.params[p["name"]][...] = rng.normal(0, 0.1, p["shape"])
    loss = model.loss_name(loss)
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    k = model.manifest["loss_inputs"][loss]
    y = rng.integers(0, k, batch)
    # x is the network's input as it is (no normalize): the float64 reference sees the very same numbers
    native_loss = model.gradients(x, model.check_targets(y, batch, loss), loss)
    grads = model.grads
    params = {name: v.astype(np.float64) for name, v in model.params.items()}
    ref_loss = reference_loss(g, params, x, y, loss)
    rows = []
    floor = max(floor, NOISE * max((float(np.abs(v).max()) for v in grads.values() if v.size), default=0.0))
    for p in model.manifest["params"]:
        if not p["trainable"]:
            continue
        w = params[p["name"]].reshape(-1)
        candidates = np.arange(w.size)
        if p["connect"] is not None:
            candidates = np.flatnonzero(np.repeat(Model.connect_mask(p).reshape(-1), int(np.prod(p["shape"][2:]))))
        picked = rng.choice(candidates, size=min(samples, candidates.size), replace=False)
        native = grads[p["name"]].reshape(-1)
        max_abs = max_rel = 0.0
        for i in picked:
            keep = w[i]
            h = step * max(1.0, abs(keep))
            w[i] = keep + h
            up = reference_loss(g, params, x, y, loss)
            w[i] = keep - h
            down = reference_loss(g, params, x, y, loss)
            w[i] = keep
            numeric = (up - down) / (2 * h)
            diff = abs(float(native[i]) - numeric)
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(abs(float(native[i])), abs(numeric), floor))
        rows.append(Row(p["name"], len(picked), max_abs, max_rel))
    return native_loss, ref_loss, rows
