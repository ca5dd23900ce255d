"""Signing artifacts with a secret key, so that whoever holds the key can tell an artifact came from them.

An artifact is native code: loading one runs it with the rights of the
process, like a shared library. Its checksums catch damage, not tampering
(anyone can recompute them), so ``cnnc compile --sign KEYFILE`` adds an
HMAC-SHA256 of the whole file made with a key, and ``cnnc.load(path,
key=...)`` / ``cnnc run --key KEYFILE`` refuse an artifact whose HMAC is
missing or differs before any of its code is mapped.
"""

from __future__ import annotations

import hashlib
import hmac
import os

TAG_BYTES = 32  # HMAC-SHA256
MIN_KEY_BYTES = 16

Key = bytes | str | os.PathLike


def read_key(key: Key) -> bytes:
    """The key's bytes: `key` itself when it is bytes, else the contents of the file it names.

    A key shorter than 16 bytes is refused (``ValueError``): make one with
    ``head -c 32 /dev/urandom > KEYFILE``.
    """
    if isinstance(key, (bytes, bytearray, memoryview)):
        data, what = bytes(key), "the key"
    elif isinstance(key, (str, os.PathLike)):
        path = os.fspath(key)
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the key file ({e.strerror or e})") from None
        what = f"key file {path}"
    else:
        raise ValueError(f"key must be bytes or the path of a key file, got {type(key).__name__}")
    if len(data) < MIN_KEY_BYTES:
        raise ValueError(f"{what} holds {len(data)} bytes; a key needs at least {MIN_KEY_BYTES} "
                         f"(make one with: head -c 32 /dev/urandom > KEYFILE)")
    return data


def tag(key: bytes, data: bytes) -> bytes:
    """The HMAC-SHA256 of `data` under `key`."""
    return hmac.new(key, data, hashlib.sha256).digest()


def verify(key: bytes, data: bytes, signature: bytes | None, source: str) -> None:
    """Raise ``ValueError`` unless `signature` is `data`'s HMAC under `key` (compared in constant time)."""
    if signature is None:
        raise ValueError(f"{source}: the artifact is not signed, and a key was given to check it: refusing to load "
                         f"it (sign it with `cnnc compile --sign KEYFILE`)")
    if not hmac.compare_digest(signature, tag(key, data)):
        raise ValueError(f"{source}: the artifact's signature does not match the key: it was changed after it was "
                         f"signed, or signed with another key; refusing to load it")
