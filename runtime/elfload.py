"""Loading relocatable x86-64 ELF objects into this process without LLVM.

llvmlite's MCJIT loads cnnc's object files too, but importing
``llvmlite.binding`` alone costs more than the rest of loading a cached
network. cnnc's code generator emits little: ``.text``, ``.rodata*`` constant
pools, calls between its objects and a few calls into libc (``memset``,
``rintf``), all position-independent with the default code model. This loader
lays those out in one mapping, links them and applies the relocations; for
anything else it raises ``BadObject``.

MCJIT trusts its input: an empty object, a relocation past its section or
one whose target lies too far away crashes LLVM (its assertions are on). So
an object this loader refuses is refused (``BadObject``, which the caller
does not catch), never handed to MCJIT: cnnc's own code never needs more than
this loader does. MCJIT loads code only where this loader cannot run at all
(``UnsupportedObject``: another OS or CPU) or cannot map memory (``OSError``),
and then only objects that ``parse`` accepted.

The mapping holds the code and stubs (then read and execute), read-only data
and the GOT (then read only) and writable data, each region on pages of its
own. Every offset and size read from a file is checked before use, so a
corrupt object raises rather than writing outside the mapping.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
import sys
import weakref
from functools import lru_cache
from typing import NamedTuple

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")
RELA = struct.Struct("<QQq")

SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOTE, SHT_NOBITS, SHT_REL = 1, 2, 3, 4, 7, 8, 9
SHT_X86_64_UNWIND = 0x70000001
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR, SHF_TLS = 0x1, 0x2, 0x4, 0x400
SHN_UNDEF, SHN_LORESERVE = 0, 0xFF00  # (ABS, COMMON and the other reserved indices are not supported)
STB_LOCAL, STB_GLOBAL = 0, 1
STT_TLS, STT_GNU_IFUNC = 6, 10

R_NONE, R_64, R_PC32, R_PLT32, R_GOTPCREL = 0, 1, 2, 4, 9
R_GOTPCRELX, R_REX_GOTPCRELX = 41, 42
GOT_RELOCS = (R_GOTPCREL, R_GOTPCRELX, R_REX_GOTPCRELX)
KNOWN_RELOCS = {R_NONE, R_64, R_PC32, R_PLT32, *GOT_RELOCS}  # all cnnc's objects use (PC32 and PLT32), and tested
EM_X86_64 = 62
LINKER_SYMBOLS = {"", "_GLOBAL_OFFSET_TABLE_"}  # undefined names a linker (MCJIT too) provides itself

STUB = b"\xff\x25\x00\x00\x00\x00"  # jmp *0(%rip): the 8-byte address follows
STUB_SIZE = 16
MAX_BSS = 1 << 28  # a larger zero-filled section is more likely a corrupt header than cnnc's
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20


class UnsupportedObject(ValueError):
    """Code this loader cannot load where it runs (another OS or CPU): load it with MCJIT instead."""


class BadObject(ValueError):
    """A damaged object file, or one that needs more than this loader links: refused, never handed to MCJIT."""


class Section(NamedTuple):
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    align: int


class Symbol(NamedTuple):
    name: str
    bind: int
    type: int
    shndx: int
    value: int
    size: int


Ref = str | tuple[int, int, int]  # a symbol: a process symbol's name, or (object, section, offset) of one loaded here


class ElfObject:
    """One parsed relocatable object: its sections, symbols and relocation tables (nothing loaded yet).

    Every offset, size, index and name is checked here (``BadObject``), so an
    object that parses is safe to hand to MCJIT.
    """

    def __init__(self, data: bytes) -> None:
        if len(data) < EHDR.size or data[:4] != b"\x7fELF":
            raise BadObject("not an ELF object file")
        ident, etype, machine, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx = EHDR.unpack_from(data)
        if ident[4] != 2 or ident[5] != 1:
            raise BadObject("not a 64-bit little-endian ELF file")
        if etype != 1:
            raise BadObject("not a relocatable object")
        if shentsize != SHDR.size or shnum == 0 or not 0 < shstrndx < shnum or shoff + shnum * SHDR.size > len(data):
            raise BadObject("malformed section header table")
        self.data = data
        self.machine = machine
        headers = [self._header(shoff + i * SHDR.size) for i in range(shnum)]
        names = headers[shstrndx]
        self.sections = [Section(self._string(names, h[0]), *h[1:]) for h in headers]
        tables = [i for i, s in enumerate(self.sections) if s.type == SHT_SYMTAB]
        if len(tables) != 1:
            raise BadObject(f"{len(tables)} symbol tables (expected one)")
        self.symtab = tables[0]
        self.symbols = self._symbols(self.sections[self.symtab])
        self._rela = [self._relocation_table(s) for s in self.sections]

    def _header(self, at: int) -> tuple[int, ...]:
        name, stype, flags, _, offset, size, link, info, align, entsize = SHDR.unpack_from(self.data, at)
        if stype in (SHT_SYMTAB, SHT_RELA) and entsize != {SHT_SYMTAB: SYM.size, SHT_RELA: RELA.size}[stype]:
            raise BadObject(f"a symbol or relocation table with entries of {entsize} bytes")
        if stype != SHT_NOBITS and offset + size > len(self.data):
            raise BadObject("a section extends past the end of the file")
        if stype == SHT_NOBITS and size > MAX_BSS:
            raise BadObject("a zero-filled section is too large")
        align = max(align, 1)
        if align & (align - 1) or align > mmap.PAGESIZE:
            raise BadObject(f"a section asks for alignment {align}")
        if stype != SHT_NOBITS and offset % align:
            raise BadObject(f"a section's contents are not {align}-byte aligned in the file")
        return name, stype, flags, offset, size, link, info, align

    def _string(self, table: tuple | Section, at: int) -> str:
        _, stype, _, offset, size = table[:5]
        if stype != SHT_STRTAB or at >= size:
            raise BadObject("a name outside its string table")
        end = self.data.find(b"\0", offset + at, offset + size)
        if end < 0:
            raise BadObject("an unterminated name")
        return self.data[offset + at:end].decode("utf-8", "surrogateescape")

    def _symbols(self, table: Section) -> list[Symbol]:
        if table.size % SYM.size or not 0 < table.link < len(self.sections):
            raise BadObject("malformed symbol table")
        strings = self.sections[table.link]
        rows = SYM.iter_unpack(self.data[table.offset:table.offset + table.size])
        symbols = [Symbol(self._string(strings, name) if name else "", info >> 4, info & 0xF, shndx, value, size)
                   for name, info, _, shndx, value, size in rows]
        for sym in symbols:
            if sym.shndx == SHN_UNDEF or sym.shndx >= SHN_LORESERVE:
                continue
            if sym.shndx >= len(self.sections) or sym.value + sym.size > self.sections[sym.shndx].size:
                raise BadObject(f"symbol {sym.name!r} lies outside its section")
        return symbols

    def _relocation_table(self, s: Section) -> list[tuple[int, int, int, int]] | None:
        """The rows (offset, type, symbol index, addend) of a RELA section, each checked; None for other sections."""
        if s.type == SHT_REL:
            raise BadObject("REL relocations (x86-64 objects use RELA)")
        if s.type != SHT_RELA:
            return None
        if s.link != self.symtab or s.size % RELA.size or not 0 < s.info < len(self.sections):
            raise BadObject(f"malformed relocation section {s.name!r}")
        target = self.sections[s.info]
        rows = [(off, info & 0xFFFFFFFF, info >> 32, addend)
                for off, info, addend in RELA.iter_unpack(self.data[s.offset:s.offset + s.size])]
        for off, rtype, j, _ in rows:
            width = 0  # (another CPU's relocations: their place must still lie inside the section)
            if self.machine == EM_X86_64:
                if rtype not in KNOWN_RELOCS:
                    raise BadObject(f"relocation type {rtype} (not one cnnc's code uses)")
                width = 8 if rtype == R_64 else 0 if rtype == R_NONE else 4
            if off + width > target.size or (width and target.type == SHT_NOBITS):
                raise BadObject(f"a relocation outside section {target.name!r}")
            if j >= len(self.symbols):
                raise BadObject("a relocation names a symbol that does not exist")
        return rows

    def exported(self) -> dict[str, Symbol]:
        """The global symbols this object defines, by name."""
        return {sym.name: sym for sym in self.symbols
                if sym.bind != STB_LOCAL and sym.shndx != SHN_UNDEF and sym.name}

    def contents(self, sym: Symbol) -> bytes:
        """The bytes a data symbol holds in the file (before any relocation); BadObject if it has none."""
        if not 0 < sym.shndx < len(self.sections) or self.sections[sym.shndx].type != SHT_PROGBITS:
            raise BadObject(f"symbol {sym.name!r} holds no data")
        start = self.sections[sym.shndx].offset + sym.value
        return self.data[start:start + sym.size]

    def loaded(self, i: int) -> bool:
        """Whether section `i` belongs in memory (allocated; unwind tables and notes are left out)."""
        s = self.sections[i]
        if not s.flags & SHF_ALLOC or s.name == ".eh_frame" or s.type in (SHT_X86_64_UNWIND, SHT_NOTE):
            return False
        if s.flags & SHF_TLS or s.type not in (SHT_PROGBITS, SHT_NOBITS):
            raise BadObject(f"section {s.name!r} (type {s.type:#x}) needs a real linker")
        return True

    def relocations(self) -> list[tuple[int, list[tuple[int, int, int, int]]]]:
        """(target section, [(offset, type, symbol index, addend)]) for each loaded section's relocations."""
        return [(s.info, rows) for s, rows in zip(self.sections, self._rela)
                if rows is not None and self.loaded(s.info)]


