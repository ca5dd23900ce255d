"""The `cnnc check` report: a table like Keras' ``model.summary()``, and the same as JSON."""

from __future__ import annotations

from typing import Any

import networkx as nx

from cnnc.ir import execution_order


def layer_order(g: nx.DiGraph) -> list[str]:
    """Layers in execution order (input left out), the network's output last."""
    return [n for n in execution_order(g) if g.nodes[n]["op"] != "input"]


def fused_groups(fused: nx.DiGraph) -> dict[str, str]:
    """Layer -> the kernel it runs in, for layers that fusion merged."""
    groups = {}
    for name, node in fused.nodes(data=True):
        for member in node.get("fused", []):
            groups[member] = name
            groups[name] = name
    return groups


def as_json(g: nx.DiGraph) -> dict[str, Any]:
    """The machine-readable summary: shapes without the batch dimension, layers in execution order."""
    inp = g.nodes[g.graph["input"]]
    t = g.graph["totals"]
    return {
        "network": g.graph["network"],
        "input": {"name": g.graph["input"], "shape": list(inp["shape"])},
        "layers": [
            {
                "name": n,
                "op": g.nodes[n]["op"],
                "output_shape": list(g.nodes[n]["shape"]),
                "params": g.nodes[n]["param_count"],
                "state": g.nodes[n]["state_count"],
                "trainable": g.nodes[n]["trainable"],
                "macs": g.nodes[n]["macs"],
            }
            for n in layer_order(g)
        ],
        "output": g.graph["output"],
        "total_params": t["total_params"],
        "trainable_params": t["trainable_params"],
        "non_trainable_params": t["non_trainable_params"],
        "state": t["state_floats"],
        "total_macs": t["total_macs"],
        "param_bytes": t["param_bytes"],
        "activation_bytes_per_image": t["activation_bytes"],
    }


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def as_text(g: nx.DiGraph, groups: dict[str, str] | None = None) -> str:
    """The human-readable table; `groups` (from ``fused_groups``) brackets layers that run as one kernel."""
    groups = groups or {}
    inp = g.graph["input"]
    rows = [("layer", "op", "output", "params", "MACs", "")]
    order = layer_order(g)
    for i, n in enumerate(order):
        node = g.nodes[n]
        mark = ""
        if n in groups:
            first = i == 0 or groups.get(order[i - 1]) != groups[n]
            last = i == len(order) - 1 or groups.get(order[i + 1]) != groups[n]
            mark = "fused ┐" if first else ("      ┘" if last else "      │")
        params = f"{node['param_count']:,}" + ("" if node["trainable"] else " (frozen)")
        shape = "x".join(map(str, node["shape"]))
        rows.append((n, node["op"], shape, params, f"{node['macs']:,}", mark))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    align = ["<", "<", "<", ">", ">"]

    def line(r):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)) + ("  " + r[5] if r[5] else "")

    rule = "  ".join("-" * w for w in widths)
    t = g.graph["totals"]
    shape = "x".join(map(str, g.nodes[inp]["shape"]))
    out = [f"network {g.graph['network']}: input {inp} {shape}, output {g.graph['output']}", "", line(rows[0]), rule]
    out += [line(r) for r in rows[1:]]
    out += [
        rule,
        f"total params:         {t['total_params']:,}",
        f"  trainable:          {t['trainable_params']:,}",
        f"  non-trainable:      {t['non_trainable_params']:,}",
        *([f"state (not trained): {t['state_floats']:,}  (batchnorm running statistics)"] if t["state_floats"] else []),
        f"MACs per image:       {t['total_macs']:,}",
        f"parameter memory:     {_bytes(t['param_bytes'])}",
        f"activations / image:  {_bytes(t['activation_bytes'])}",
    ]
    return "\n".join(out)


def as_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT, each node labelled with its op and output shape."""
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    out = [f'digraph "{g.graph["network"]}" {{', "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
    for n, node in g.nodes(data=True):
        shape = "x".join(map(str, node.get("shape", ())))
        op = node["op"] + "".join(f"+{f.split('.')[-1]}" for f in node.get("fused", []))
        if node.get("fused"):
            op = f"{node['op']}+{node['act']}"
        label = f"{n}\\n{op}\\n{shape}"
        out.append(f'  {ids[n]} [label="{label}"];')
    for u, v in g.edges:
        out.append(f"  {ids[u]} -> {ids[v]};")
    out.append("}")
    return "\n".join(out) + "\n"


def as_listing(g: nx.DiGraph) -> str:
    """One line per node (``--dump-after``): name, op, inputs, shape and the attributes passes add."""
    lines = [f"network {g.graph['network']}  input {g.graph['input']}  output {g.graph['output']}"]
    for n in execution_order(g):
        node = g.nodes[n]
        shape = "x".join(map(str, node.get("shape", ()))) or "?"
        extra = ""
        if node.get("fused"):
            extra = f"  act={node['act']} fused={','.join(node['fused'])}"
        inputs = ", ".join(node["inputs"])
        lines.append(f"  {n:<24} {node['op']:<15} ({inputs}) -> {shape}{extra}")
    for loss, steps in g.graph.get("backward", {}).items():
        lines.append(f"backward for {loss} (from d loss / d {g.graph['loss_input'][loss]}):")
        for st in steps:
            into = ", ".join(f"d {i}" for i in st.inputs) or "-"
            params = "d params, " if st.params else ""
            lines.append(f"  {st.node:<24} {g.nodes[st.node]['op']:<15} -> {params}{into}")
    return "\n".join(lines)
