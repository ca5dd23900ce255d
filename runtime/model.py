"""``Model``: a compiled network in this process, with its parameters, ready to run and train.

All parameters live in one flat, 64-byte-aligned float32 buffer; ``params``
maps each parameter name to a writable view of it, so writing into a view
changes the model. Gradients use a second buffer of the same layout.

Inputs are checked before any native code sees them: ``x`` must be
``(N, C, H, W)`` (or ``(N, F)`` for a vector input) with ``N >= 1``. Other
real or integer dtypes (float64, int64 ...) and non-contiguous arrays are
converted to contiguous float32; anything else raises ``ValueError`` naming
the expected shape. uint8 arrays are images as stored (MNIST's (N, 28, 28)):
they are prepared as ``cnnc train`` prepares a dataset (scaled to [0, 1],
given a channel axis, zero-padded to the input size, normalized with the
train section's mean and std), and ``fit`` / ``evaluate`` do that a batch at
a time, so a dataset stays in memory at its stored size.
"""

from __future__ import annotations

import ctypes
import io
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnc_runtime import artifact
from cnnc_runtime.host import host_cpu, missing_features
from cnnc_runtime.native import NativeLibrary
from cnnc_runtime.parallel import Pool, default_threads, shared_pool, split

if TYPE_CHECKING:  # loaded where used: a model loaded from the cache runs without them
    from cnnc_runtime.data import Inputs

CHUNK = 256  # images per native call when a large array is run: bounds the arena's size
MIN_IMAGES_PER_THREAD = 4
ALIGN_BYTES = 64
P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
LOSSES = ("cross_entropy", "mse")


