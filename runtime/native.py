"""Loading compiled object code into this process and calling into it.

Only llvmlite's MCJIT object loader is used: no compiler front end, no
networkx, no lark, so an artifact runs wherever numpy and llvmlite import.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import llvmlite.binding as llvm


@lru_cache(maxsize=1)
def _init_llvm() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


def host_cpu() -> tuple[str, str, str]:
    """(triple, cpu name, feature string) of this machine."""
    _init_llvm()
    return llvm.get_process_triple(), llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


def missing_features(features: str) -> list[str]:
    """The `+feature`s of a feature string that this CPU does not have."""
    _, _, host = host_cpu()
    have = {f[1:] for f in host.split(",") if f.startswith("+")}
    return sorted(f[1:] for f in features.split(",") if f.startswith("+") and f[1:] not in have)


class NativeLibrary:
    """An object file linked into this process; functions are looked up by name.

    The engine owns the machine code, so keep this object alive as long as any
    function taken from it may be called.
    """

    def __init__(self, obj: bytes, triple: str, cpu: str, features: str) -> None:
        _init_llvm()
        target = llvm.Target.from_triple(triple)
        tm = target.create_target_machine(cpu=cpu, features=features, opt=0, reloc="pic", codemodel="default")
        self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self._engine.finalize_object()
        self._obj = obj

    def function(self, name: str, argtypes: list) -> ctypes._CFuncPtr:
        """A callable for symbol `name`; ctypes releases the GIL while it runs."""
        addr = self._engine.get_function_address(name)
        if not addr:
            raise KeyError(f"no native function {name!r} in this artifact")
        return ctypes.CFUNCTYPE(None, *argtypes)(addr)