def _align(n: int, a: int) -> int:
    return (n + a - 1) & -a


class Image:
    """Where every loaded section, PLT stub and GOT slot of a set of objects goes, relative to the mapping's start.

    Code (with the stubs) comes first, then read-only data (with the GOT),
    then writable data, each region starting on a page of its own.
    """

    def __init__(self, objs: list[ElfObject]) -> None:
        self.objs = objs
        sizes, regions = [0, 0, 0], []
        for o in objs:
            placed = {}
            for i, s in enumerate(o.sections):
                if o.loaded(i):
                    region = 0 if s.flags & SHF_EXECINSTR else 2 if s.flags & SHF_WRITE else 1
                    placed[i] = (region, _align(sizes[region], s.align))
                    sizes[region] = placed[i][1] + s.size
            regions.append(placed)
        self.places = regions
        self.defined = self._globals()
        self.externals: set[str] = set()
        stubs: dict[str, None] = {}  # (dicts keep the first-seen order: the layout does not depend on hashing)
        got: dict[Ref, None] = {}
        self.fixups: list[tuple[int, int, list[tuple[int, int, Ref, int]]]] = []  # (object, section, relocations)
        for k, o in enumerate(objs):
            for target, rows in o.relocations():
                fixes = []
                for off, rtype, j, addend in rows:
                    if rtype == R_NONE:
                        continue
                    ref = self.symbol(k, j)
                    fixes.append((off, rtype, ref, addend))
                    if rtype in GOT_RELOCS:
                        got[ref] = None
                    if isinstance(ref, str):
                        self.externals.add(ref)
                        if rtype == R_PLT32:
                            stubs[ref] = None
                self.fixups.append((k, target, fixes))
        self.stubs = {name: sizes[0] + n * STUB_SIZE for n, name in enumerate(stubs)}
        self.rodata = _align(sizes[0] + STUB_SIZE * len(stubs), mmap.PAGESIZE)
        got_at = _align(self.rodata + sizes[1], 8)
        self.got = {key: got_at + 8 * n for n, key in enumerate(got)}
        self.data = _align(got_at + 8 * len(got), mmap.PAGESIZE)
        self.size = max(_align(self.data + sizes[2], mmap.PAGESIZE), mmap.PAGESIZE)
        if self.size >= 1 << 31:
            raise BadObject("the code does not fit in 2 GiB")
        starts = (0, self.rodata, self.data)
        self.where = [{i: starts[r] + off for i, (r, off) in placed.items()} for placed in regions]

    def _globals(self) -> dict[str, tuple[int, int]]:
        """name -> (object, symbol index) of each global definition (weak ones are left to a real linker)."""
        defined: dict[str, tuple[int, int]] = {}
        for k, o in enumerate(self.objs):
            for j, sym in enumerate(o.symbols):
                if sym.bind == STB_LOCAL or sym.shndx == SHN_UNDEF:
                    continue
                if sym.bind != STB_GLOBAL or sym.type in (STT_TLS, STT_GNU_IFUNC) \
                        or sym.shndx >= SHN_LORESERVE or sym.shndx not in self.places[k]:
                    raise BadObject(f"symbol {sym.name!r} needs a real linker")
                defined[sym.name] = (k, j)
        return defined

    def symbol(self, k: int, j: int) -> Ref:
        """Symbol `j` of object `k`: (object, section, offset) if loaded here, else its name (found in the process)."""
        o = self.objs[k]
        sym = o.symbols[j]
        if sym.bind != STB_LOCAL:
            if sym.name in self.defined:
                k, j = self.defined[sym.name]
                o, sym = self.objs[k], self.objs[k].symbols[j]
            elif sym.shndx == SHN_UNDEF and sym.name:
                return sym.name
        if sym.shndx not in self.places[k] or sym.type in (STT_TLS, STT_GNU_IFUNC):
            raise BadObject(f"symbol {sym.name or j!r} is not in a loaded section")
        return k, sym.shndx, sym.value

    def offset(self, ref: tuple[int, int, int]) -> int:
        """Where a symbol loaded here lies in the image."""
        k, i, value = ref
        return self.where[k][i] + value

    def describe(self, ref: Ref) -> str:
        if isinstance(ref, str):
            return ref
        k, i, value = ref
        return f"{self.objs[k].sections[i].name}+{value:#x} (object {k})"

    def link(self, base: int, resolved: dict[str, int]) -> bytearray:
        """The mapping's contents once it is at `base`, with `resolved` addresses for the process's symbols."""
        image = bytearray(self.size)
        for o, where in zip(self.objs, self.where):
            for i, at in where.items():
                s = o.sections[i]
                if s.type == SHT_PROGBITS:
                    image[at:at + s.size] = o.data[s.offset:s.offset + s.size]
        for name, at in self.stubs.items():
            image[at:at + len(STUB) + 8] = STUB + struct.pack("<Q", resolved[name])
        address = lambda t: resolved[t] if isinstance(t, str) else base + self.offset(t)
        for key, at in self.got.items():
            struct.pack_into("<Q", image, at, address(key))
        mask = (1 << 64) - 1
        for k, target, fixes in self.fixups:
            start = self.where[k][target]
            for off, rtype, ref, addend in fixes:
                at = start + off
                place = base + at
                value = address(ref) + addend
                if rtype == R_64:
                    struct.pack_into("<Q", image, at, value & mask)
                elif rtype in GOT_RELOCS:
                    struct.pack_into("<i", image, at, self._fits32(base + self.got[ref] + addend - place, ref))
                else:  # PC32, PLT32: a call into the process goes through its stub, which may lie farther than 2 GiB
                    if isinstance(ref, str) and rtype == R_PLT32:
                        value = base + self.stubs[ref] + addend
                    struct.pack_into("<i", image, at, self._fits32(value - place, ref))
        return image

    def _fits32(self, value: int, ref: Ref) -> int:
        if not -(1 << 31) <= value < 1 << 31:
            raise BadObject(f"a 32-bit reference to {self.describe(ref)} does not fit")
        return value


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


