"""The artifact file: native code plus a JSON manifest (and optionally weights), in one file.

Layout: ``CNNCART1`` magic, then four length-prefixed sections (little-endian
u64 length, then the bytes): the manifest (UTF-8 JSON), the object code, the
weights (an .npz, possibly empty), and the SHA-256 of each of the three. The
code is only handed to LLVM, and the manifest's sizes only trusted, after the
checksums match: a damaged file is a ``ValueError``, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

MAGIC = b"CNNCART1"
FORMAT_VERSION = 1


def _digest(*sections: bytes) -> bytes:
    return b"".join(hashlib.sha256(s).digest() for s in sections)


def pack(manifest: dict[str, Any], obj: bytes, weights: bytes = b"") -> bytes:
    parts = [MAGIC]
    text = json.dumps(manifest, sort_keys=True).encode()
    for section in (text, obj, weights, _digest(text, obj, weights)):
        parts += [struct.pack("<Q", len(section)), section]
    return b"".join(parts)


def unpack(data: bytes, source: str = "artifact") -> tuple[dict[str, Any], bytes, bytes]:
    """(manifest, object code, weights); a file that is not an artifact raises ``ValueError``."""
    if not data.startswith(MAGIC):
        raise ValueError(f"{source}: not a cnnc artifact (bad magic bytes)")
    at, sections = len(MAGIC), []
    for _ in range(4):
        if at + 8 > len(data):
            raise ValueError(f"{source}: truncated cnnc artifact")
        (n,) = struct.unpack_from("<Q", data, at)
        at += 8
        if at + n > len(data):
            raise ValueError(f"{source}: truncated cnnc artifact")
        sections.append(data[at:at + n])
        at += n
    if sections[3] != _digest(*sections[:3]):
        raise ValueError(f"{source}: corrupt cnnc artifact (a checksum of its manifest, code or weights differs)")
    try:
        manifest = json.loads(sections[0].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{source}: corrupt manifest ({e})") from None
    return manifest, sections[1], sections[2]


def write(path: str | Path, manifest: dict[str, Any], obj: bytes, weights: bytes = b"") -> None:
    from cnnc_runtime.fileio import atomic_write_bytes  # not needed to read: a cached compile skips it

    atomic_write_bytes(path, pack(manifest, obj, weights))


def read(path: str | Path) -> tuple[dict[str, Any], bytes, bytes]:
    return unpack(Path(path).read_bytes(), str(path))
