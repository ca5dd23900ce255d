"""The import graph of cnnc and cnnc_runtime: no cycles, and imports inside functions only where a comment says why.

The graph is read from the source (the AST), not by importing: an edge A -> B
for every ``import`` in A of a module of B, at module level or inside a
function (a cycle through a function-level import is a cycle all the same,
only hidden). Imports under ``if TYPE_CHECKING:`` are for type hints and do
not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cnnc": ROOT / "cnnc", "cnnc_runtime": ROOT / "runtime"}

# Imports allowed inside a function: (importing module, imported module). Only optional dependencies and the
# lazy loading of LLVM and the compiler behind it; the import line itself carries a comment saying why.
ALLOWED_IN_FUNCTIONS = {
    # `import cnnc` stays about 10 ms: the pipeline (numpy, llvmlite) and the runtime load on the first call
    ("cnnc", "cnnc.pipeline"),
    ("cnnc", "cnnc_runtime.model"),
    # the compiler (lark, networkx; about 0.3 s) and its code generator (llvmlite.ir): loaded when a compile
    # misses the cache or a command needs a graph, the code generator only to generate code
    ("cnnc.pipeline", "cnnc.compiler"),
    ("cnnc.pipeline", "cnnc.generate"),
    # the runtime's Model (numpy's random generators with it): a compile that generates code imports them while
    # its other processes compile (cnnc.generate._load_runtime), not on the critical path before or after
    ("cnnc.pipeline", "cnnc_runtime.model"),
    ("cnnc.generate", "cnnc_runtime.model"),
    ("cnnc.generate", "numpy.random"),
    # the float64 reference (networkx) behind `cnnc gradcheck`: the other commands start without it
    ("cnnc.cli.gradcheck", "cnnc.gradcheck"),
    # matplotlib: an optional dependency (the plot extra), for `cnnc train --plot` only
    ("cnnc.cli.train", "matplotlib"),
    ("cnnc.cli.train", "matplotlib.pyplot"),
    # Pillow: an optional dependency (the images extra), for image folders only
    ("cnnc_runtime.data", "PIL"),
    # mpi4py: an optional dependency (the mpi extra), imported only in a process an MPI launcher started
    ("cnnc_runtime.distributed", "mpi4py"),
    # LLVM itself (20-30 ms): only compiling and asking LLVM about the CPU need it
    ("cnnc_runtime.host", "llvmlite.binding"),
    # onnx: an optional dependency (the onnx extra), for ONNX export and import only; the importer (the op table,
    # networkx) for `cnnc.compile("x.onnx")` and `cnnc import` only
    ("cnnc_runtime.onnx_export", "onnx"),
    ("cnnc.onnx", "onnx"),
    ("cnnc", "cnnc.onnx.import_"),
    ("cnnc.cli.import_", "cnnc.onnx.import_"),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (for `from M import name`: M.name when that is a module, else M)
    line: int
    in_function: bool
    text: str  # the source line


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(pkg, root, p): p for pkg, root in PACKAGES.items() for p in sorted(root.rglob("*.py"))}


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package this module is in
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(module: str, path: Path) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module, path.name == "__init__.py"):
                    found.append(Import(module, target, child.lineno, in_function, lines[child.lineno - 1]))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source, str(path)), False)
    return found


ALL_IMPORTS = [i for module, path in MODULES.items() for i in _imports(module, path)]


def _internal(target: str) -> str | None:
    """The module of cnnc or cnnc_runtime that `target` names (`cnnc.x.y` where y is a function: `cnnc.x`)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def import_graph(include_functions: bool = True) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for i in ALL_IMPORTS:
        target = _internal(i.target)
        if target is not None and target != i.module and (include_functions or not i.in_function):
            g.add_edge(i.module, target, line=i.line, in_function=i.in_function)
    return g


def test_the_packages_have_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_the_runtime_layers_point_down():
    """``model`` (the user's class) -> ``train`` (fit, evaluate) -> ``engine`` (the compiled network)."""
    g = import_graph()
    assert g.has_edge("cnnc_runtime.model", "cnnc_runtime.train")
    assert g.has_edge("cnnc_runtime.train", "cnnc_runtime.engine")
    assert not nx.has_path(g, "cnnc_runtime.engine", "cnnc_runtime.train")


def test_imports_inside_functions_are_only_the_allowed_ones_each_with_a_comment():
    inside = [i for i in ALL_IMPORTS if i.in_function]
    unexpected = [f"{MODULES[i.module].relative_to(ROOT)}:{i.line}: {i.text.strip()}"
                  for i in inside if (i.module, i.target) not in ALLOWED_IN_FUNCTIONS]
    assert not unexpected, "imports inside functions (move them to the top of the module):\n" + "\n".join(unexpected)
    silent = [f"{MODULES[i.module].relative_to(ROOT)}:{i.line}" for i in inside if "#" not in i.text]
    assert not silent, f"say why these imports are inside a function, in a comment on the line: {silent}"


def test_every_allowed_entry_is_still_used():
    used = {(i.module, i.target) for i in ALL_IMPORTS if i.in_function}
    assert sorted(ALLOWED_IN_FUNCTIONS - used) == []


def test_the_runtime_never_imports_the_compiler():
    """cnnc_runtime runs artifacts alone, with no cnnc installed."""
    g = import_graph()
    assert [(a, b) for a, b in g.edges if a.startswith("cnnc_runtime") and not b.startswith("cnnc_runtime")] == []


def test_the_graph_reader_sees_imports_inside_functions_and_skips_type_hints():
    """The reader itself, on cnnc/pipeline.py: what the checks above rely on."""
    found = {(i.target, i.in_function) for i in _imports("cnnc.pipeline", MODULES["cnnc.pipeline"])}
    assert ("cnnc.compiler", True) in found and ("cnnc.cache", False) in found
    assert not any(t == "networkx" for t, _ in found)  # (under TYPE_CHECKING only)


def _fresh_process(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


HEAVY = ("lark", "networkx", "llvmlite.binding", "cnnc.compiler", "cnnc.frontend", "numpy")
LOADED = "import sys; print(*[m for m in {heavy} if m in sys.modules])"


@pytest.mark.parametrize("statement, allowed", [
    ("import cnnc", ()),
    ("import cnnc.cli", ("numpy",)),  # every command starts without the compiler
])
def test_what_the_lazy_imports_keep_out(statement, allowed):
    assert _fresh_process(f"{statement}; {LOADED.format(heavy=HEAVY)}") == list(allowed)


def test_a_cached_compile_loads_no_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    compile_tiny = "import cnnc; cnnc.compile_string('network t { input x: 4  y = x -> dense(3) }')"
    code = f"{compile_tiny}; {LOADED.format(heavy=HEAVY)}"
    assert "cnnc.compiler" in _fresh_process(code)  # the first compile: a miss
    assert _fresh_process(code) == ["numpy"]
