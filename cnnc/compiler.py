"""The whole compiler: a checked graph -> fused graph -> LLVM module -> object code + manifest.

Compiled objects are cached on disk, keyed by the optimised IR, the target
CPU and its features, and the cnnc and llvmlite versions, so compiling the
same network again costs a parse and a file read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import llvmlite.ir as ir
import networkx as nx
import numpy as np

from cnnc import cache, summary
from cnnc.cache import cache_dir, collector_paused, compiler_fingerprint
from cnnc.codegen.module import build_module
from cnnc.codegen.target import Target, emit_objects, host_target
from cnnc.driver import optimize
from cnnc.ir import execution_order
from cnnc.ops.activations import he_init
from cnnc_runtime import __version__, artifact
from cnnc_runtime.native import bundle


@dataclass
class Compiled:
    """What a compile produces: the manifest, the object code, and the LLVM modules when asked to keep them."""

    manifest: dict[str, Any]
    obj: bytes
    modules: Any = None
    fused: nx.DiGraph | None = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"array": v.tolist(), "shape": list(v.shape)}
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def ir_key(fused: nx.DiGraph, target: Target) -> str:
    """A hash of everything the object code depends on."""
    skip = {"loc", "binding", "connect_locs", "uses"}
    nodes = [
        {k: _jsonable(v) for k, v in sorted(fused.nodes[n].items()) if k not in skip}
        | {"args": {k: _jsonable(v) for k, v in fused.nodes[n].get("args", {}).items() if k not in skip}}
        for n in execution_order(fused)
    ]
    blob = json.dumps({"network": fused.graph["network"], "nodes": nodes, "output": fused.graph["output"],
                       "input": fused.graph["input"], "winograd": fused.graph.get("winograd", True),
                       "target": target.key, "cnnc": __version__, "compiler": compiler_fingerprint()},
                      sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def _init_scheme(fused: nx.DiGraph, layer: str) -> str:
    """He for layers feeding a ReLU-like activation (its op table entry), LeCun otherwise (fan-in scaled normals)."""
    node = fused.nodes[layer]
    act = node.get("act", "none")
    if act == "none":
        succ = list(fused.successors(layer))
        act = fused.nodes[succ[0]]["op"] if len(succ) == 1 else "none"
    return "he" if he_init(act) else "lecun"


def manifest_for(checked: nx.DiGraph, fused: nx.DiGraph, facts: dict, target: Target) -> dict[str, Any]:
    params = []
    for s in facts["params"]:
        node = fused.nodes[s.layer]
        args = node.get("args", {})
        fixed = node.get("fixed", {}).get(s.kind)
        entry = {
            "name": s.name, "layer": s.layer, "kind": s.kind, "shape": list(s.shape), "offset": s.offset,
            "size": s.size, "trainable": "fixed" not in node, "decay": s.kind == "weight",
            "init": {"scheme": _init_scheme(fused, s.layer),
                     "fan_in": int(np.prod(s.shape[1:])) if s.kind == "weight" else 0},
            "connect": [list(r) for r in args["connect"]] if args.get("connect") and s.kind == "weight" else None,
            "fixed": fixed.reshape(s.shape).tolist() if fixed is not None else None,
        }
        params.append(entry)
    out = fused.graph["output"]
    inp = fused.graph["input"]
    return {
        "format": artifact.FORMAT_VERSION,
        "cnnc_version": __version__,
        "network": fused.graph["network"],
        "input": {"name": inp, "shape": list(fused.nodes[inp]["shape"])},
        "output": {"name": out, "op": fused.nodes[out]["op"], "shape": list(fused.nodes[out]["shape"])},
        "loss_inputs": {loss: int(np.prod(fused.nodes[start]["shape"]))
                        for loss, start in fused.graph["loss_input"].items()},
        "params": params,
        "param_floats": facts["param_floats"],
        "arena_infer": facts["arena_infer"],
        "arena_train": facts["arena_train"],
        "ws_floats": facts["ws_floats"],
        "updates": facts["updates"],
        "has_dropout": any(fused.nodes[n]["op"] == "dropout" for n in fused.nodes),
        "target": {"triple": target.triple, "cpu": target.cpu, "features": target.features},
        **_descriptive(checked, fused),
    }


def _descriptive(checked: nx.DiGraph, fused: nx.DiGraph) -> dict[str, Any]:
    """The manifest entries that do not depend on the code: refreshed even when the object comes from the cache."""
    return {
        "source": fused.graph["source"],
        "train": fused.graph.get("train", {}),
        "summary": summary.as_text(checked, summary.fused_groups(fused)),
        "summary_json": summary.as_json(checked),
        "graph": layer_graph(checked),
    }


def layer_graph(checked: nx.DiGraph) -> list[dict[str, Any]]:
    """The checked network as plain data, in execution order: what ``cnnc.onnx.export`` writes out from a Model.

    Each layer: name, op, inputs, its arguments and resolved geometry (JSON values; fixed weights are in the
    parameter table, source locations are left out) and its output shape.
    """
    skip = {"connect_locs", "weights"}
    return [{"name": n, "op": node["op"], "inputs": list(node["inputs"]),
             "args": {k: _jsonable(v) for k, v in sorted(node.get("args", {}).items()) if k not in skip},
             "geometry": _jsonable(node.get("geometry", {})), "shape": list(node["shape"])}
            for n in execution_order(checked) for node in [checked.nodes[n]]]


def _record_contract(module: ir.Module, manifest: dict[str, Any]) -> None:
    """Store in the code the manifest fields it was compiled for, so a manifest that lies about them is refused."""
    data = artifact.contract_bytes(manifest)
    record = ir.GlobalVariable(module, ir.ArrayType(ir.IntType(8), len(data)), artifact.CONTRACT_SYMBOL)
    record.initializer = ir.Constant(record.value_type, bytearray(data))
    record.global_constant = True


def compile_graph(checked: nx.DiGraph, target: Target | None = None, use_cache: bool = True,
                  keep_module: bool = False, fuse: bool = True, winograd: bool = True) -> Compiled:
    """Compile a checked graph (``cnnc.driver.check_*``) to object code and its manifest.

    ``winograd=False`` keeps every convolution direct (Winograd's transforms round a little differently).
    """
    with collector_paused():
        return _compile_graph(checked, target or host_target(), use_cache, keep_module, fuse, winograd)


def _compile_graph(checked: nx.DiGraph, target: Target, use_cache: bool, keep_module: bool, fuse: bool,
                   winograd: bool) -> Compiled:
    fused = optimize(checked, skip=() if fuse else ("fuse",))
    fused.graph["winograd"] = winograd
    key = ir_key(fused, target)
    path = cache_dir() / f"{key}.cnnc"
    hit = cache.read(path, key) if use_cache and not keep_module else None
    if hit is not None:  # (a corrupt entry reads as a miss and is rebuilt below)
        manifest, obj = hit
        manifest.update(_descriptive(checked, fused))  # comments and the train section are not code
        return Compiled(manifest, obj, fused=fused)
    modules, facts = build_module(fused, target.vector_width)
    manifest = manifest_for(checked, fused, facts, target)
    _record_contract(modules[0], manifest)
    obj = bundle(emit_objects(modules, target))
    manifest["cache_key"] = key
    if use_cache:
        cache.write(path, manifest, obj)
    return Compiled(manifest, obj, modules if keep_module else None, fused)
