"""The compiler's stages as plain functions over graphs (no cache, no files): what ``cnnc.pipeline`` drives.

    check:    source text -> checked graph (front end; prune, shapes, counts)
    optimize: checked graph -> optimized graph (fusion, autodiff), on a copy
    generate: optimized graph -> LLVM modules -> object code and manifest

This module imports the front end (lark), the passes (networkx) and the code
generator (llvmlite), so ``cnnc.pipeline`` loads it only when it has to: a
compile found in the cache needs none of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

import llvmlite.ir as ir
import networkx as nx
import numpy as np

from cnnc.cache import compiler_fingerprint
from cnnc.codegen.module import build_module
from cnnc.codegen.target import Target, emit_objects
from cnnc.errors import Diagnostics
from cnnc.frontend import load_graph
from cnnc.ir import execution_order
from cnnc.ops.activations import he_init
from cnnc.passes import CHECK, OPTIMIZE, PASS_NAMES, run_passes
from cnnc.summary import as_dot, as_json, as_listing, as_text, fused_groups
from cnnc_runtime import __version__, artifact
from cnnc_runtime.native import bundle

__all__ = ["PASS_NAMES", "as_dot", "as_listing", "check", "describe", "generate", "ir_key", "optimize"]

AfterPass = Callable[[str, nx.DiGraph], None]


def check(source: str, name: str = "<string>", diag: Diagnostics | None = None,
          after: AfterPass | None = None) -> nx.DiGraph:
    """Parse, lower, prune, infer shapes and count: the graph `cnnc check` reports on.

    `after(pass name, graph)` sees the graph after each pass (``--dump-after``).
    """
    return run_passes(load_graph(source, name, diag), CHECK, after)


def optimize(checked: nx.DiGraph, after: AfterPass | None = None, skip: tuple[str, ...] = ()) -> nx.DiGraph:
    """The passes after checking (fusion, autodiff), on a copy so the checked graph stays as written.

    `skip` names passes to leave out (``("fuse",)`` gives the unfused code, for comparison).
    """
    return run_passes(copy.deepcopy(checked), [(n, p) for n, p in OPTIMIZE if n not in skip], after)


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
        **describe(checked, fused),
    }


def describe(checked: nx.DiGraph, fused: nx.DiGraph) -> dict[str, Any]:
    """The manifest entries that do not depend on the code: refreshed even when the object comes from the cache."""
    return {
        "source": fused.graph["source"],
        "train": fused.graph.get("train", {}),
        "summary": as_text(checked, fused_groups(fused)),
        "summary_json": as_json(checked),
    }


def _record_contract(module: ir.Module, manifest: dict[str, Any]) -> None:
    """Store in the code the manifest fields it was compiled for, so a manifest that lies about them is refused."""
    data = artifact.contract_bytes(manifest)
    record = ir.GlobalVariable(module, ir.ArrayType(ir.IntType(8), len(data)), artifact.CONTRACT_SYMBOL)
    record.initializer = ir.Constant(record.value_type, bytearray(data))
    record.global_constant = True


def generate(checked: nx.DiGraph, fused: nx.DiGraph, target: Target) -> tuple[dict[str, Any], bytes, list[ir.Module]]:
    """(manifest, object code, LLVM modules) of an optimized graph for `target`."""
    modules, facts = build_module(fused, target.vector_width)
    manifest = manifest_for(checked, fused, facts, target)
    _record_contract(modules[0], manifest)
    return manifest, bundle(emit_objects(modules, target)), modules
