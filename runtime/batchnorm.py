"""Batch normalization at run time: the reductions between a training step's phases, and the running statistics.

A network with batchnorm trains in phases (``cnnc.codegen.module``): every
shard of the batch runs a phase of native code that ends at a batchnorm's
reduction, writing that batchnorm's per-channel float64 partial sums to the
shard's own ``stats`` buffer; then ``Statistics.forward`` or
``Statistics.backward`` reduces them, shard by shard in a fixed order, and
writes the per-channel coefficients the next phase reads. Shards are cut by
the batch size alone, so the result does not depend on the number of threads.
In one process the whole step is one native call per thread
(``phased_LOSS``, ``cnnc.codegen.bnphases``), whose thread 0 does the same
reductions in native code, the same bits; the phases are called one by one
from Python, with the reductions here, when a ``Reducer`` subclass (a
data-parallel rank's) must see the partial sums.

Forward, each shard gives its sum and the sum of squared deviations from its
own mean; Chan et al.'s pairwise update combines them (no cancellation, as
sum-of-squares minus square-of-sum would suffer). Backward, each shard gives
sum(dy) and sum(dy * (x - mean)); their totals are the bias and weight
gradients, and fix the input gradient's per-channel coefficients.

**Data-parallel training** plugs in at ``Reducer``: ``moments`` and ``sums``
receive the shards' partial results and return the whole batch's.
``cnnc_runtime.distributed.RankReducer`` reduces its own shards with the
base class, then gathers the per-rank results and combines them in rank
order (``combine_moments``; the backward sums added in rank order);
``fit`` sets it as ``model.statistics.reducer`` in an MPI job. The weight
and bias gradients written from the backward sums are then the global
batch's on every rank, so ``fit`` keeps them on rank 0 alone before the
gradient all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# ``phased_LOSS(ctx, thread)`` (``cnnc.codegen.bnphases``): a whole step with batchnorm in one native call per
# thread, the reductions in native code; ``ctx`` is an int64 array of these fields (addresses, counts, float32
# values as their bits). The compiler reads this layout, so it is part of the artifact format.
PHASED_FIELDS = (
    "params", "grads", "arena", "x", "out", "targets", "losses", "ws", "stats", "coefs", "seed", "image0",
    "scale", "smooth", "shards", "shard_ranges", "thread_shards", "threads", "barrier", "state", "saved", "failed",
)
PHASED_FIELD = {name: i for i, name in enumerate(PHASED_FIELDS)}


def combine_moments(counts: Sequence[float], means: Sequence[np.ndarray],
                    m2s: Sequence[np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """(count, mean, sum of squared deviations) of the union of parts, combined in order (Chan et al. 1979);
    empty parts are skipped."""
    n, mean, m2 = 0.0, np.zeros_like(means[0]), np.zeros_like(m2s[0])
    for c, mu, q in zip(counts, means, m2s):
        if not c:
            continue
        total = n + c
        delta = mu - mean
        mean = mean + delta * (c / total)
        m2 = m2 + q + delta * delta * (n * c / total)
        n = total
    return n, mean, m2


class Reducer:
    """Partial sums of a step's shards -> the whole batch's: in shard order, in this process (see the module doc)."""

    # True when the statistics cover more than this call's images (a step's `whole` batch, across processes)
    spans_whole_batch = False

    def moments(self, counts: Sequence[float], sums: Sequence[np.ndarray],
                m2s: Sequence[np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
        return combine_moments(counts, [s / c for s, c in zip(sums, counts)], m2s)

    def sums(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        return total


class Statistics:
    """One model's batchnorm layers in a training step: the partial-sum buffers, the coefficients, the reductions."""

    def __init__(self, manifest_bn: dict, aligned_zeros) -> None:
        self.layers = {layer["layer"]: layer for layer in manifest_bn["layers"]}
        self.phases: dict[str, list[dict]] = manifest_bn["phases"]
        self._doubles = int(manifest_bn["stats_doubles"])
        self.coefs = aligned_zeros(int(manifest_bn["bn_floats"]))
        self.coefs_ptr = self.coefs.ctypes.data
        self.partials: list[np.ndarray] = []
        self.partial_ptrs: list[int] = []
        self.reducer = Reducer()
        self._saved: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}  # layer -> (count, mean used, 1/std)
        # the native reductions' (phased_LOSS) mean used and 1/std of each layer, laid out as a shard's partial sums
        self.saved = np.zeros(self._doubles, dtype=np.float64)

    def shard_buffers(self, count: int) -> list[int]:
        """Addresses of `count` shards' partial-sum buffers (made once and kept)."""
        while len(self.partials) < count:
            buf = np.zeros(self._doubles, dtype=np.float64)
            self.partials.append(buf)
            self.partial_ptrs.append(buf.ctypes.data)
        return self.partial_ptrs

    def check_batch(self, n: int) -> None:
        """PyTorch's rule: training needs more than one value per channel (the unbiased variance divides by m - 1)."""
        for name, layer in self.layers.items():
            if n * layer["count"] < 2:
                raise ValueError(f"batchnorm {name} needs more than one value per channel to train; got a batch "
                                 f"of {n} image(s) with {layer['count']} value(s) per channel each")

    def coef(self, name: str, which: str) -> np.ndarray:
        """Batchnorm `name`'s per-channel coefficient `which` (one of ``cnnc_runtime.artifact.BN_COEFS``)."""
        layer = self.layers[name]
        at = layer["coefs"][which]
        return self.coefs[at:at + layer["channels"]]

    def _parts(self, layer: dict, shards: Sequence[tuple[int, int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        c, at = layer["channels"], layer["stats"]
        first = [self.partials[i][at:at + c] for i in range(len(shards))]
        second = [self.partials[i][at + c:at + 2 * c] for i in range(len(shards))]
        return first, second

    def forward(self, name: str, shards: Sequence[tuple[int, int]], params, state) -> None:
        """Batch mean and biased variance of `name` -> its scale and shift for the next phase; the running
        statistics move by momentum towards the mean and the unbiased variance (PyTorch's update)."""
        layer = self.layers[name]
        sums, m2s = self._parts(layer, shards)
        counts = [float((b - a) * layer["count"]) for a, b in shards]
        n, mean, m2 = self.reducer.moments(counts, sums, m2s)
        var = m2 / n
        istd = 1.0 / np.sqrt(var + layer["eps"])
        scale = params[f"{name}.weight"].astype(np.float64) * istd
        mean32 = mean.astype(np.float32)
        self.coef(name, "scale")[...] = scale
        self.coef(name, "shift")[...] = params[f"{name}.bias"] - mean32.astype(np.float64) * scale
        self.coef(name, "mean")[...] = mean32
        self._saved[name] = (n, mean32.astype(np.float64), istd)
        m = layer["momentum"]
        rm, rv = state[f"{name}.running_mean"], state[f"{name}.running_var"]
        rm[...] = (1.0 - m) * rm + m * mean
        rv[...] = (1.0 - m) * rv + m * (m2 / max(n - 1.0, 1.0))

    def backward(self, name: str, shards: Sequence[tuple[int, int]], params, grads) -> None:
        """sum(dy) and sum(dy (x - mean)) of `name` -> its bias and weight gradients (added to `grads`) and
        dx = k dy + cx x + cc per channel, the gradient through the batch statistics."""
        layer = self.layers[name]
        first, second = self._parts(layer, shards)
        sdy, sdyx = self.reducer.sums(first), self.reducer.sums(second)
        n, mean, istd = self._saved[name]
        gw, gb = grads[f"{name}.weight"], grads[f"{name}.bias"]
        gw += (sdyx * istd).astype(np.float32)
        gb += sdy.astype(np.float32)
        k = params[f"{name}.weight"].astype(np.float64) * istd
        cx = -k * istd * istd * sdyx / n
        self.coef(name, "k")[...] = k
        self.coef(name, "cx")[...] = cx
        self.coef(name, "cc")[...] = -k * sdy / n - cx * mean
