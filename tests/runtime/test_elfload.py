"""cnnc_runtime.elfload: object files linked and mapped without LLVM, running bit for bit what MCJIT runs.

Whole networks are loaded both ways (MCJIT forced by making the ELF loader
refuse); small hand-written modules check one feature each (calls between
objects, constant pools, calls and GOT references into libc, writable data);
corrupt objects must raise, never crash.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import llvmlite.binding as llvm
import llvmlite.ir as ir
import numpy as np
import pytest

from cnnc.codegen.target import Target, emit_object, generic_target, host_target
from cnnc_runtime import native
from cnnc_runtime.elfload import R_64, R_PLT32, R_REX_GOTPCRELX, BadObject, ElfObject, LoadedCode, UnsupportedObject
from cnnc_runtime.native import NativeLibrary, bundle, unbundle
from tests.reference import EXAMPLES, NETWORKS, build

NETS = {
    "lenet5": NETWORKS["lenet5"],
    "cifar_small": (EXAMPLES / "cifar_small.cnn").read_text(),
    "resnet_tiny": (EXAMPLES / "resnet_tiny.cnn").read_text(),
    "branches": NETWORKS["branches"],  # strided and grouped convs, overlapping max pool, concat, softmax
}
F32, I64, PTR = ir.FloatType(), ir.IntType(64), ir.PointerType()


def refuse(objects: list[bytes]) -> LoadedCode:
    raise UnsupportedObject("refused by the test: load with MCJIT")


# ---- whole networks ---------------------------------------------------------------------------


@pytest.mark.parametrize("generic", [False, True], ids=["host", "generic"])
@pytest.mark.parametrize("name", NETS)
def test_network_runs_as_under_mcjit(name, generic, monkeypatch) -> None:
    elf = build(NETS[name], seed=1, generic=generic)
    monkeypatch.setattr(native, "LoadedCode", refuse)
    jit = build(NETS[name], seed=1, generic=generic)
    assert (elf._lib.loader, jit._lib.loader) == ("elf", "mcjit")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *elf.input_shape)).astype(np.float32)
    labels = rng.integers(0, elf.output_shape[0], size=2)
    np.testing.assert_array_equal(elf(x), jit(x))
    for loss in ("cross_entropy", "mse"):
        value, grads = elf.value_and_grad(x, labels, loss, seed=5)
        want_value, want = jit.value_and_grad(x, labels, loss, seed=5)
        assert value == want_value
        for k in want:
            np.testing.assert_array_equal(grads[k], want[k], err_msg=k)


def in_fresh_process(code: str, cache: Path) -> str:
    env = {**os.environ, "CNNC_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=cache, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_cached_compile_and_an_artifact_load_without_llvm(tmp_path) -> None:
    """Once a network is in the cache (and LLVM has been asked about this CPU), no process loads LLVM to run it."""
    (tmp_path / "lenet5.cnn").write_text(NETS["lenet5"])
    in_fresh_process("import cnnc; cnnc.compile('lenet5.cnn').save_artifact('lenet5.cnnc')", tmp_path)
    run = """
        import sys
        import numpy as np
        import cnnc
        m = {}
        m(np.zeros((2, *m.input_shape), np.float32))
        print(m._lib.loader, "llvmlite.binding" in sys.modules)
    """
    assert in_fresh_process(run.format("cnnc.compile('lenet5.cnn')"), tmp_path) == "elf False"
    assert in_fresh_process(run.format("cnnc.load('lenet5.cnnc')"), tmp_path) == "elf False"


# ---- one feature at a time ---------------------------------------------------------------------


def function(module: ir.Module, name: str, ret: ir.Type, *args: ir.Type) -> tuple[ir.Function, ir.IRBuilder]:
    fn = ir.Function(module, ir.FunctionType(ret, args), name)
    return fn, ir.IRBuilder(fn.append_basic_block())


def call(code: LoadedCode, name: str, ret, *args):
    """Call `name` with C types inferred from Python values (int -> int64, float -> float)."""
    types = [ctypes.c_float if isinstance(a, float) else ctypes.c_int64 for a in args]
    address = code.address(name)
    assert address, name
    return ctypes.CFUNCTYPE(ret, *types)(address)(*args)


def relocations(obj: bytes) -> set[tuple[int, str]]:
    """(type, symbol name) of every relocation of an object's loaded sections."""
    o = ElfObject(obj)
    return {(rtype, o.symbols[j].name) for _, rows in o.relocations() for _, rtype, j, _ in rows}


