"""Counting: parameters (trainable and frozen), multiply-accumulates, and memory, per layer and in total."""

from __future__ import annotations

import math

import networkx as nx

from cnnc.errors import CnnError
from cnnc.ir import input_shapes
from cnnc.ops import OPS
from cnnc_runtime.memory import physical_memory

FLOAT_BYTES = 4


def count(g: nx.DiGraph) -> nx.DiGraph:
    """Fill ``param_count``, ``trainable``, ``state_count`` and ``macs`` on nodes and the totals on the graph.

    MACs follow the common convention: the multiply-accumulates of conv and
    dense layers for one image (bias additions, activations and batchnorm, which
    inference folds into the layer before it, are not counted). State (batchnorm's
    running statistics) is counted apart from the parameters, as PyTorch's buffers are.
    A ``connect`` table counts only its connections; written weights are frozen.
    """
    totals = {"total_params": 0, "trainable_params": 0, "state_floats": 0, "total_macs": 0, "activation_floats": 0}
    for name in g.nodes:
        node = g.nodes[name]
        op = OPS[node["op"]]
        ins = input_shapes(g, name)
        if op.count_params is not None:
            node["param_count"] = op.count_params(node)
        else:
            node["param_count"] = sum(math.prod(s) for s in node["params"].values())
        node["trainable"] = "fixed" not in node
        node["state_count"] = sum(math.prod(s) for s in node.get("state", {}).values())
        totals["state_floats"] += node["state_count"]
        node["macs"] = op.macs(node, ins)
        totals["total_params"] += node["param_count"]
        totals["trainable_params"] += node["param_count"] if node["trainable"] else 0
        totals["total_macs"] += node["macs"]
        totals["activation_floats"] += math.prod(node["shape"])
        _check_memory(node, totals)
    totals["non_trainable_params"] = totals["total_params"] - totals["trainable_params"]
    totals["param_bytes"] = (totals["total_params"] + totals["state_floats"]) * FLOAT_BYTES
    totals["activation_bytes"] = totals["activation_floats"] * FLOAT_BYTES
    g.graph["totals"] = totals
    return g


def _check_memory(node: dict, totals: dict) -> None:
    """Refuse, at the layer that tips it over, a network whose parameters and one image's activations exceed RAM."""
    need = (totals["total_params"] + totals["activation_floats"]) * FLOAT_BYTES
    ram = physical_memory()
    if ram is not None and need > ram:
        error = CnnError(f"{node['op']} {node['name']}: the network's parameters and one image's activations "
                         f"up to here take {need / 2**30:,.1f} GiB, more than this machine's "
                         f"{ram / 2**30:,.1f} GiB of memory", node.get("loc"))
        raise error.note_block_uses(node.get("uses", ()))
