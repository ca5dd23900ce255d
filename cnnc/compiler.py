"""The compiler's stages up to the optimized graph, as plain functions (no cache, no files), and what is read
off those graphs: the summary, the DOT and the listing, the cache key. ``cnnc.pipeline`` drives them.

    check:    source text -> checked graph (front end; prune, shapes, counts)
    optimize: checked graph -> optimized graph (fusion, autodiff), on a copy

The last stage, optimized graph -> object code, is ``cnnc.generate``. This
module imports the front end (lark) and the passes (networkx), so
``cnnc.pipeline`` loads it only when it has to: a compile found in the cache
needs none of it, and `cnnc check` no code generator.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np

from cnnc.cache import compiler_fingerprint
from cnnc.codegen.target import Target
from cnnc.errors import Diagnostics
from cnnc.frontend import load_graph
from cnnc.ir import execution_order
from cnnc.passes import CHECK, OPTIMIZE, PASS_NAMES, run_passes
from cnnc.summary import as_dot, as_json, as_listing, as_text, fused_groups
from cnnc_runtime import __version__

__all__ = ["PASS_NAMES", "as_dot", "as_listing", "check", "describe", "ir_key", "optimize"]

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


def ir_key(fused: nx.DiGraph, target: Target, variant: str = "") -> str:
    """A hash of everything the object code depends on; `variant` names another build of the same graph
    ("profile"), left out of the hash when empty so the normal build's keys stay as they were."""
    skip = {"loc", "binding", "connect_locs", "uses"}
    nodes = [
        {k: _jsonable(v) for k, v in sorted(fused.nodes[n].items()) if k not in skip}
        | {"args": {k: _jsonable(v) for k, v in fused.nodes[n].get("args", {}).items() if k not in skip}}
        for n in execution_order(fused)
    ]
    blob = json.dumps({"network": fused.graph["network"], "nodes": nodes, "output": fused.graph["output"],
                       "input": fused.graph["input"], "winograd": fused.graph.get("winograd", True),
                       "target": target.key, "cnnc": __version__, "compiler": compiler_fingerprint()}
                      | ({"variant": variant} if variant else {}), sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def describe(checked: nx.DiGraph, fused: nx.DiGraph) -> dict[str, Any]:
    """The manifest entries that do not depend on the code: refreshed even when the object comes from the cache."""
    return {
        "source": fused.graph["source"],
        "train": fused.graph.get("train", {}),
        "summary": as_text(checked, fused_groups(fused)),
        "summary_json": as_json(checked),
        "graph": layer_graph(checked),
    }


def layer_graph(checked: nx.DiGraph) -> list[dict[str, Any]]:
    """The checked network as plain data, in execution order: what ``cnnc_runtime.onnx_export`` writes out from a Model.

    Each layer: name, op, inputs, its arguments and resolved geometry (JSON values; fixed weights are in the
    parameter table, source locations are left out) and its output shape.
    """
    skip = {"connect_locs", "weights"}
    return [{"name": n, "op": node["op"], "inputs": list(node["inputs"]),
             "args": {k: _jsonable(v) for k, v in sorted(node.get("args", {}).items()) if k not in skip},
             "geometry": _jsonable(node.get("geometry", {})), "shape": list(node["shape"])}
            for n in execution_order(checked) for node in [checked.nodes[n]]]
