"""The artifact file: native code plus a JSON manifest (and optionally weights), in one file.

Layout: ``CNNCART1`` magic, then four length-prefixed sections (little-endian
u64 length, then the bytes): the manifest (UTF-8 JSON), the object code, the
weights (an .npz, possibly empty), and the SHA-256 of each of the three; a
signed artifact has a fifth, the HMAC-SHA256 of all that precedes it
(``cnnc_runtime.signing``).

An artifact is native code, as trusted as a shared library: the checksums
catch damage, only a signature checked with a key catches tampering. What the
runtime can check, it checks before any code is mapped: the signature (when a
key is given), the checksums, every manifest field it uses (types, ranges,
consistency: ``validate``), and that the manifest's layout is the one the code
was compiled for (the compiler records it in the code: ``verify_code``). A
damaged or hand-edited file is a ``ValueError``, never a crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cnnc_runtime import elfload, fileio, rules, schedule, signing
from cnnc_runtime.losses import LOSSES, choices
from cnnc_runtime.native import unbundle

MAGIC = b"CNNCART1"
# 2: the code records the layout it was compiled for (CONTRACT_SYMBOL); 3: update loops take the decay mask;
# 4: step, jitter and augment take image0 (draws by each image's index in the whole batch); 6: infer reads the
# trained weights and the batchnorm coefficients fold writes (infer(params, folded, ...)), and infer_split
FORMAT_VERSION = 6
CONTRACT_SYMBOL = "cnnc_contract"
ENTRY_POINTS = ("infer", *(f"step_{loss}" for loss in LOSSES), "jitter", "augment")
MAX_FLOATS = 1 << 40  # a buffer size past this is a damaged manifest, not a network
MAX_RANK = 8


def _digest(*sections: bytes) -> bytes:
    return b"".join(hashlib.sha256(s).digest() for s in sections)


def _section(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def pack(manifest: dict[str, Any], obj: bytes, weights: bytes = b"", key: signing.Key | None = None) -> bytes:
    """The artifact's bytes; signed with `key` (bytes, or a key file's path) when one is given."""
    text = json.dumps(manifest, sort_keys=True).encode()
    body = MAGIC + b"".join(_section(s) for s in (text, obj, weights, _digest(text, obj, weights)))
    if key is None:
        return body
    return body + _section(signing.tag(signing.read_key(key), body))


def _split(data: bytes, source: str) -> tuple[list[bytes], int]:
    """The four sections and where the last one ends."""
    at, sections = len(MAGIC), []
    for _ in range(4):
        if at + 8 > len(data):
            raise ValueError(f"{source}: truncated cnnc artifact")
        (n,) = struct.unpack_from("<Q", data, at)
        at += 8
        if n > len(data) - at:
            raise ValueError(f"{source}: truncated cnnc artifact")
        sections.append(data[at:at + n])
        at += n
    return sections, at


def _signature(data: bytes, at: int, source: str) -> bytes | None:
    """The signature section after byte `at` (None when the file ends there)."""
    if at == len(data):
        return None
    if len(data) - at != 8 + signing.TAG_BYTES or struct.unpack_from("<Q", data, at)[0] != signing.TAG_BYTES:
        raise ValueError(f"{source}: corrupt cnnc artifact (unexpected bytes after its sections)")
    return data[at + 8:]


def unpack(data: bytes, source: str = "artifact",
           key: signing.Key | None = None) -> tuple[dict[str, Any], bytes, bytes]:
    """(manifest, object code, weights); a file that is not a sound artifact raises ``ValueError``.

    With a `key`, the signature is checked first: an unsigned artifact or one whose signature differs is refused.
    """
    if not data.startswith(MAGIC):
        raise ValueError(f"{source}: not a cnnc artifact (bad magic bytes)")
    secret = signing.read_key(key) if key is not None else None
    sections, at = _split(data, source)
    signature = _signature(data, at, source)
    if secret is not None:
        signing.verify(secret, data[:at], signature, source)
    if sections[3] != _digest(*sections[:3]):
        raise ValueError(f"{source}: corrupt cnnc artifact (a checksum of its manifest, code or weights differs)")
    try:
        manifest = json.loads(sections[0].decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{source}: corrupt manifest ({e})") from None
    validate(manifest, source)
    _check_weights(sections[2], source)
    return manifest, sections[1], sections[2]


def write(path: str | Path, manifest: dict[str, Any], obj: bytes, weights: bytes = b"",
          key: signing.Key | None = None) -> None:
    """Write an artifact atomically; signed with `key` when one is given."""
    fileio.atomic_write_bytes(path, pack(manifest, obj, weights, key))  # (looked up now: tests replace it)


def read(path: str | Path, key: signing.Key | None = None) -> tuple[dict[str, Any], bytes, bytes]:
    """(manifest, object code, weights) of an artifact file, checked (see ``unpack``)."""
    return unpack(Path(path).read_bytes(), str(path), key)


# ---- the manifest --------------------------------------------------------------------------------


class _Fields:
    """Checks the fields of one manifest, each failure a ValueError naming the field."""

    def __init__(self, source: str | None) -> None:
        self.prefix = f"{source}: " if source else ""

    def fail(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.prefix}manifest field {field!r} {problem}")

    def get(self, obj: dict, key: str, field: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        if key not in obj:
            if optional:
                return None
            raise self.fail(field, "is missing")
        value = obj[key]
        if optional and value is None:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            raise self.fail(field, f"must be {_kind_name(kind)}, got {_describe(value)}")
        return value

    def count(self, obj: dict, key: str, field: str, least: int = 0, optional: bool = False) -> int | None:
        value = self.get(obj, key, field, int, optional)
        if value is not None and not least <= value <= MAX_FLOATS:
            raise self.fail(field, f"must be an integer in [{least}, {MAX_FLOATS}], got {value}")
        return value

    def number(self, obj: dict, key: str, field: str, optional: bool = True) -> float | None:
        value = self.get(obj, key, field, (int, float), optional)
        if value is not None and not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, got {value}")
        return value

    def shape(self, obj: dict, key: str, field: str, ranks: tuple[int, ...] = tuple(range(1, MAX_RANK + 1))) -> list:
        dims = self.get(obj, key, field, list)
        if len(dims) not in ranks or not all(type(d) is int and 1 <= d <= MAX_FLOATS for d in dims):
            raise self.fail(field, f"must be a list of {' or '.join(map(str, ranks))} positive integers, got {dims}")
        if math.prod(dims) > MAX_FLOATS:
            raise self.fail(field, f"{dims} is too large")
        return dims


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true or false"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _tuple(kind)))


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {_short(value)}"


def validate(manifest: Any, source: str | None = None) -> None:
    """Check every manifest field the runtime uses: types, ranges and consistency. ``ValueError`` names the field.

    Unknown fields are ignored. Whether the sizes are the ones the code needs is ``verify_code``'s question.
    """
    prefix = f"{source}: " if source else ""
    if not isinstance(manifest, dict):
        raise ValueError(f"{prefix}corrupt manifest (a JSON {type(manifest).__name__}, expected an object)")
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{prefix}artifact format {_short(manifest.get('format'))} is not supported by this "
                         f"cnnc (expects {FORMAT_VERSION}); recompile the network")
    f = _Fields(source)
    f.get(manifest, "cnnc_version", "cnnc_version", str)
    f.get(manifest, "network", "network", str)
    target = f.get(manifest, "target", "target", dict)
    for k in ("triple", "cpu", "features"):
        f.get(target, k, f"target.{k}", str)
    f.shape(f.get(manifest, "input", "input", dict), "shape", "input.shape", (1, 3))
    output = f.get(manifest, "output", "output", dict)
    f.shape(output, "shape", "output.shape")
    f.get(output, "op", "output.op", str)
    losses = f.get(manifest, "loss_inputs", "loss_inputs", dict)
    for loss in LOSSES:
        f.count(losses, loss, f"loss_inputs.{loss}", least=1)
    for k in ("arena_infer", "arena_train", "ws_floats"):
        f.count(manifest, k, k)
    f.count(manifest, "infer_parts", "infer_parts", optional=True)  # threads infer_split is compiled for (0: none)
    f.count(manifest, "ws_cache_floats", "ws_cache_floats", optional=True)  # kept Winograd weights, before ws
    f.get(manifest, "infer_handoff", "infer_handoff", bool, optional=True)  # split_call/serve compiled
    f.get(manifest, "infer_claim", "infer_claim", bool, optional=True)  # infer_claim compiled
    total = f.count(manifest, "param_floats", "param_floats", least=1)
    _check_params(f, f.get(manifest, "params", "params", list), total)
    _check_batchnorm(f, f.get(manifest, "batchnorm", "batchnorm", dict, optional=True))
    updates = f.get(manifest, "updates", "updates", dict)
    for kind, names in updates.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise f.fail(f"updates.{kind}", f"must be a list of strings, got {_describe(names)}")
    for key in ("run_fields", "phased_fields"):  # (a run's ctx: steploop.FIELDS; phased_LOSS's: batchnorm's)
        fields = f.get(manifest, key, key, list, optional=True)
        if fields is not None and not all(isinstance(n, str) for n in fields):
            raise f.fail(key, "must be a list of strings")
    f.get(manifest, "has_dropout", "has_dropout", bool)
    f.get(manifest, "summary", "summary", str)
    warnings = f.get(manifest, "warnings", "warnings", list, optional=True)
    if warnings is not None and not all(isinstance(w, str) for w in warnings):
        raise f.fail("warnings", "must be a list of strings")
    _check_train(f, f.get(manifest, "train", "train", dict))


def _check_layout(f: _Fields, slots: list, total: int, field: str, kinds: tuple[str, ...], total_name: str) -> None:
    """Each slot: a unique name, a kind of `kinds`, a shape whose product is its size, inside `total` floats,
    overlapping no other."""
    names: set[str] = set()
    spans = []
    for i, p in enumerate(slots):
        where = f"{field}[{i}]"
        if not isinstance(p, dict):
            raise f.fail(where, f"must be an object, got {_describe(p)}")
        name = f.get(p, "name", f"{where}.name", str)
        if name in names:
            raise f.fail(f"{where}.name", f"repeats name {name!r}")
        names.add(name)
        f.get(p, "layer", f"{where}.layer", str)
        if f.get(p, "kind", f"{where}.kind", str) not in kinds:
            raise f.fail(f"{where}.kind", f"must be one of {', '.join(kinds)}, got {p['kind']!r}")
        shape = f.shape(p, "shape", f"{where}.shape")
        size = f.count(p, "size", f"{where}.size", least=1)
        if math.prod(shape) != size:
            raise f.fail(f"{where}.size", f"is {size}, but shape {shape} holds {math.prod(shape)}")
        offset = f.count(p, "offset", f"{where}.offset")
        if offset + size > total:
            raise f.fail(f"{where}.offset", f"puts {name} at [{offset}, {offset + size}), past {total_name} ({total})")
        spans.append((offset, offset + size, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise f.fail(field, f"lays {a} and {b} over each other")


INIT_SCHEMES = ("he", "lecun", "ones", "zeros")


def _check_params(f: _Fields, params: list, total: int) -> None:
    """The parameter layout, and each parameter's training facts."""
    _check_layout(f, params, total, "params", ("weight", "bias"), "param_floats")
    for i, p in enumerate(params):
        where = f"params[{i}]"
        for k in ("trainable", "decay"):
            f.get(p, k, f"{where}.{k}", bool)
        init = f.get(p, "init", f"{where}.init", dict)
        if f.get(init, "scheme", f"{where}.init.scheme", str) not in INIT_SCHEMES:
            raise f.fail(f"{where}.init.scheme", f"must be one of {', '.join(INIT_SCHEMES)}, got {init['scheme']!r}")
        f.count(init, "fan_in", f"{where}.init.fan_in")
        _check_connect(f, f.get(p, "connect", f"{where}.connect", list, optional=True), p["shape"], where)
        _check_fixed(f, p.get("fixed"), p["shape"], where)


