"""Fuzzing the data loaders: whatever the files hold, ``load_dataset`` returns datasets or raises ValueError.

Random bytes; valid IDX files (plain and gzipped) and .npz archives with bytes
flipped, cut off or inserted, and IDX headers with random dimensions; .npz
archives of random member names, dtypes and shapes. Anything else (a
BadZipFile, a KeyError, a MemoryError, a numpy warning) is a traceback the
user of ``cnnc train --data`` would see.
"""

from __future__ import annotations

import gzip
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnc_runtime.data import Dataset, encode_idx, load_dataset

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def loads_or_refuses(path: Path, raw: bool) -> None:
    """Load `path`: datasets of N inputs and N targets come back, or one ValueError; no warning escapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            splits = load_dataset(path, raw=raw)
        except ValueError as e:
            assert str(e)
            return
    for d in splits.values():
        assert isinstance(d, Dataset) and len(d.x) == len(d.y)
        assert d.x.dtype.kind in "uif" and d.y.dtype.kind in "if"


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flips bits of a byte, 1 cuts the rest off, 2 inserts a byte."""
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            break
        pos %= len(out)
        if kind == 0:
            out[pos] ^= value or 1
        elif kind == 1:
            del out[pos:]
        else:
            out.insert(pos, value)
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4)


def _mnist_like(n: int = 5) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(n)
    return encode_idx(rng.integers(0, 256, (n, 4, 4), dtype=np.uint8)), encode_idx(np.arange(n, dtype=np.uint8))


def _idx_dir(root: str, images: bytes, labels: bytes, gz: bool) -> Path:
    d = Path(root) / "idx"
    d.mkdir()
    suffix = ".gz" if gz else ""
    (d / f"train-images-idx3-ubyte{suffix}").write_bytes(gzip.compress(images) if gz else images)
    (d / "train-labels-idx1-ubyte").write_bytes(labels)
    return d


@FUZZ
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes(data, zip_magic):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "d.npz"
        path.write_bytes((b"PK\x03\x04" if zip_magic else b"") + data)
        loads_or_refuses(path, raw=False)


@FUZZ
@given(EDITS, st.booleans(), st.booleans(), st.booleans())
def test_mutated_idx_files(edits, gz, mutate_images, raw):
    images, labels = _mnist_like()
    if mutate_images:
        images = mutate(images, edits)
    else:
        labels = mutate(labels, edits)
    with tempfile.TemporaryDirectory() as root:
        loads_or_refuses(_idx_dir(root, images, labels, gz), raw)


@FUZZ
@given(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]), st.lists(st.integers(0, 2**32 - 1), max_size=5),
       st.binary(max_size=200), st.booleans())
def test_idx_headers_with_random_dimensions(code, dims, body, gz):
    header = bytes([0, 0, code, len(dims)]) + np.asarray(dims, dtype=">u4").tobytes()
    _, labels = _mnist_like()
    with tempfile.TemporaryDirectory() as root:
        loads_or_refuses(_idx_dir(root, header + body, labels, gz), raw=True)


NAMES = st.sampled_from(["x", "y", "x_train", "y_train", "x_test", "y_test", "images", "x.npy", "", "ü"])
DTYPES = st.sampled_from(["u1", "i1", "<i8", ">i4", "<f2", "<f4", ">f8", "c8", "?", "U2", "M8[s]", "V4",
                          [("a", "<f4"), ("b", "u1")]])
SHAPES = st.lists(st.integers(0, 4), max_size=5).map(tuple)


@st.composite
def npz_archives(draw) -> bytes:
    """An .npz of random members; the x/y pairs a dataset needs appear often enough to be loaded."""
    members = draw(st.dictionaries(NAMES, st.tuples(DTYPES, SHAPES), max_size=5))
    if draw(st.booleans()):
        n = draw(st.integers(0, 4))
        members["x"] = (draw(DTYPES), (n, *draw(SHAPES)[:3]))
        members["y"] = (draw(DTYPES), (n,))
    buf = io.BytesIO()
    arrays = {name: np.zeros(shape, dtype=np.dtype(dtype)) for name, (dtype, shape) in members.items()}
    np.savez_compressed(buf, **arrays) if draw(st.booleans()) else np.savez(buf, **arrays)
    return buf.getvalue()


@FUZZ
@given(npz_archives(), st.booleans())
def test_npz_archives_of_random_members(archive, raw):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "d.npz"
        path.write_bytes(archive)
        loads_or_refuses(path, raw)


@FUZZ
@given(EDITS, st.booleans(), st.booleans())
def test_mutated_npz_datasets(edits, compressed, raw):
    buf = io.BytesIO()
    x, y = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4), np.array([0, 1, 2])
    (np.savez_compressed if compressed else np.savez)(buf, x=x, y=y, x_test=x[:1], y_test=y[:1])
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "d.npz"
        path.write_bytes(mutate(buf.getvalue(), edits))
        loads_or_refuses(path, raw)