def aligned_zeros(n: int) -> np.ndarray:
    """A zeroed float32 array of n elements whose data starts on a 64-byte boundary."""
    raw = np.zeros(n + ALIGN_BYTES // 4, dtype=np.float32)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // 4
    return raw[skip:skip + n]


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class NativeUpdate:
    """An optimizer loop in a model's code; holds that code, so an optimizer may outlive the model."""

    def __init__(self, fn, lib: NativeLibrary) -> None:
        self._fn = fn
        self._lib = lib

    def __call__(self, *args: int) -> None:
        self._fn(*args)


def compatible_version(built: str, running: str) -> bool:
    """Artifacts are compatible within a major.minor release of cnnc."""
    return built.split(".")[:2] == running.split(".")[:2]


class Model:
    """A compiled network: call it on a batch, train it, save and load its weights."""

    def __init__(self, manifest: dict[str, Any], obj: bytes, weights: bytes = b"", seed: int = 0,
                 threads: int | None = None) -> None:
        from cnnc_runtime import __version__

        artifact.validate(manifest)
        artifact.verify_code(manifest, obj)
        if manifest.get("format") != artifact.FORMAT_VERSION:
            raise ValueError(f"artifact format {manifest.get('format')} is not supported by this cnnc "
                             f"(expects {artifact.FORMAT_VERSION}); recompile the network")
        if not compatible_version(manifest.get("cnnc_version", "?"), __version__):
            raise ValueError(f"artifact built by cnnc {manifest.get('cnnc_version')} cannot be run by cnnc "
                             f"{__version__}; recompile the network")
        t = manifest["target"]
        triple, _, _ = host_cpu()
        if t["triple"].split("-")[0] != triple.split("-")[0]:
            raise ValueError(f"artifact built for {t['triple']}, but this machine is {triple}")
        missing = missing_features(t["features"])
        if missing:
            raise ValueError(f"artifact built for a {t['cpu']} CPU; this CPU lacks {', '.join(missing)}. "
                             f"Recompile here (or with CNNC_TARGET=generic for any x86-64)")
        self.manifest = manifest
        self.name: str = manifest["network"]
        self.input_shape: tuple[int, ...] = tuple(manifest["input"]["shape"])
        self.output_shape: tuple[int, ...] = tuple(manifest["output"]["shape"])
        self._lib = NativeLibrary(obj, t["triple"], t["cpu"], t["features"])
        self._obj = obj
        self._infer = self._lib.function("infer", [P, P, P, P, P, I64, I64])
        self._steps = {loss: self._lib.function(f"step_{loss}", [P] * 8 + [I64, F32, I64, I64]) for loss in LOSSES}
        self._jitter = self._lib.function("jitter", [P, I64, F32, P, I64, I64])
        self._updates: dict[str, Any] = {}
        self.flat_params = aligned_zeros(manifest["param_floats"])
        self.flat_grads = aligned_zeros(manifest["param_floats"])
        self._layout = manifest["params"]
        self.params: dict[str, np.ndarray] = {p["name"]: self._view(self.flat_params, p) for p in self._layout}
        self.trainable_mask = np.zeros(manifest["param_floats"], dtype=np.float32)
        self.decay_mask = np.zeros(manifest["param_floats"], dtype=np.float32)
        for p in self._layout:
            span = slice(p["offset"], p["offset"] + p["size"])
            self.trainable_mask[span] = 1.0 if p["trainable"] else 0.0
            self.decay_mask[span] = 1.0 if (p["trainable"] and p["decay"]) else 0.0
        self.threads = threads or default_threads()
        self._pool: Pool | None = None
        # per thread: conv scratch space and a gradient buffer (thread 0 uses flat_grads)
        self._ws = [aligned_zeros(max(manifest["ws_floats"], 16)) for _ in range(self.threads)]
        self._thread_grads = [self.flat_grads] + [aligned_zeros(manifest["param_floats"])
                                                  for _ in range(self.threads - 1)]
        self._arenas: dict[str, np.ndarray] = {}
        # these buffers never move (updates write into them), so their addresses are read once
        self._params_ptr = self.flat_params.ctypes.data
        self._ws_ptrs = [w.ctypes.data for w in self._ws]
        self._grad_ptrs = [g.ctypes.data for g in self._thread_grads]
        self.initialize(seed)
        if weights:
            self._load_arrays(np.load(io.BytesIO(weights)), "the artifact's weights")

    # ---- parameters ---------------------------------------------------------

    @staticmethod
    def _view(buf: np.ndarray, p: dict) -> np.ndarray:
        return buf[p["offset"]:p["offset"] + p["size"]].reshape(p["shape"])

    def initialize(self, seed: int = 0) -> None:
        """Fresh weights, reproducible from `seed`.

        Weights are drawn from a normal with standard deviation sqrt(g / fan_in),
        fan_in = in_channels/groups * kh * kw (conv) or in_features (dense):
        g = 2 for layers that feed a ReLU (He et al. 2015), g = 1 otherwise
        (LeCun et al. 1998). With a ``connect`` table, fan_in counts only the
        connected inputs and unconnected weights are zero. Biases start at 0;
        weights written in the .cnn file are copied in.
        """
        rng = np.random.default_rng(seed)
        for p in self._layout:
            view = self.params[p["name"]]
            if p["fixed"] is not None:
                view[...] = np.asarray(p["fixed"], dtype=np.float32)
            elif p["kind"] == "bias":
                view[...] = 0.0
            else:
                gain = 2.0 if p["init"]["scheme"] == "he" else 1.0
                shape = p["shape"]
                w = rng.standard_normal(shape, dtype=np.float32)
                if p["connect"] is not None:
                    mask = self.connect_mask(p)
                    fan_in = mask.sum(axis=1, keepdims=True) * int(np.prod(shape[2:]))
                    w *= np.sqrt(gain / fan_in).reshape(-1, 1, 1, 1).astype(np.float32)
                    w *= mask[:, :, None, None]
                else:
                    w *= np.float32(np.sqrt(gain / max(p["init"]["fan_in"], 1)))
                view[...] = w

    @staticmethod
    def connect_mask(p: dict) -> np.ndarray:
        """(out, in) of 0/1: which input channels each output channel of a tabled conv reads."""
        mask = np.zeros(p["shape"][:2], dtype=np.float32)
        for o, row in enumerate(p["connect"]):
            mask[o, row] = 1.0
        return mask

    def state(self) -> dict[str, np.ndarray]:
        """Copies of all parameters by name (what ``save`` writes)."""
        return {k: v.copy() for k, v in self.params.items()}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the weights as .npz keyed by parameter name, atomically (temp file, fsync, rename)."""
        from cnnc_runtime.fileio import atomic_save_npz

        atomic_save_npz(path, self.params)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read weights saved by ``save``; names or shapes that do not match raise ``ValueError``."""
        try:
            with np.load(path) as data:
                self._load_arrays(data, str(path))
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: cannot read weights ({e})") from None
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path}: not a weights file written by save() (.npz): {e}") from None

    def _load_arrays(self, data: Mapping[str, np.ndarray], source: str) -> None:
        names = set(data.keys())
        missing = sorted(set(self.params) - names)
        extra = sorted(names - set(self.params))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected {', '.join(extra)}")
            raise ValueError(f"{source} does not match network {self.name}: {'; '.join(parts)}")
        for name, view in self.params.items():
            arr = np.asarray(data[name])
            if arr.shape != view.shape:
                raise ValueError(f"{source}: {name} has shape {_fmt(arr.shape)}, the network needs {_fmt(view.shape)}")
        for name, view in self.params.items():
            view[...] = data[name]

    def summary(self) -> str:
        """The `cnnc check` table of this network."""
        return self.manifest["summary"]

    # ---- checking inputs -----------------------------------------------------

    def check_input(self, x: Any) -> np.ndarray:
        """``x`` as contiguous float32 ``(N, *input_shape)``, or ``ValueError`` naming the expected shape."""
        if (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape[1:] == self.input_shape
                and x.ndim == len(self.input_shape) + 1 and x.shape[0] >= 1 and x.flags.c_contiguous):
            return x  # the common case, checked without building any message
        expected = "(N, " + ", ".join(str(d) for d in self.input_shape) + ")"
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as e:
                raise ValueError(f"expected input of shape {expected} as a numeric array: {e}") from None
        if x.dtype.kind not in "fiub":
            raise ValueError(f"expected input of shape {expected} with a numeric dtype, got dtype {x.dtype}")
        if x.dtype == np.uint8:
            images = self.inputs(x)
            return images.batch(slice(None), self.batch_buffer(len(images)))
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected input of shape {expected}, got {_fmt(x.shape)}")
        if x.shape[0] < 1:
            raise ValueError(f"expected input of shape {expected} with N >= 1, got an empty batch")
        return np.ascontiguousarray(x, dtype=np.float32)

    def inputs(self, x: Any) -> Inputs:
        """``x`` as an ``Inputs`` set to take batches from: uint8 images kept as stored, anything else checked."""
        from cnnc_runtime.data import Inputs

        if isinstance(x, Inputs):
            if x.input_shape != self.input_shape or not (x.stored or x.prepared_float32):
                raise ValueError(f"these Inputs are for {_fmt(x.input_shape)} images as float32 or uint8; this "
                                 f"network takes {_fmt(self.input_shape)}")
            return x
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8):
            return Inputs(self.check_input(x), self.input_shape)
        expected = "(N, " + ", ".join(str(d) for d in self.input_shape) + ")"
        if len(x) < 1:
            raise ValueError(f"expected input of shape {expected} with N >= 1, got an empty batch")
        try:
            return Inputs(x, self.input_shape, self.manifest["train"].get("normalize"))
        except ValueError as e:
            raise ValueError(f"expected input of shape {expected}, or uint8 images (N, H, W), (N, C, H, W) "
                             f"or (N, H, W, C) no larger than that, got {_fmt(x.shape)}: {e}") from None

    def batch_buffer(self, n: int) -> np.ndarray:
        """A 64-byte-aligned float32 ``(n, *input_shape)`` buffer for prepared inputs."""
        return aligned_zeros(n * int(np.prod(self.input_shape))).reshape(n, *self.input_shape)

    def check_targets(self, y: Any, n: int, loss: str) -> np.ndarray:
        """Labels (int32, one per image, in range) for cross-entropy; float32 targets for mse."""
        k = self.manifest["loss_inputs"][loss]
        y = np.asarray(y)
        if loss == "cross_entropy" or y.dtype.kind in "iub":
            if y.dtype.kind not in "iub" or y.shape != (n,):
                raise ValueError(f"expected {n} integer labels of shape ({n},), got {y.dtype} {_fmt(y.shape)}")
            if n and (y.min() < 0 or y.max() >= k):
                bad = int(y.min()) if y.min() < 0 else int(y.max())
                raise ValueError(f"label {bad} is out of range: the network has {k} outputs (labels 0..{k - 1})")
            if loss == "cross_entropy":
                return np.ascontiguousarray(y, dtype=np.int32)
            onehot = np.zeros((n, k), dtype=np.float32)
            onehot[np.arange(n), y] = 1.0
            return onehot
        if y.dtype.kind != "f" or y.size != n * k or y.shape[0] != n:
            raise ValueError(f"expected mse targets of shape {_fmt((n, *self.output_shape))}, got {_fmt(y.shape)}")
        return np.ascontiguousarray(y.reshape(n, k), dtype=np.float32)

    # ---- running -------------------------------------------------------------

    def _arena(self, kind: str, images: int) -> np.ndarray:
        need = self.manifest[f"arena_{kind}"] * images
        buf = self._arenas.get(kind)
        if buf is None or buf.size < need:
            buf = aligned_zeros(need)
            self._arenas[kind] = buf
        return buf

    def forward(self, x: Any) -> np.ndarray:
        """The network's output for a batch: ``(N, *output_shape)``; dropout is off."""
        x = self.check_input(x)
        n = x.shape[0]
        y = np.empty((n, *self.output_shape), dtype=np.float32)
        self._infer_into(x, y, single=n < 2 * MIN_IMAGES_PER_THREAD)
        return y

    def _infer_into(self, x: np.ndarray, y: np.ndarray, single: bool) -> None:
        """y = the network on the checked x; `single`: one call, no thread hand-off (small batches)."""
        n = x.shape[0]
        arena = self._arena("infer", min(n, CHUNK)).ctypes.data
        params, ws, xp, yp = self._params_ptr, self._ws_ptrs, x.ctypes.data, y.ctypes.data
        if single:
            self._infer(params, arena, xp, yp, ws[0], 0, n)
            return
        in_bytes, out_bytes = x[0].nbytes, y[0].nbytes
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            xs, ys = xp + start * in_bytes, yp + start * out_bytes

            def task(t: int, a: int, b: int, xs=xs, ys=ys) -> None:
                self._infer(params, arena, xs, ys, ws[t], a, b)

            self._parallel(stop - start, task)

    def _parallel(self, n: int, task) -> list[tuple[int, int]]:
        """Run ``task(thread, n0, n1)`` over [0, n) split across the pool's threads."""
        ranges = split(n, self.threads, MIN_IMAGES_PER_THREAD) if self.threads > 1 else [(0, n)]
        if len(ranges) == 1:
            task(0, 0, n)
            return ranges
        if self._pool is None:
            self._pool = shared_pool(self.threads)
        self._pool.run([lambda t=t, a=a, b=b: task(t, a, b) for t, (a, b) in enumerate(ranges)])
        return ranges

    __call__ = forward

    def predict(self, x: Any) -> np.ndarray:
        """The most likely class of each image."""
        return self.forward(x).reshape(len(x), -1).argmax(axis=1)

    def loss_name(self, loss: str | None) -> str:
        loss = loss or self.manifest["train"].get("loss", "cross_entropy")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose {' or '.join(LOSSES)}")
        return loss

    def _accumulate_gradients(self, x: np.ndarray, targets: np.ndarray, loss: str, seed: int,
                              scale: float, out: np.ndarray, losses: np.ndarray,
                              prepare: Callable[[int, int, int], None] | None = None) -> None:
        """Add scale * d(sum of losses)/d(params) into ``flat_grads``; fill ``out`` and ``losses``. Inputs checked.

        ``prepare(thread, a, b)``, when given, first fills images [a, b) of `x`, on the thread that then
        runs them: the batch is gathered and converted on every core, and stays in that core's cache.
        """
        n = x.shape[0]
        arena = self._arena("train", min(n, CHUNK)).ctypes.data
        step = self._steps[loss]
        params, ws, grads = self._params_ptr, self._ws_ptrs, self._grad_ptrs
        in_bytes, t_bytes, o_bytes = x[0].nbytes, targets[0].nbytes, out[0].nbytes
        used = 1
        try:
            for start in range(0, n, CHUNK):
                stop = min(n, start + CHUNK)
                xs, os_, ts, ls = (x.ctypes.data + start * in_bytes, out.ctypes.data + start * o_bytes,
                                   targets.ctypes.data + start * t_bytes, losses.ctypes.data + start * 4)

                def task(t: int, a: int, b: int, xs=xs, os_=os_, ts=ts, ls=ls, start=start) -> None:
                    if prepare is not None:
                        prepare(t, start + a, start + b)
                    # the dropout hash counts images from `seed`: offset it so chunks draw different masks
                    step(params, grads[t], arena, xs, os_, ts, ls, ws[t], (seed + start) % (1 << 63), scale, a, b)

                used = max(used, len(self._parallel(stop - start, task)))
        except BaseException:  # (Ctrl-C, or a failed prepare) the other threads' partial sums must not linger
            for g in self._thread_grads[1:]:
                g[...] = 0.0
            raise
        for g in self._thread_grads[1:used]:
            self.flat_grads += g
            g[...] = 0.0

    def native_update(self, optimizer) -> NativeUpdate | None:
        """This model's compiled loop for `optimizer`'s rule, for ``optimizer.use_native``; None if there is none.

        None too for a subclass of a built-in optimizer (its rule may differ),
        and when the code lists the rule's constants in another order.
        """
        kind = optimizer.native_kind
        listed = self.manifest.get("updates", {}).get(kind)
        if not kind or listed != list(optimizer.constant_names):
            return None
        if kind not in self._updates:
            fn = self._lib.function(f"update_{kind}", [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2)
            self._updates[kind] = NativeUpdate(fn, self._lib)
        return self._updates[kind]

    def add_noise(self, x: np.ndarray, sigma: float, seed: int) -> None:
        """x += N(0, sigma^2) noise, in place, drawn natively from `seed` (training's input jitter).

        `x` must be a contiguous float32 ``(N, *input_shape)`` array: it is written to.
        """
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
                and x.flags.writeable and x.shape[1:] == self.input_shape and x.ndim == len(self.input_shape) + 1):
            raise ValueError(f"add_noise needs a writable contiguous float32 array of shape "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        self._noise_rows(x.ctypes.data, sigma, seed, 0, 0, x.shape[0])

    def _noise_rows(self, x: int, sigma: float, seed: int, thread: int, a: int, b: int) -> None:
        """Images [a, b) of the checked batch at address `x` get the noise `add_noise` would give them."""
        self._jitter(x, seed % (1 << 63), sigma, self._ws_ptrs[thread], a, b)

    def value_and_grad(self, x: Any, y: Any, loss: str | None = None, seed: int = 0) -> tuple[float, dict]:
        """The mean loss over the batch and its gradient for every parameter (same keys as ``params``).

        Cross-entropy is softmax followed by the negative log-likelihood of the
        integer labels; mse is the mean of (o - y)^2 over all outputs, with
        integer labels taken as one-hot targets. Dropout is on, its masks drawn
        from `seed`. Frozen parameters get zero gradients.
        """
        loss = self.loss_name(loss)
        x = self.check_input(x)
        n = x.shape[0]
        targets = self.check_targets(y, n, loss)
        k = self.manifest["loss_inputs"][loss]
        scale = 1.0 / n if loss == "cross_entropy" else 1.0 / (n * k)
        out = np.empty((n, k), dtype=np.float32)
        losses = np.empty(n, dtype=np.float32)
        self.flat_grads[...] = 0.0
        self._accumulate_gradients(x, targets, loss, seed, scale, out, losses)
        value = float(losses.sum(dtype=np.float64) * scale)
        grads = {p["name"]: self._view(self.flat_grads, p).copy() for p in self._layout}
        return value, grads

    def fit(self, x: Any, y: Any, **kwargs: Any):
        """Train on (x, y); see ``cnnc_runtime.train.fit`` for the settings. Returns a ``History``."""
        from cnnc_runtime.train import fit

        return fit(self, x, y, **kwargs)

    def evaluate(self, x: Any, y: Any, loss: str | None = None) -> tuple[float, float | None]:
        """(mean loss, accuracy) on a whole set, dropout off."""
        from cnnc_runtime.train import evaluate

        value, acc, _ = evaluate(self, x, y, loss)
        return value, acc

    def save_artifact(self, path: str | os.PathLike[str], with_weights: bool = True,
                      key: bytes | str | os.PathLike[str] | None = None) -> None:
        """Write this model (code, manifest and, by default, the current weights) as one artifact file.

        With a `key` (bytes, or a key file's path) the artifact is signed: ``load(path, key=...)`` checks it.
        """
        weights = b""
        if with_weights:
            buf = io.BytesIO()
            np.savez(buf, **self.params)
            weights = buf.getvalue()
        artifact.write(path, self.manifest, self._obj, weights, key)


def load(path: str | os.PathLike[str], key: bytes | str | os.PathLike[str] | None = None) -> Model:
    """Load an artifact written by ``cnnc compile -o``: needs only numpy and llvmlite.

    An artifact is native code, as trusted as a shared library. With a `key`
    (bytes, or a key file's path) one that is unsigned or not signed with it
    is refused before any of its code is mapped.
    """
    manifest, obj, weights = artifact.read(Path(path), key)
    try:
        return Model(manifest, obj, weights)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