STATE_KINDS = ("running_mean", "running_var")
# a batchnorm's per-channel coefficients between a training step's phases (cnnc_runtime.batchnorm)
BN_COEFS = ("scale", "shift", "mean", "k", "cx", "cc")
PHASE_KINDS = ("forward", "backward")


def _check_batchnorm(f: _Fields, bn: dict | None) -> None:
    """The layouts a network with batchnorm adds (``cnnc.compiler._batchnorm_manifest``)."""
    if bn is None:
        return
    totals = {k: f.count(bn, k, f"batchnorm.{k}", least=1)
              for k in ("state_floats", "inference_floats", "stats_doubles", "bn_floats")}
    state = f.get(bn, "state", "batchnorm.state", list)
    _check_layout(f, state, totals["state_floats"], "batchnorm.state", STATE_KINDS, "batchnorm.state_floats")
    for i, p in enumerate(state):
        if f.get(p, "init", f"batchnorm.state[{i}].init", str) not in ("ones", "zeros"):
            raise f.fail(f"batchnorm.state[{i}].init", f"must be \"ones\" or \"zeros\", got {p['init']!r}")
    _check_layout(f, f.get(bn, "inference_params", "batchnorm.inference_params", list), totals["inference_floats"],
                  "batchnorm.inference_params", ("weight", "bias", "scale"), "batchnorm.inference_floats")
    layers = f.get(bn, "layers", "batchnorm.layers", list)
    names = set()
    for i, layer in enumerate(layers):
        where = f"batchnorm.layers[{i}]"
        if not isinstance(layer, dict):
            raise f.fail(where, f"must be an object, got {_describe(layer)}")
        names.add(f.get(layer, "layer", f"{where}.layer", str))
        c = f.count(layer, "channels", f"{where}.channels", least=1)
        f.count(layer, "count", f"{where}.count", least=1)
        if f.count(layer, "stats", f"{where}.stats") + 2 * c > totals["stats_doubles"]:
            raise f.fail(f"{where}.stats", "puts its partial sums past batchnorm.stats_doubles")
        coefs = f.get(layer, "coefs", f"{where}.coefs", dict)
        for k in BN_COEFS:
            if f.count(coefs, k, f"{where}.coefs.{k}") + c > totals["bn_floats"]:
                raise f.fail(f"{where}.coefs.{k}", "puts its coefficients past batchnorm.bn_floats")
        if not f.number(layer, "eps", f"{where}.eps", optional=False) > 0:
            raise f.fail(f"{where}.eps", "must be > 0")
        if not 0 <= f.number(layer, "momentum", f"{where}.momentum", optional=False) <= 1:
            raise f.fail(f"{where}.momentum", "must be in [0, 1]")
    phases = f.get(bn, "phases", "batchnorm.phases", dict)
    for loss in LOSSES:
        for i, sync in enumerate(f.get(phases, loss, f"batchnorm.phases.{loss}", list)):
            where = f"batchnorm.phases.{loss}[{i}]"
            if not isinstance(sync, dict) or sync.get("kind") not in PHASE_KINDS or sync.get("layer") not in names:
                raise f.fail(where, f"must name a phase kind and a batchnorm layer, got {_describe(sync)}")