def test_calls_between_objects() -> None:
    """The entry object calls a kernel in another object, which calls back: globals are shared by the bundle."""
    kernels, entry = ir.Module("kernels"), ir.Module("entry")
    axpy, b = function(kernels, "axpy", F32, F32, F32, F32)
    bias = ir.Function(kernels, ir.FunctionType(F32, []), "bias")
    a, x, y = axpy.args
    b.ret(b.fadd(b.fadd(b.fmul(a, x), y), b.call(bias, [])))
    _, b = function(entry, "bias", F32)
    b.ret(F32(0.25))
    fn, b = function(entry, "twice_plus_one", F32, F32)
    callee = ir.Function(entry, axpy.function_type, "axpy")
    b.ret(b.call(callee, [fn.args[0], F32(2.0), F32(1.0)]))
    objs = [emit_object(m, host_target()) for m in (kernels, entry)]
    assert (R_PLT32, "bias") in relocations(objs[0]) and (R_PLT32, "axpy") in relocations(objs[1])
    code = LoadedCode(objs)
    assert call(code, "twice_plus_one", ctypes.c_float, 3.0) == 7.25
    assert code.address("no_such_function") == 0


@pytest.mark.parametrize("target", [host_target(), generic_target()], ids=["host", "generic"])
def test_vector_constants_and_tables_in_rodata(target: Target) -> None:
    module = ir.Module("consts")
    lanes = [0.5 + i for i in range(8)]
    fn, b = function(module, "fill", ir.VoidType(), PTR)
    b.store(ir.Constant(ir.VectorType(F32, 8), lanes), fn.args[0], align=4)
    b.ret_void()
    table = ir.GlobalVariable(module, ir.ArrayType(F32, 5), "table")
    table.initializer = ir.Constant(table.value_type, [1.0, -2.0, 4.0, -8.0, 16.0])
    table.global_constant, table.linkage = True, "private"
    fn, b = function(module, "pick", F32, I64)
    b.ret(b.load(b.gep(table, [I64(0), fn.args[0]]), typ=F32))
    code = LoadedCode([emit_object(module, target)])
    out = np.zeros(8, np.float32)
    call(code, "fill", None, out.ctypes.data)
    np.testing.assert_array_equal(out, lanes)
    assert [call(code, "pick", ctypes.c_float, i) for i in range(5)] == [1.0, -2.0, 4.0, -8.0, 16.0]


def test_memset_call_goes_to_libc() -> None:
    """llvm.memset with a run-time size becomes a call to libc's memset, through a stub: libc may be far away."""
    module = ir.Module("clear")
    memset = module.declare_intrinsic("llvm.memset", [PTR, I64])
    fn, b = function(module, "clear", ir.VoidType(), PTR, I64)
    b.call(memset, [fn.args[0], ir.IntType(8)(0x5A), fn.args[1], ir.IntType(1)(0)])
    b.ret_void()
    obj = emit_object(module, host_target())
    assert (R_PLT32, "memset") in relocations(obj)
    buf = np.zeros(1000, np.uint8)
    call(LoadedCode([obj]), "clear", None, buf.ctypes.data, 999)
    assert (buf[:999] == 0x5A).all() and buf[999] == 0


def test_got_references_to_the_process() -> None:
    """A libc variable and a libc function's address, both read through GOT slots."""
    module = ir.Module("got")
    environ = ir.GlobalVariable(module, PTR, "environ")
    _, b = function(module, "get_environ", PTR)
    b.ret(b.load(environ, typ=PTR))
    memcpy = ir.Function(module, ir.FunctionType(PTR, [PTR, PTR, I64]), "memcpy")
    _, b = function(module, "memcpy_address", PTR)
    b.ret(memcpy)
    obj = emit_object(module, host_target())
    assert {(R_REX_GOTPCRELX, "environ"), (R_REX_GOTPCRELX, "memcpy")} <= relocations(obj)
    code = LoadedCode([obj])
    libc = ctypes.CDLL(None)
    assert call(code, "get_environ", ctypes.c_void_p) == ctypes.c_void_p.in_dll(libc, "environ").value
    assert call(code, "memcpy_address", ctypes.c_void_p) == ctypes.cast(libc.memcpy, ctypes.c_void_p).value


