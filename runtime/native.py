"""Loading compiled object code into this process and calling into it.

Only llvmlite's MCJIT object loader is used: no compiler front end, no
networkx, no lark, so an artifact runs wherever numpy and llvmlite import.
"""

from __future__ import annotations

import ctypes
import struct
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


BUNDLE = b"CNNCOBJ1"


def bundle(objects: list[bytes]) -> bytes:
    """Several object files as one blob: magic, count, lengths (u64 little-endian), then the objects."""
    header = BUNDLE + struct.pack("<Q", len(objects)) + b"".join(struct.pack("<Q", len(o)) for o in objects)
    return header + b"".join(objects)


def unbundle(blob: bytes) -> list[bytes]:
    """The object files of a bundle (a plain object file is a bundle of one)."""
    if not blob.startswith(BUNDLE):
        return [blob]
    at = len(BUNDLE)
    (count,) = struct.unpack_from("<Q", blob, at)
    if count > 1_000_000 or at + 8 + 8 * count > len(blob):
        raise ValueError("corrupt object bundle")
    sizes = struct.unpack_from(f"<{count}Q", blob, at + 8)
    at += 8 + 8 * count
    out = []
    for size in sizes:
        if at + size > len(blob):
            raise ValueError("truncated object bundle")
        out.append(blob[at:at + size])
        at += size
    return out


class NativeLibrary:
    """Object files linked into this process; functions are looked up by name.

    The engine owns the machine code, so keep this object alive as long as any
    function taken from it may be called.
    """

    def __init__(self, obj: bytes, triple: str, cpu: str, features: str) -> None:
        _init_llvm()
        target = llvm.Target.from_triple(triple)
        tm = target.create_target_machine(cpu=cpu, features=features, opt=0, reloc="pic", codemodel="default")
        self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        for part in unbundle(obj):
            self._engine.add_object_file(llvm.ObjectFileRef.from_data(part))
        self._engine.finalize_object()
        self._obj = obj

    def function(self, name: str, argtypes: list) -> ctypes._CFuncPtr:
        """A callable for symbol `name`; ctypes releases the GIL while it runs."""
        addr = self._engine.get_function_address(name)
        if not addr:
            raise KeyError(f"no native function {name!r} in this artifact")
        return ctypes.CFUNCTYPE(None, *argtypes)(addr)
