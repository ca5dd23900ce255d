"""The last stage: optimized graph -> LLVM modules -> object code and its manifest (``cnnc.pipeline`` drives it).

Imports the code generator (llvmlite.ir, every kernel emitter), so the
pipeline loads it only to generate code.
"""

from __future__ import annotations

from typing import Any

import llvmlite.ir as ir
import networkx as nx
import numpy as np

from cnnc.codegen.module import BN_COEFS, build_module
from cnnc.codegen.target import Target, emit_objects
from cnnc.compiler import describe
from cnnc.ops import OPS
from cnnc.ops.activations import he_init
from cnnc_runtime import __version__, artifact
from cnnc_runtime.native import bundle
from cnnc_runtime.signals import signals_deferred


def _init_scheme(fused: nx.DiGraph, layer: str) -> str:
    """He for layers feeding a ReLU-like activation (its op table entry), LeCun otherwise (fan-in scaled normals)."""
    node = fused.nodes[layer]
    act = node.get("act", "none")
    if act == "none":
        succ = list(fused.successors(layer))
        act = fused.nodes[succ[0]]["op"] if len(succ) == 1 else "none"
    return "he" if he_init(act) else "lecun"


def _slot(s: Any) -> dict[str, Any]:
    return {"name": s.name, "layer": s.layer, "kind": s.kind, "shape": list(s.shape), "offset": s.offset,
            "size": s.size}


def _batchnorm_manifest(fused: nx.DiGraph, facts: dict) -> dict[str, Any] | None:
    """The layouts a network with batchnorm adds: state, inference parameters, partial sums, the phases."""
    if not facts["batchnorm"]:
        return None
    return {
        "state_floats": facts["state_floats"],
        "inference_floats": facts["inference_floats"],
        "stats_doubles": facts["stats_doubles"],
        "bn_floats": facts["bn_floats"],
        "state": [_slot(s) | {"init": OPS["batchnorm"].init[s.kind]} for s in facts["state"]],
        "inference_params": [_slot(s) for s in facts["inference_params"]],
        "layers": [{"layer": b.layer, "channels": b.channels, "count": b.count, "stats": b.stats,
                    "coefs": {k: b.coef(k) for k in BN_COEFS},
                    "eps": float(fused.nodes[b.layer]["args"]["eps"]),
                    "momentum": float(fused.nodes[b.layer]["args"]["momentum"])} for b in facts["batchnorm"]],
        "phases": facts["phases"],
    }


def manifest_for(checked: nx.DiGraph, fused: nx.DiGraph, facts: dict, target: Target) -> dict[str, Any]:
    params = []
    for s in facts["params"]:
        node = fused.nodes[s.layer]
        args = node.get("args", {})
        fixed = node.get("fixed", {}).get(s.kind)
        op = OPS[node["op"]]
        entry = {
            "name": s.name, "layer": s.layer, "kind": s.kind, "shape": list(s.shape), "offset": s.offset,
            "size": s.size, "trainable": "fixed" not in node, "decay": s.kind in op.decay,
            "init": {"scheme": op.init[s.kind] if op.init else _init_scheme(fused, s.layer),
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
        "infer_parts": facts["infer_parts"],
        "infer_handoff": facts["infer_handoff"],
        "infer_claim": facts["infer_claim"],
        "arena_train": facts["arena_train"],
        "ws_floats": facts["ws_floats"],
        "ws_cache_floats": facts["ws_cache_floats"],
        "updates": facts["updates"],
        "has_dropout": any(fused.nodes[n]["op"] == "dropout" for n in fused.nodes),
        **({"run_fields": facts["run_fields"]} if facts["run_fields"] else {}),
        **({"phased_fields": facts["phased_fields"]} if facts["phased_fields"] else {}),
        "batchnorm": _batchnorm_manifest(fused, facts),
        "target": {"triple": target.triple, "cpu": target.cpu, "features": target.features},
        **describe(checked, fused),
    }


def _record_contract(module: ir.Module, manifest: dict[str, Any]) -> None:
    """Store in the code the manifest fields it was compiled for, so a manifest that lies about them is refused."""
    data = artifact.contract_bytes(manifest)
    record = ir.GlobalVariable(module, ir.ArrayType(ir.IntType(8), len(data)), artifact.CONTRACT_SYMBOL)
    record.initializer = ir.Constant(record.value_type, bytearray(data))
    record.global_constant = True


def _load_runtime() -> None:
    """What loading the compiled model takes next (the runtime's Model, numpy's random generators for its
    initial weights: 30-50 ms), imported while the other processes of a parallel compile start on the modules
    instead of after the compile."""
    with signals_deferred():  # (a Ctrl-C is raised once the imports are whole: see cnnc_runtime.signals)
        import numpy.random  # noqa: F401 - lazy: imported here, in the compile's parallel part

        import cnnc_runtime.model  # noqa: F401 - lazy: imported here, in the compile's parallel part


def generate(checked: nx.DiGraph, fused: nx.DiGraph, target: Target, profile: bool = False,
             keep_modules: bool = False) -> tuple[dict[str, Any], bytes, list[ir.Module] | None]:
    """(manifest, object code, LLVM modules or None) of an optimized graph for `target`; ``profile``: the profiling
    build (``cnnc.codegen.instrument``), whose manifest lists its regions under ``profile``; ``keep_modules``: the
    modules too (every kernel's built again here: the compile builds each where it is compiled)."""
    modules, facts = build_module(fused, target.vector_width, profile)
    manifest = manifest_for(checked, fused, facts, target)
    if profile:
        manifest["profile"] = {"regions": facts["profile"], "clock": "readcyclecounter"}
    _record_contract(modules[0], manifest)
    obj = bundle(emit_objects(modules, target, meanwhile=_load_runtime))
    return manifest, obj, [modules[0], *(k.build() for k in modules[1:])] if keep_modules else None