def connect_mask(connect: list | tuple, shape: list | tuple) -> np.ndarray:
    """(out, in) of 0/1, float32: which input channels each output channel of a tabled conv reads (row o of
    `connect` lists those of output o). The weights, their initialisation, the kernels and the reference all
    read a connect table through this."""
    mask = np.zeros(tuple(shape[:2]), dtype=np.float32)
    for o, row in enumerate(connect):
        mask[o, list(row)] = 1.0
    return mask


def _check_connect(f: _Fields, connect: list | None, shape: list, where: str) -> None:
    if connect is None:
        return
    if len(shape) < 2 or len(connect) != shape[0] or not all(
            isinstance(row, list) and all(type(c) is int and 0 <= c < shape[1] for c in row) for row in connect):
        raise f.fail(f"{where}.connect", f"must list, for each of the {shape[0]} outputs, input channels in "
                                         f"[0, {shape[1] if len(shape) > 1 else 0})")


def _check_fixed(f: _Fields, fixed: Any, shape: list, where: str) -> None:
    if fixed is None:
        return
    try:
        arr = np.asarray(fixed, dtype=np.float64)
    except (ValueError, TypeError, OverflowError, RecursionError):
        arr = None
    if arr is None or list(arr.shape) != shape or not np.isfinite(arr).all():
        raise f.fail(f"{where}.fixed", f"must be finite numbers of shape {shape}")