def test_writable_data_and_pointer_tables() -> None:
    """A counter in .bss, a table of function pointers (absolute 64-bit relocations); code is never writable."""
    module = ir.Module("data")
    counter = ir.GlobalVariable(module, I64, "counter")
    counter.initializer = I64(0)
    _, b = function(module, "bump", I64)
    b.store(b.add(b.load(counter, typ=I64), I64(1)), counter)
    b.ret(b.load(counter, typ=I64))
    leaves = []
    for k in (1, 2):
        leaf, b = function(module, f"leaf{k}", I64)
        b.ret(I64(10 * k))
        leaves.append(leaf)
    table = ir.GlobalVariable(module, ir.ArrayType(PTR, 2), "leaves")
    table.initializer = ir.Constant(table.value_type, leaves)
    table.global_constant = True
    fn, b = function(module, "leaf_address", PTR, I64)
    b.ret(b.load(b.gep(table, [I64(0), fn.args[0]]), typ=PTR))
    code = LoadedCode([emit_object(module, host_target())])
    assert [call(code, "bump", ctypes.c_int64) for _ in range(3)] == [1, 2, 3]
    leaves = [call(code, "leaf_address", ctypes.c_void_p, i) for i in (0, 1)]
    assert leaves == [code.address("leaf1"), code.address("leaf2")]
    assert [ctypes.CFUNCTYPE(ctypes.c_int64)(a)() for a in leaves] == [10, 20]
    perms = {name: permissions(code.address(name)) for name in ("bump", "counter", "leaves")}
    assert perms["bump"].startswith("r-x") and perms["counter"].startswith("rw-"), perms
    assert not any("w" in p and "x" in p for p in perms.values())


def test_absolute_pointers_keep_their_addend() -> None:
    """A constant pointer into the middle of a table: an absolute 64-bit relocation with a non-zero addend."""
    module = ir.Module("addend")
    table = ir.GlobalVariable(module, ir.ArrayType(I64, 4), "table")
    table.initializer = ir.Constant(table.value_type, [10, 20, 30, 40])
    table.global_constant = True
    third = ir.GlobalVariable(module, PTR, "third")
    third.initializer = table.gep([I64(0), I64(2)])  # (writable, so the load is not folded to 30)
    _, b = function(module, "read_third", I64)
    b.ret(b.load(b.load(third, typ=PTR), typ=I64))
    obj = emit_object(module, host_target())
    o = ElfObject(obj)
    assert any(rtype == R_64 and addend == 16 for _, rows in o.relocations() for _, rtype, _, addend in rows)
    assert call(LoadedCode([obj]), "read_third", ctypes.c_int64) == 30


def test_weak_and_ifunc_symbols_are_refused() -> None:
    """cnnc's code has neither; an artifact that does is refused, not handed to MCJIT (which trusts its input)."""
    weak = ir.Module("weak")
    fn, b = function(weak, "answer", I64)
    fn.linkage = "weak"
    b.ret(I64(42))
    t = host_target()
    obj = emit_object(weak, t)
    with pytest.raises(BadObject, match="needs a real linker"):
        LoadedCode([obj])
    with pytest.raises(BadObject, match="needs a real linker"):
        NativeLibrary(bundle([obj]), t.triple, t.cpu, t.features)
    ifunc = textwrap.dedent("""
        define internal i64 @impl() {
          ret i64 42
        }
        define internal ptr @resolve() {
          ret ptr @impl
        }
        @f = internal ifunc i64 (), ptr @resolve
        define i64 @call_f() {
          %r = call i64 @f()
          ret i64 %r
        }
    """)
    obj = t.machine().emit_object(llvm.parse_assembly(ifunc))
    with pytest.raises(BadObject, match="not in a loaded section|needs a real linker"):
        LoadedCode([obj])