@lru_cache(maxsize=1)
def _libm() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libm.so.6")
    except OSError:
        return None


def process_symbol(name: str) -> int:
    """The address of a function or variable of this process (libc, libm) that the objects refer to.

    One that is not there is ``BadObject``: MCJIT, which looks in the same places, would abort the process.
    """
    if not name.isascii():
        raise BadObject(f"undefined symbol {name!r}")
    for lib in (_libc(), _libm()):
        if lib is None:
            continue
        try:
            addr = ctypes.cast(lib[name], ctypes.c_void_p).value
        except AttributeError:
            continue
        if addr:
            return addr
    raise BadObject(f"undefined symbol {name!r}")


@lru_cache(maxsize=1)
def host_machine() -> int | None:
    """The ELF machine number of this process's CPU (None where this module does not know it)."""
    return {"x86_64": EM_X86_64, "amd64": EM_X86_64, "aarch64": 183, "arm64": 183}.get(platform.machine().lower())


def parse(objects: list[bytes]) -> list[ElfObject]:
    """The objects of one program, each parsed and checked, for this CPU, and linkable together.

    Whatever passes may be handed to MCJIT: ``BadObject`` otherwise.
    """
    objs = [ElfObject(data) for data in objects]
    machine = host_machine()
    defined: set[str] = set()
    for o in objs:
        if machine is not None and o.machine != machine:
            raise BadObject(f"code for ELF machine {o.machine}; this CPU is machine {machine}")
        for name, sym in o.exported().items():
            if name in defined and sym.bind == STB_GLOBAL:
                raise BadObject(f"symbol {name!r} is defined twice")
            defined.add(name)
    for o in objs:
        for sym in o.symbols:
            if sym.shndx == SHN_UNDEF and sym.bind != STB_LOCAL and sym.name not in defined | LINKER_SYMBOLS:
                process_symbol(sym.name)
    return objs