def _ruled(f: _Fields, table: dict[str, rules.Rule], key: str, value: Any, field: str) -> None:
    need = rules.problem(table, key, value)
    if need:
        raise f.fail(field, f"must be {need}, got {value!r}")


def _check_train(f: _Fields, train: dict) -> None:
    """The train section, by the rules the .cnn parser and ``fit`` use (``cnnc_runtime.rules``)."""
    for k in sorted(rules.SETTINGS.keys() - {"patience", "min_delta"}):
        if k in train:
            _ruled(f, rules.SETTINGS, k, train[k], f"train.{k}")
    loss = f.get(train, "loss", "train.loss", str, optional=True)
    if loss is not None and loss not in LOSSES:
        raise f.fail("train.loss", f"must be {choices()}, got {loss!r}")
    f.get(train, "data", "train.data", str, optional=True)
    optimizer = f.get(train, "optimizer", "train.optimizer", dict, optional=True)
    if optimizer is not None:
        f.get(optimizer, "name", "train.optimizer.name", str)
        for k in optimizer.keys() - {"name"}:
            value = f.number(optimizer, k, f"train.optimizer.{k}", optional=False)
            if k in rules.HYPERPARAMETERS:
                _ruled(f, rules.HYPERPARAMETERS, k, value, f"train.optimizer.{k}")
    stop = f.get(train, "early_stop", "train.early_stop", dict, optional=True)
    if stop is not None:
        for k in ("patience", "min_delta"):
            _ruled(f, rules.SETTINGS, k, f.get(stop, k, f"train.early_stop.{k}", (int, float)), f"train.early_stop.{k}")
    sched = f.get(train, "schedule", "train.schedule", dict, optional=True)
    if sched is not None:
        name = f.get(sched, "name", "train.schedule.name", str)
        try:
            schedule.checked(name, {k: v for k, v in sched.items() if k != "name"})
        except ValueError as e:
            raise f.fail("train.schedule", str(e)) from None
    norm = f.get(train, "normalize", "train.normalize", dict, optional=True)
    if norm is not None:
        for k in ("mean", "std"):
            values = f.get(norm, k, f"train.normalize.{k}", (int, float, list))
            values = values if isinstance(values, list) else [values]
            if not values or not all(type(v) in (int, float) and math.isfinite(v) and (k == "mean" or v > 0)
                                     for v in values):
                need = "positive numbers" if k == "std" else "finite numbers"
                raise f.fail(f"train.normalize.{k}", f"must be a number or a list of {need}, got {norm[k]!r}")


