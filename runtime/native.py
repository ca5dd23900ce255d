"""Loading compiled object code into this process and calling into it.

Objects are linked and mapped by ``cnnc_runtime.elfload``, which needs only
ctypes: importing ``llvmlite.binding`` alone would cost more than the rest of
loading a cached network. llvmlite's MCJIT loads what that loader does not
support, or where it cannot map executable memory.
"""

from __future__ import annotations

import ctypes
import struct
from typing import TYPE_CHECKING

from cnnc_runtime import host
from cnnc_runtime.elfload import LoadedCode, UnsupportedObject

if TYPE_CHECKING:  # imported where needed: loading an object file does not need LLVM
    import llvmlite.binding as llvm


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

    This object owns the machine code, so keep it alive as long as any
    function taken from it may be called.
    """

    def __init__(self, obj: bytes, triple: str, cpu: str, features: str) -> None:
        parts = unbundle(obj)
        try:
            self._code: LoadedCode | None = LoadedCode(parts)
            self._engine = None
        except (UnsupportedObject, OSError):  # (OSError: mmap or mprotect refused, as under some hardening)
            self._code = None
            self._engine = _mcjit(parts, triple, cpu, features)
        self._obj = obj

    @property
    def loader(self) -> str:
        """Which loader holds the code: "elf" (``cnnc_runtime.elfload``) or "mcjit" (llvmlite's)."""
        return "elf" if self._code is not None else "mcjit"

    def function(self, name: str, argtypes: list, restype=None) -> ctypes._CFuncPtr:
        """A callable for symbol `name`; ctypes releases the GIL while it runs."""
        addr = self._code.address(name) if self._code is not None else self._engine.get_function_address(name)
        if not addr:
            raise KeyError(f"no native function {name!r} in this artifact")
        return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


def _mcjit(parts: list[bytes], triple: str, cpu: str, features: str) -> llvm.ExecutionEngine:
    """An MCJIT engine holding `parts`, for objects the ELF loader does not support."""
    llvm = host.llvm()
    target = llvm.Target.from_triple(triple)
    tm = target.create_target_machine(cpu=cpu, features=features, opt=0, reloc="pic", codemodel="default")
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
    for part in parts:
        engine.add_object_file(llvm.ObjectFileRef.from_data(part))
    engine.finalize_object()
    return engine