def _unmap(addr: int, size: int) -> None:
    _libc().munmap(addr, size)


class LoadedCode:
    """Object files linked together and mapped into this process; `address` finds their global symbols.

    The code lives in a mapping that is released when this object is closed
    or collected: keep it alive as long as any function from it may run.
    """

    def __init__(self, objects: list[bytes]) -> None:
        if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
            raise UnsupportedObject("this loader maps memory the 64-bit Linux way")
        objs = parse(objects)
        if any(o.machine != EM_X86_64 for o in objs):
            raise UnsupportedObject("not x86-64 code")
        image = Image(objs)
        resolved = {name: process_symbol(name) for name in sorted(image.externals)}
        exports = {name: image.offset(image.symbol(*where)) for name, where in image.defined.items()}
        base = _libc().mmap(None, image.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if base is None or base == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap failed")
        self._symbols: dict[str, int] = {}
        self._finalizer = weakref.finalize(self, _unmap, base, image.size)
        self._finalizer.atexit = False  # at exit another thread may still be running this code
        try:
            contents = image.link(base, resolved)
            ctypes.memmove(base, (ctypes.c_char * image.size).from_buffer(contents), image.size)
            self._protect(base, 0, image.rodata, PROT_READ | PROT_EXEC)
            self._protect(base, image.rodata, image.data, PROT_READ)
            self._protect(base, image.data, image.size, PROT_READ | PROT_WRITE)
        except BaseException:
            self.close()
            raise
        self._symbols = {name: base + off for name, off in exports.items()}

    @staticmethod
    def _protect(base: int, start: int, end: int, prot: int) -> None:
        if end > start and _libc().mprotect(base + start, end - start, prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")

    def address(self, name: str) -> int:
        """The absolute address of global symbol `name`; 0 if the objects do not define it."""
        return self._symbols.get(name, 0)

    def close(self) -> None:
        """Unmap the code now: no function taken from it may run afterwards."""
        self._symbols = {}
        self._finalizer()