def permissions(address: int) -> str:
    """The protection of the page holding `address`, as /proc/self/maps shows it ("r-xp")."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(a, 16) for a in span.split("-"))
            if lo <= address < hi:
                return perms
    raise AssertionError(f"{address:#x} is not mapped")


# ---- what the loader refuses -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_obj() -> bytes:
    """The object with the external call (stub) and GOT references: the most relocation kinds in a few bytes."""
    module = ir.Module("small")
    memset = module.declare_intrinsic("llvm.memset", [PTR, I64])
    fn, b = function(module, "clear", ir.VoidType(), PTR, I64)
    b.call(memset, [fn.args[0], ir.IntType(8)(0), fn.args[1], ir.IntType(1)(0)])
    b.ret_void()
    _, b = function(module, "get_environ", PTR)
    b.ret(b.load(ir.GlobalVariable(module, PTR, "environ"), typ=PTR))
    return emit_object(module, host_target())


def rela_span(obj: bytes) -> tuple[int, int]:
    o = ElfObject(obj)
    (rela,) = [s for s in o.sections if s.name == ".rela.text"]
    return rela.offset, rela.offset + rela.size


@pytest.mark.parametrize("blob", [b"", b"hello", b"\x7fELF" + bytes(60), b"\x7fELF\x01\x01" + bytes(58)],
                         ids=["empty", "text", "zeros", "elf32"])
def test_not_an_object(blob: bytes) -> None:
    with pytest.raises(BadObject):
        LoadedCode([blob])


def test_truncated(small_obj: bytes) -> None:
    for n in (4, 63, 64, 100, len(small_obj) // 2, len(small_obj) - 64, len(small_obj) - 1):
        with pytest.raises(BadObject):
            LoadedCode([small_obj[:n]])


@pytest.mark.parametrize("where", ["relocations", "anywhere"])
def test_random_corruption_raises_or_loads(small_obj: bytes, where: str) -> None:
    """Flipped bytes never crash the loader nor make it write outside its mapping: they load or raise."""
    lo, hi = rela_span(small_obj) if where == "relocations" else (0, len(small_obj))
    refused = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        bad = bytearray(small_obj)
        for at in rng.integers(lo, hi, size=rng.integers(1, 4)):
            bad[at] ^= int(rng.integers(1, 256))
        try:
            LoadedCode([bytes(bad)]).close()  # (never called: the code may be garbage)
        except (UnsupportedObject, BadObject):
            refused += 1
    assert refused > 0


def test_unknown_relocation_type(small_obj: bytes) -> None:
    lo, _ = rela_span(small_obj)
    bad = bytearray(small_obj)
    bad[lo + 8] = 0x7F  # the first relocation's type
    with pytest.raises(BadObject, match="relocation type 127"):
        LoadedCode([bytes(bad)])


def test_undefined_symbol(small_obj: bytes) -> None:
    module = ir.Module("undefined")
    _, b = function(module, "f", ir.VoidType())
    b.call(ir.Function(module, ir.FunctionType(ir.VoidType(), []), "cnnc_no_such_function"), [])
    b.ret_void()
    with pytest.raises(BadObject, match="cnnc_no_such_function"):
        LoadedCode([small_obj, emit_object(module, host_target())])


def test_large_code_model_is_refused() -> None:
    """The large code model's GOT-relative 64-bit relocations are not cnnc's: refused, not handed to MCJIT.

    MCJIT loads such an object only when asked directly (as ``NativeLibrary`` does where this loader cannot run).
    """
    module = ir.Module("large")
    table = ir.GlobalVariable(module, ir.ArrayType(F32, 3), "table")
    table.initializer = ir.Constant(table.value_type, [1.5, 2.5, 3.5])
    fn, b = function(module, "pick", F32, I64)
    b.ret(b.load(b.gep(table, [I64(0), fn.args[0]]), typ=F32))
    t = host_target()
    tm = llvm.Target.from_triple(t.triple).create_target_machine(cpu=t.cpu, features=t.features, reloc="pic",
                                                                codemodel="large")
    obj = tm.emit_object(llvm.parse_assembly(str(module)))
    with pytest.raises(BadObject, match="relocation type"):
        LoadedCode([obj])
    with pytest.raises(BadObject, match="relocation type"):
        NativeLibrary(bundle([obj]), t.triple, t.cpu, t.features)
    lib = NativeLibrary.__new__(NativeLibrary)
    lib._code, lib._engine = None, native._mcjit([obj], t.triple, t.cpu, t.features)
    assert lib.loader == "mcjit"
    pick = lib.function("pick", [ctypes.c_int64])
    pick.restype = ctypes.c_float
    assert pick(2) == 3.5
    with pytest.raises(KeyError):
        lib.function("nothing", [])


def test_a_symbol_past_its_section(small_obj: bytes) -> None:
    o = ElfObject(small_obj)
    table = o.sections[o.symtab]
    (j,) = [j for j, sym in enumerate(o.symbols) if sym.name == "clear"]
    bad = bytearray(small_obj)
    struct.pack_into("<Q", bad, table.offset + j * 24 + 8, 1 << 20)  # st_value
    with pytest.raises(BadObject, match="outside its section"):
        LoadedCode([bytes(bad)])


def test_a_symbol_defined_twice(small_obj: bytes) -> None:
    with pytest.raises(BadObject, match="defined twice"):
        LoadedCode(unbundle(bundle([small_obj, small_obj])))


# ---- damaged networks: through NativeLibrary, in a fresh process (a crash fails the test) --------------------------

FUZZ = """
    import struct, sys
    import numpy as np
    from cnnc_runtime import elfload, native
    from cnnc_runtime.native import NativeLibrary, bundle, unbundle

    parts = unbundle(open("net.o", "rb").read())
    triple, cpu, features = sys.argv[1:4]

    def headers_and_tables(o):
        shoff = struct.unpack_from("<Q", o.data, 40)[0]
        spans = [(0, 64), (shoff, shoff + 64 * len(o.sections))]
        return spans + [(s.offset, s.offset + s.size) for s in o.sections
                        if s.type in (elfload.SHT_SYMTAB, elfload.SHT_RELA, elfload.SHT_STRTAB) and s.size]

    def mcjit_never(*args):
        raise AssertionError("a damaged object was handed to MCJIT")

    native._mcjit = mcjit_never
    outcomes = {}
    for seed in range(int(sys.argv[4])):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(len(parts)))
        data = bytearray(parts[k])
        if seed % 5 == 0:  # truncated, or nothing at all
            data = data[:int(rng.integers(0, len(data)))]
        else:
            spans = headers_and_tables(elfload.ElfObject(parts[k]))
            lo, hi = spans[int(rng.integers(len(spans)))]
            for at in rng.integers(lo, hi, size=rng.integers(1, 4)):
                data[at] ^= int(rng.integers(1, 256))
        try:
            NativeLibrary(bundle([*parts[:k], bytes(data), *parts[k + 1:]]), triple, cpu, features)
            outcome = "loaded"
        except elfload.BadObject:
            outcome = "refused"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(sorted(outcomes.items()))
"""


def test_damaged_objects_are_refused_never_crash_nor_reach_mcjit(tmp_path) -> None:
    """Flipped bytes in the headers, symbol, string and relocation tables of a real network, or a cut-off object:
    each loads (its code is never called) or is ``BadObject``; nothing crashes, nothing reaches MCJIT, which
    aborted on such objects (an empty one, a relocation out of range).
    """
    model = build(NETS["lenet5"])
    (tmp_path / "net.o").write_bytes(model._obj)
    t = model.manifest["target"]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(FUZZ), t["triple"], t["cpu"], t["features"], "250"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = dict(eval(done.stdout))  # noqa: S307 - our own subprocess's repr of a list of pairs
    assert outcomes["refused"] > 100, outcomes


def test_an_empty_object_never_reaches_mcjit(monkeypatch) -> None:
    def mcjit_never(*args):
        raise AssertionError("handed to MCJIT")

    monkeypatch.setattr(native, "_mcjit", mcjit_never)
    t = host_target()
    for blob in (b"", b"\x7fELF", bytes(64)):
        with pytest.raises(BadObject):
            NativeLibrary(bundle([blob]), t.triple, t.cpu, t.features)