def _check_weights(weights: bytes, source: str) -> None:
    """The weights section: empty, or an .npz of real-valued arrays (names and shapes are the model's to check)."""
    if not weights:
        return
    try:
        with np.load(io.BytesIO(weights), allow_pickle=False) as data:
            for name in data.files:
                dtype = data[name].dtype
                if dtype.kind not in "fiu":
                    raise ValueError(f"{name} has dtype {dtype}")
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{source}: the artifact's weights cannot be read ({e})") from None


# ---- the manifest against the code ---------------------------------------------------------------


# contract fields that code compiled before them does not record, and the value such code was compiled for
UNRECORDED = {"ws_cache_floats": 0}


def contract(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields whose values the code was compiled for (buffer sizes and strides, the parameter layout)."""
    return {
        "param_floats": manifest["param_floats"],
        "arena_infer": manifest["arena_infer"],
        "infer_parts": manifest.get("infer_parts", 0),
        "arena_train": manifest["arena_train"],
        "ws_floats": manifest["ws_floats"],
        "ws_cache_floats": manifest.get("ws_cache_floats", 0),
        "input.shape": manifest["input"]["shape"],
        "output.shape": manifest["output"]["shape"],
        "output.op": manifest["output"]["op"],
        "loss_inputs": manifest["loss_inputs"],
        "params": [[p["name"], p["offset"], p["size"], p["shape"]] for p in manifest["params"]],
        "updates": manifest["updates"],
        "has_dropout": manifest["has_dropout"],
        "batchnorm": manifest.get("batchnorm"),
        # the layout of a run's ctx that run_LOSS reads (None: no runs; code built before runs records none)
        "run_fields": manifest.get("run_fields"),
        # the layout of phased_LOSS's ctx (None: the phases are called one by one; code built before records none)
        **({"phased_fields": manifest["phased_fields"]} if manifest.get("phased_fields") else {}),
    }


def contract_bytes(manifest: dict[str, Any]) -> bytes:
    """``contract(manifest)`` as the compiler stores it in the code, under ``CONTRACT_SYMBOL``."""
    return json.dumps(contract(manifest), sort_keys=True).encode()


def entry_points(manifest: dict[str, Any]) -> list[str]:
    """The functions the runtime calls: the passes (``infer_split`` where the code shares an image between
    threads, ``run_LOSS`` where it runs steps in runs), and an update loop for each rule the manifest lists."""
    bn = manifest.get("batchnorm")
    phases = [] if bn is None else ["fold", *(f"step_{loss}_{k}" for loss, syncs in bn["phases"].items()
                                              for k in range(1, len(syncs) + 1))]
    split = ["infer_split"] if manifest.get("infer_parts", 0) else []
    if split and manifest.get("infer_handoff", False):  # (cnnc.codegen.handoff; artifacts before it lack them)
        split += ["split_call", "split_serve"]
    split += ["infer_claim"] if manifest.get("infer_claim", False) else []  # (cnnc.codegen.module._emit_claim)
    runs = [f"run_{loss}" for loss in LOSSES] if manifest.get("run_fields") else []
    runs += [f"phased_{loss}" for loss in LOSSES] if manifest.get("phased_fields") else []
    return [*ENTRY_POINTS, *split, *phases, *runs, *(f"update_{kind}" for kind in manifest["updates"])]


def verify_code(manifest: dict[str, Any], obj: bytes, source: str | None = None) -> None:
    """Check a validated manifest against its object code, without mapping or running any of it.

    Every object must be sound (``elfload.parse``: what fails is never handed
    to a loader), define the entry points, and record the layout it was
    compiled for, equal to the manifest's: a manifest that promises a smaller
    arena than the code writes would let the code write past its buffers.
    """
    prefix = f"{source}: " if source else ""
    if sys.platform != "linux":  # (objects there are not ELF: only the manifest's own checks apply)
        return
    try:
        objs = elfload.parse(unbundle(obj))
    except ValueError as e:
        raise ValueError(f"{prefix}damaged object code ({e})") from None
    exports = {name: (o, sym) for o in objs for name, sym in o.exported().items()}
    missing = [name for name in entry_points(manifest) if name not in exports]
    if missing:
        raise ValueError(f"{prefix}the object code has no function {', '.join(missing)}")
    if CONTRACT_SYMBOL not in exports:
        raise ValueError(f"{prefix}the object code does not record its layout; recompile the network")
    try:
        recorded = json.loads(exports[CONTRACT_SYMBOL][0].contents(exports[CONTRACT_SYMBOL][1]))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{prefix}the object code's layout record is damaged ({e})") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{prefix}the object code's layout record is damaged")
    for field, value in contract(manifest).items():
        code = recorded.get(field, UNRECORDED.get(field))
        if code != value and field == "params" and isinstance(code, list) and len(code) == len(value):
            field, value, code = next((f"params[{i}]", v, c) for i, (v, c) in enumerate(zip(value, code)) if v != c)
        if code != value:
            raise ValueError(f"{prefix}manifest field {field!r} is {_short(value)}, but the code was compiled "
                             f"for {_short(code)}")
