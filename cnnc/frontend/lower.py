"""``ast.File`` -> the IR graph: names, tables, blocks and repetition are resolved here.

Naming follows the language reference: a layer labelled ``as NAME`` takes
that name; otherwise, when a binding holds exactly one item with parameters
(a layer, or a block use whose block has parameters), it takes the binding's
name, and several such items are ``BINDING.1``, ``BINDING.2``, ... in chain
order. A block's own names are prefixed with the name of its use. Layers
without parameters are called after the binding (``s2``) when they are the
binding's only item, else ``BINDING.op`` (``c1.tanh``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from cnnc.errors import CnnError, Diagnostics, Loc, did_you_mean
from cnnc.frontend import ast
from cnnc.frontend.train import lower_train
from cnnc.frontend.values import convert, evaluate
from cnnc.ir import REQUIRED, add_node, new_graph
from cnnc.ops import LAYERS, OPS

MAX_CHAIN = 100_000  # layers one binding may unroll into: repetition must not exhaust memory
MAX_LAYERS = 100_000  # layers a whole network may unroll into, blocks included


@dataclass
class Scope:
    """Names visible in a network or block body."""

    prefix: str  # "" in the network, "logits.1." inside a block use
    params: dict[str, Any]  # block parameter values
    tensors: dict[str, str] = field(default_factory=dict)  # bound name -> node
    locs: dict[str, Loc] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    later: dict[str, Loc] = field(default_factory=dict)  # names bound further down, for "used before bound"
    blocks: tuple[str, ...] = ()  # block uses we are inside, to reject recursion


@dataclass(eq=False)
class Item:
    """A chain element after repetition and groups are expanded (compared by identity: each copy is a layer)."""

    call: ast.Call
    label: str | None
    label_loc: Loc | None


class Lowering:
    def __init__(self, file: ast.File, diag: Diagnostics) -> None:
        self.file = file
        self.diag = diag
        self.tables = self._unique(file.tables, "table")
        self.blocks = self._unique(file.blocks, "block")
        self.used_tables: set[str] = set()
        self.used_blocks: set[str] = set()
        self.g: nx.DiGraph | None = None
        self.layers = 0  # the network's layers, blocks and repetition unrolled
        self._has_params: dict[str, bool] = {}
        self._sizes: dict[str, int] = {}
        self.uses: list[tuple[str, Loc]] = []  # the block uses being lowered, outermost first

    def _unique(self, items: list, what: str) -> dict:
        seen: dict = {}
        for it in items:
            if it.name in seen:
                raise CnnError(f"{what} '{it.name}' is defined twice (first at line {seen[it.name].loc.line})", it.loc)
            if what == "block" and it.name in OPS:
                raise CnnError(f"block '{it.name}' has the name of a built-in layer", it.loc)
            seen[it.name] = it
        return seen

    # ---- the file ----------------------------------------------------

    def run(self) -> nx.DiGraph:
        nets = self.file.networks
        if not nets:
            raise CnnError("no network in this file; write 'network NAME { ... }'",
                           Loc(self.file.path, 1, 1, 1, self.file.source))
        if len(nets) > 1:
            raise CnnError(f"a file holds one network; '{nets[0].name}' is already defined at line {nets[0].loc.line}",
                           nets[1].loc)
        net = nets[0]
        self.g = new_graph(net.name, self.file.path)
        for st in net.body:
            if isinstance(st, ast.Binding):
                self.count_layers(st)  # before anything is unrolled: a hostile file is refused at once
        scope = Scope(prefix="", params={})
        out = self.body(net.body, scope, block_input=None, where=f"network '{net.name}'", loc=net.loc)
        if out == self.g.graph["input"]:
            raise CnnError(f"network '{net.name}' has no layers", net.loc)
        self.g.graph["output"] = out
        if len(self.file.trains) > 1:
            raise CnnError("a file holds one train section", self.file.trains[1].loc)
        shape = self.g.nodes[self.g.graph["input"]]["args"]["shape"]
        self.g.graph["train"] = lower_train(self.file.trains[0], shape) if self.file.trains else {}
        for name, t in self.tables.items():
            if name not in self.used_tables:
                self.diag.warn(f"table '{name}' is never used", t.loc)
        for name, b in self.blocks.items():
            if name not in self.used_blocks:
                self.diag.warn(f"block '{name}' is never used", b.loc)
        return self.g

    # ---- a body: the statements of a network or a block -------------

    def body(self, statements: list, scope: Scope, block_input: str | None, where: str, loc: Loc) -> str:
        """Lower statements into the graph; returns the node holding the body's output."""
        for st in statements:
            if isinstance(st, ast.Binding) and st.name not in scope.later:
                scope.later[st.name] = st.loc
        output: ast.OutputDecl | None = None
        last: str | None = None
        for st in statements:
            if isinstance(st, ast.InputDecl):
                self.input(st, scope, block_input, where)
            elif isinstance(st, ast.Binding):
                self.check_new_name(st.name, st.loc, scope)
                node = self.binding(st, scope)
                scope.tensors[st.name] = node
                scope.locs[st.name] = st.loc
                last = st.name
            elif output is not None:
                raise CnnError(f"{where} already names its output at line {output.loc.line}", st.loc)
            else:
                output = st
        if block_input is None and self.g.graph["input"] is None:
            raise CnnError(f"{where} has no input; declare one like 'input image: 1x28x28'", loc)
        if block_input is not None and not any(isinstance(s, ast.InputDecl) for s in statements):
            raise CnnError(f"{where} has no input; declare it with 'input x'", loc)
        if output is not None:
            out_name = output.name
            node = self.lookup(out_name, output.loc, scope)
        elif last is not None:
            out_name, node = last, scope.tensors[last]
        else:
            return block_input or self.g.graph["input"]
        scope.used.add(out_name)
        for name, bloc in scope.locs.items():
            if name not in scope.used:
                self.diag.warn(f"'{scope.prefix}{name}' is bound but never used", bloc)
        return node

    def check_new_name(self, name: str, loc: Loc, scope: Scope) -> None:
        if name in scope.tensors:
            raise CnnError(f"'{name}' is bound twice (first at line {scope.locs[name].line})", loc)
        if name in scope.params:
            raise CnnError(f"'{name}' is a parameter of the block and cannot be bound", loc)

    def input(self, st: ast.InputDecl, scope: Scope, block_input: str | None, where: str) -> None:
        self.check_new_name(st.name, st.loc, scope)
        scope.locs[st.name] = st.loc
        scope.used.add(st.name)  # an unused input is the author's business, not a mistake
        if block_input is not None:
            if st.shape is not None:
                raise CnnError("a block's input takes its shape from where the block is used; write 'input x'", st.loc)
            if any(n == block_input for n in scope.tensors.values()):
                raise CnnError(f"{where} has one input", st.loc)
            scope.tensors[st.name] = block_input
            return
        if self.g.graph["input"] is not None:
            raise CnnError(f"{where} already has an input", st.loc)
        if st.shape is None:
            raise CnnError("the network's input needs a shape, like 'input image: 1x28x28' or 'input v: 784'", st.loc)
        if len(st.shape) not in (1, 3) or min(st.shape) < 1:
            raise CnnError(f"an input shape is CxHxW (like 1x28x28) or a length N, got {'x'.join(map(str, st.shape))}",
                           st.loc)
        name = scope.prefix + st.name
        add_node(self.g, name, "input", [], args={"shape": tuple(st.shape)}, loc=st.loc, binding=name)
        self.g.graph["input"] = name
        scope.tensors[st.name] = name

    def lookup(self, name: str, loc: Loc, scope: Scope) -> str:
        if name in scope.tensors:
            scope.used.add(name)
            return scope.tensors[name]
        if name in scope.later:
            raise CnnError(f"'{name}' is used before it is bound (at line {scope.later[name].line})", loc)
        raise CnnError(f"unknown name '{name}'{did_you_mean(name, scope.tensors)}", loc)

    # ---- bindings and chains ----------------------------------------

    def expand(self, elements: list[ast.Element]) -> list[Item]:
        """Repetition and groups unrolled into one item per layer (at most MAX_CHAIN of them)."""
        items: list[Item] = []
        for el in elements:
            if el.repeat > 1 and el.label is not None:
                raise CnnError(f"a repeated layer cannot carry the single label '{el.label}'", el.label_loc)
            once = [Item(el.call, el.label, el.label_loc)] if el.call is not None else self.expand(el.group)
            if len(items) + len(once) * el.repeat > MAX_CHAIN:
                raise CnnError(f"this chain would unroll into more than {MAX_CHAIN:,} layers", el.loc)
            items += once
            items += [Item(it.call, it.label, it.label_loc) for _ in range(el.repeat - 1) for it in once]
        return items

    def has_params(self, call: ast.Call) -> bool:
        """Whether a layer, or any layer a block expands into, has parameters (once per block: blocks nest)."""
        if call.name in OPS:
            return OPS[call.name].has_params
        if call.name not in self.blocks:
            return False
        if call.name not in self._has_params:
            self._has_params[call.name] = False  # (a block that uses itself is an error when it is lowered)
            block = self.blocks[call.name]
            self._has_params[call.name] = any(self.has_params(c) for st in block.body if isinstance(st, ast.Binding)
                                              for c in _calls(st.chain))
        return self._has_params[call.name]

    def count_layers(self, st: ast.Binding) -> None:
        """Add a network binding's layers, blocks and repetition unrolled, to the network's total (MAX_LAYERS)."""
        self.layers += 0 if isinstance(st.source, tuple) else 1
        for el in st.chain:
            self.layers += self.layers_in([el])
            if self.layers > MAX_LAYERS:
                raise CnnError(f"the network would unroll into more than {MAX_LAYERS:,} layers "
                               "(blocks and repetition expanded)", el.loc)

    def layers_in(self, elements: list[ast.Element]) -> int:
        """How many layers `elements` unroll into, counted without unrolling them."""
        total = 0
        for el in elements:
            total += el.repeat * (self.block_layers(el.call.name) if el.call is not None else self.layers_in(el.group))
        return total

    def block_layers(self, name: str) -> int:
        """Layers one use of `name` unrolls into (1 for a built-in layer), remembered per block."""
        if name not in self.blocks:
            return 1
        if name not in self._sizes:
            self._sizes[name] = 1  # (a block that uses itself is an error when it is lowered)
            body = [st for st in self.blocks[name].body if isinstance(st, ast.Binding)]
            self._sizes[name] = sum(self.layers_in(st.chain) + (0 if isinstance(st.source, tuple) else 1)
                                    for st in body)
        return self._sizes[name]

    def binding(self, st: ast.Binding, scope: Scope) -> str:
        items = self.expand(st.chain)
        binding = scope.prefix + st.name
        param_index = {id(it): k for k, it in enumerate((it for it in items if self.has_params(it.call)), 1)}
        n_items = len(items) + (0 if isinstance(st.source, tuple) else 1)
        copies: dict[str, int] = {}  # op -> how many unlabelled layers of it the binding has so far

        def name_for(item: Item | None, op: str) -> str:
            if item is not None and item.label is not None:
                return scope.prefix + item.label
            if item is not None and id(item) in param_index:
                return binding if len(param_index) == 1 else f"{binding}.{param_index[id(item)]}"
            if n_items == 1 and not param_index:
                return binding
            copies[op] = copies.get(op, 0) + 1
            return f"{binding}.{op}" + (str(copies[op]) if copies[op] > 1 else "")

        if isinstance(st.source, tuple):
            current = self.lookup(st.source[0], st.source[1], scope)
        else:
            current = self.multi_input(st.source, name_for(None, st.source.name), binding, scope)
        for item in items:
            current = self.element(item, name_for(item, item.call.name), binding, current, scope)
        return current

    def multi_input(self, call: ast.Call, name: str, binding: str, scope: Scope) -> str:
        op = OPS.get(call.name)
        if op is None or not op.multi_input:
            if op is not None or call.name in self.blocks:
                raise CnnError(f"a chain starts with a name, or with add(...) or concat(...); "
                               f"write 'y = x -> {call.name}(...)'", call.loc)
            raise CnnError(f"unknown layer '{call.name}'{did_you_mean(call.name, ['add', 'concat'])}", call.loc)
        inputs = []
        for a in call.args:
            if a.name is not None or a.value.kind != "word" or a.value.value in scope.params:
                raise CnnError(f"{call.name} takes the names of the tensors to join, like {call.name}(x, y)", a.loc)
            inputs.append(self.lookup(a.value.value, a.value.loc, scope))
        if len(inputs) < 2:
            raise CnnError(f"{call.name} needs at least two inputs, like {call.name}(x, y)", call.loc)
        self.new_node(name, call.name, inputs, call.loc, binding, args={})
        return name

    def new_node(self, name: str, op: str, inputs: list[str], loc: Loc, binding: str, name_loc: Loc | None = None,
                 **attrs: Any) -> None:
        if name in self.g:
            first = self.g.nodes[name]["loc"]
            raise CnnError(f"the layer name '{name}' is already used (at line {first.line})", name_loc or loc)
        if self.uses:
            attrs["uses"] = tuple(self.uses)
        add_node(self.g, name, op, inputs, loc=loc, binding=binding, **attrs)

    def element(self, item: Item, name: str, binding: str, current: str, scope: Scope) -> str:
        call = item.call
        if call.name in self.blocks:
            return self.block_use(item, name, current, scope)
        op = OPS.get(call.name)
        if op is None or op.name == "input":
            choices = [*LAYERS, *self.blocks]
            raise CnnError(f"unknown layer '{call.name}'{did_you_mean(call.name, choices)}", call.loc)
        if op.multi_input:
            raise CnnError(f"{op.name} joins named tensors and starts a chain: write 'r = {op.name}(a, b) -> ...'",
                           call.loc)
        args = self.arguments(op.name, [(a.name, a.kind, a.default, a.doc) for a in op.args], call, scope)
        op.check(args, call.loc)
        attrs: dict[str, Any] = {}
        if args.get("connect") is not None:
            self.connect_table(args, call)
        if args.get("weights") is not None:
            attrs["fixed"] = {"weight": args["weights"]}
        self.new_node(name, op.name, [current], call.loc, binding, item.label_loc, args=args, **attrs)
        return name

    def arguments(self, what: str, spec: list[tuple], call: ast.Call, scope: Scope) -> dict[str, Any]:
        """Bind positional and keyword arguments to `spec` [(name, kind, default, doc)], checking each value."""
        names = [s[0] for s in spec]
        given: dict[str, tuple[Any, Loc]] = {}
        positional_done = False
        for i, a in enumerate(call.args):
            if a.name is None:
                if positional_done:
                    raise CnnError("positional arguments come before key=value arguments", a.loc)
                if i >= len(spec):
                    listed = ", ".join(names) if names else "none"
                    raise CnnError(f"{what} takes {len(spec)} argument{'s' * (len(spec) != 1)} ({listed}), "
                                   f"got {len([x for x in call.args if x.name is None])}", a.loc)
                key = names[i]
            else:
                positional_done = True
                key = a.name
                if key not in names:
                    hint = did_you_mean(key, names) or (f"; it takes {', '.join(names)}" if names else "")
                    raise CnnError(f"{what} has no argument '{key}'{hint}", a.loc)
                if key in given:
                    raise CnnError(f"argument '{key}' is given twice", a.loc)
            given[key] = (evaluate(a.value, scope.params), a.value.loc)
        out: dict[str, Any] = {}
        for name, kind, default, doc in spec:
            if name in given:
                value, loc = given[name]
                out[name] = convert(value, kind, f"{what} argument '{name}'", loc)
            elif default is REQUIRED:
                raise CnnError(f"{what} needs '{name}'" + (f" ({doc})" if doc else ""), call.loc)
            else:
                out[name] = convert(default, kind, name, call.loc) if kind in ("size", "pad") else default
        return out

    def connect_table(self, args: dict, call: ast.Call) -> None:
        """Resolve ``connect=TABLE`` into rows, checking the table against the layer's output channels."""
        tname = args["connect"]
        loc = next(a.value.loc for a in call.args if a.name == "connect")
        table = self.tables.get(tname)
        if table is None:
            raise CnnError(f"unknown table '{tname}'{did_you_mean(tname, self.tables)}", loc)
        self.used_tables.add(tname)
        rows: dict[int, tuple[list[int], Loc]] = {}
        out = args["out"]
        for index, cols, rloc in table.rows:
            if index in rows:
                raise CnnError(f"table {tname}: row {index} appears twice (first at line {rows[index][1].line})", rloc)
            if out is not None and index >= out:
                raise CnnError(f"table {tname}: row {index} is out of range; conv has {out} output channels "
                               f"(rows 0..{out - 1})", rloc)
            if len(set(cols)) != len(cols):
                raise CnnError(f"table {tname}: row {index} lists an input channel twice", rloc)
            if not cols:
                raise CnnError(f"table {tname}: row {index} reads no input channel", rloc)
            rows[index] = (sorted(cols), rloc)
        n = out if out is not None else len(rows)
        missing = [i for i in range(n) if i not in rows]
        if missing:
            raise CnnError(f"table {tname} has no row for output channel {missing[0]}; every output channel "
                           f"0..{n - 1} needs a row", table.loc)
        args["connect"] = tuple(tuple(rows[i][0]) for i in range(n))
        args["connect_locs"] = tuple(rows[i][1] for i in range(n))
        args["connect_name"] = tname

    def block_use(self, item: Item, name: str, current: str, scope: Scope) -> str:
        call = item.call
        block = self.blocks[call.name]
        if call.name in scope.blocks:
            raise CnnError(f"block '{call.name}' uses itself", call.loc)
        self.used_blocks.add(call.name)
        spec = [(p.name, "any", REQUIRED if p.default is None else p.default, "") for p in block.params]
        values = self.arguments(f"block {block.name}", spec, call, scope)
        for p in block.params:
            if isinstance(values[p.name], ast.Expr):
                values[p.name] = evaluate(values[p.name], {})
        inner = Scope(prefix=name + ".", params=values, blocks=(*scope.blocks, call.name))
        self.uses.append((block.name, call.loc))
        try:
            return self.body(block.body, inner, block_input=current, where=f"block '{block.name}'", loc=block.loc)
        except CnnError as e:
            raise e.note_block_uses(tuple(self.uses)) from None
        finally:
            self.uses.pop()


def _calls(elements: list[ast.Element]) -> Iterator[ast.Call]:
    """The calls of a chain, each once however often it is repeated."""
    for el in elements:
        if el.call is not None:
            yield el.call
        else:
            yield from _calls(el.group)


def lower(file: ast.File, diag: Diagnostics | None = None) -> nx.DiGraph:
    """Build the IR graph of the file's network; user mistakes raise ``CnnError``."""
    try:
        return Lowering(file, diag or Diagnostics()).run()
    except RecursionError:
        raise CnnError("the file nests blocks, groups or expressions too deeply",
                       Loc(file.path, 1, 1, 1, file.source)) from None

