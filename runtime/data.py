"""Training data: the IDX, CIFAR-10 binary, image-folder and .npz readers.

Images come back float32 (N, C, H, W) in [0, 1] (or (N, F) for flat inputs),
or with ``raw=True`` uint8 as stored (``fit`` prepares them a batch at a
time); labels as int64 class indices (or float32 regression targets).
Fitting images to a network is ``cnnc_runtime.inputs``'.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from cnnc_runtime.inputs import prepare_images
from cnnc_runtime.memory import check_fits

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_READ_CHUNK = 1 << 20

# The standard MNIST-style file names: split -> (images, labels), each also accepted with ".gz".
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# CIFAR-10's binary version: records of 1 label byte and 3 x 32 x 32 pixel bytes (red, green, blue planes, rows).
CIFAR_SHAPE = (3, 32, 32)
CIFAR_RECORD = 1 + math.prod(CIFAR_SHAPE)
CIFAR_CLASSES = 10
CIFAR_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGES_EXTRA = "images"  # pyproject's optional extra that brings Pillow


class MissingDependency(ImportError):
    """An optional dependency a dataset needs is not installed; the message names the extra that brings it."""


def check_fits_in_memory(shape: tuple[int, ...], dtype: np.dtype, what: str) -> int:
    """The bytes an array of `shape` and `dtype` needs; ValueError before allocating if that exceeds the memory."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    check_fits(nbytes, f"{what}: shape {shape} of {np.dtype(dtype)}")
    return nbytes


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not, told apart by content) into a native-endian array.

    Layout: bytes 0-1 zero, byte 2 the type code, byte 3 the number of dimensions,
    then one big-endian int32 per dimension, then the raw big-endian data.
    The data is streamed into its array, so reading costs the array's size and no copies.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        if f.read(2) != _GZIP_MAGIC:
            f.seek(0)
            return _read_idx_stream(f, name, os.fstat(f.fileno()).st_size)
        f.seek(0)
        try:
            with gzip.GzipFile(fileobj=f) as g:
                return _read_idx_stream(g, name)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{name}: corrupt or truncated gzip data ({e})") from e


def _read_into(f: BinaryIO, buf: memoryview) -> int:
    """Fill `buf` from `f` a chunk at a time (a large read would make a temporary bytes object); bytes read."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:got + _READ_CHUNK])
        if not n:
            break
        got += n
    return got


def _read_idx_stream(f: BinaryIO, name: str, size: int | None = None) -> np.ndarray:
    """The array of an IDX stream; `size`: the file's size when known (not gzipped), checked before allocating."""
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
        raise ValueError(f"{name}: not an IDX file (bad magic {head.hex(' ') or 'empty'})")
    dtype, ndim = IDX_DTYPES[head[2]], head[3]
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{name}: truncated IDX header ({4 + len(dims)} bytes, need {4 + 4 * ndim} "
                         f"for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    expected = check_fits_in_memory(shape, dtype, name)
    if size is not None and size - 4 - 4 * ndim < expected:
        raise ValueError(f"{name}: truncated IDX data: shape {shape} needs {expected} bytes, file has "
                         f"{size - 4 - 4 * ndim}")
    out = np.empty(shape, dtype=dtype.newbyteorder("="))
    got = _read_into(f, memoryview(out.reshape(-1).view(np.uint8)))
    if got < expected:
        raise ValueError(f"{name}: truncated IDX data: shape {shape} needs {expected} bytes, file has {got}")
    extra = len(f.read(_READ_CHUNK))
    if extra:
        raise ValueError(f"{name}: wrong IDX sizes: shape {shape} needs {expected} bytes, file has "
                         f"{expected + extra}{'+' if extra == _READ_CHUNK else ''}")
    if dtype.itemsize > 1 and not dtype.isnative:
        out.byteswap(inplace=True)  # the bytes were big-endian
    return out


def decode_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode uncompressed IDX bytes; `name` is used in error messages."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{name}: not an IDX file (bad magic {raw[:4].hex(' ') or 'empty'})")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise ValueError(f"{name}: truncated IDX data: shape {shape} needs {expected} bytes, file has {got}")
    if got > expected:
        raise ValueError(f"{name}: wrong IDX sizes: shape {shape} needs {expected} bytes, file has {got}")
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes (uncompressed) of `array`; the inverse of decode_idx."""
    a = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    code = codes.get(a.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {a.dtype}; supported: uint8, int8, int16, int32, float32, float64")
    if a.ndim > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {a.ndim}")
    header = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    return header + a.astype(IDX_DTYPES[code], copy=False).tobytes()


@dataclass
class Dataset:
    """One split: inputs x and targets y (int64 class labels or float32 targets), both of length N.

    x is float32 (N, C, H, W) or (N, F) in [0, 1], or, from ``load_dataset(path, raw=True)``,
    the images as stored (MNIST: uint8 (N, 28, 28)), which ``Model.fit`` and ``evaluate`` prepare a batch at a time.
    """

    x: np.ndarray
    y: np.ndarray
    name: str | None = None
    classes: tuple[str, ...] | None = None  # class names by label, when the dataset has them (image folders)

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"dataset {self.name or ''}: {len(self.x)} inputs but {len(self.y)} targets".strip())

    def __len__(self) -> int:
        return len(self.x)


def _as_inputs(x: np.ndarray) -> np.ndarray:
    """uint8 -> float32 / 255; (N, H, W) -> (N, 1, H, W); other dtypes -> float32 unscaled (the input rule's
    layout and scale, at the images' own size)."""
    return prepare_images(x, (1, *x.shape[1:]) if x.ndim == 3 else x.shape[1:])


def _as_targets(y: np.ndarray) -> np.ndarray:
    return y.astype(np.int64 if np.issubdtype(y.dtype, np.integer) else np.float32, copy=False)


def _find(directory: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _load_idx_dir(directory: str, raw: bool) -> dict[str, Dataset]:
    found = {split: tuple(_find(directory, stem) for stem in stems) for split, stems in IDX_FILES.items()}
    images, labels = found["train"]
    if images is None or labels is None:
        missing = [s for s, p in zip(IDX_FILES["train"], found["train"]) if p is None]
        raise FileNotFoundError(
            f"{directory}: missing {', '.join(m + '[.gz]' for m in missing)} "
            "(a dataset directory holds train-images-idx3-ubyte and train-labels-idx1-ubyte, optionally "
            "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each optionally gzipped)"
        )
    test_images, test_labels = found["test"]
    if (test_images is None) != (test_labels is None):
        have = os.path.basename(test_images or test_labels or "")
        want = IDX_FILES["test"][1 if test_images else 0]
        raise FileNotFoundError(f"{directory}: found {have} but not {want}[.gz]")
    base = os.path.basename(os.path.normpath(directory))
    out = {}
    for split, (images, labels) in found.items():
        if images is None:
            continue
        x, y = read_idx(images), read_idx(labels)
        _check_pair(x, y, f"{images} and {labels}")
        out[split] = Dataset(x if raw else _as_inputs(x), _as_targets(y), f"{base}/{split}")
    return out


def _load_cifar_dir(directory: str, raw: bool) -> dict[str, Dataset]:
    """CIFAR-10's binary batches: the five training files (all of them) and, when present, the test file."""
    base = os.path.basename(os.path.normpath(directory))
    train = [os.path.join(directory, f) for f in CIFAR_FILES["train"]]
    missing = [os.path.basename(p) for p in train if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} (a CIFAR-10 directory holds "
                                f"{', '.join(CIFAR_FILES['train'])} and optionally {CIFAR_FILES['test'][0]})")
    out = {}
    for split, files in CIFAR_FILES.items():
        paths = [os.path.join(directory, f) for f in files]
        if not all(os.path.isfile(p) for p in paths):
            continue
        x, y = read_cifar(paths)
        out[split] = Dataset(x if raw else _as_inputs(x), _as_targets(y), f"{base}/{split}")
    return out


def read_cifar(paths: Sequence[str | os.PathLike[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 3, 32, 32), uint8 labels (N,)) of CIFAR-10 binary files, read in order.

    Every file must be whole records of 3,073 bytes with labels 0..9. Sizes are
    checked, and the memory they need, before anything is allocated; the records
    are read a block at a time straight into the two arrays (no copy of the file).
    """
    names = [os.fspath(p) for p in paths]
    counts = []
    for name in names:
        size = os.path.getsize(name)
        if size == 0 or size % CIFAR_RECORD:
            raise ValueError(f"{name}: not a CIFAR-10 binary file: {size} bytes is not a whole number of "
                             f"{CIFAR_RECORD}-byte records (1 label byte + 3,072 pixel bytes)")
        counts.append(size // CIFAR_RECORD)
    n = sum(counts)
    check_fits_in_memory((n, CIFAR_RECORD), np.uint8, ", ".join(names))
    x = np.empty((n, *CIFAR_SHAPE), dtype=np.uint8)
    y = np.empty(n, dtype=np.uint8)
    block = max(1, _READ_CHUNK // CIFAR_RECORD)
    buf = np.empty((block, CIFAR_RECORD), dtype=np.uint8)
    start = 0
    for name, count in zip(names, counts):
        with open(name, "rb") as f:
            for first in range(0, count, block):
                m = min(block, count - first)
                got = _read_into(f, memoryview(buf[:m].reshape(-1)))
                if got < m * CIFAR_RECORD:  # the file shrank while being read
                    raise ValueError(f"{name}: truncated CIFAR-10 data at record {first + got // CIFAR_RECORD}")
                labels = buf[:m, 0]
                if labels.max() >= CIFAR_CLASSES:
                    bad = int(np.argmax(labels >= CIFAR_CLASSES))
                    raise ValueError(f"{name}: record {first + bad} has label {int(labels[bad])}; CIFAR-10 labels "
                                     f"are 0..{CIFAR_CLASSES - 1} (is this a CIFAR-100 file, with 2 label bytes?)")
                y[start + first:start + first + m] = labels
                x[start + first:start + first + m] = buf[:m, 1:].reshape(m, *CIFAR_SHAPE)
        start += count
    return x, y


def _class_folders(directory: str) -> list[str]:
    """The sub-folders of `directory` (sorted: their order gives the labels, as torchvision's ImageFolder)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _load_image_dir(directory: str, raw: bool) -> dict[str, Dataset]:
    """A folder of images per class: ``CLASS/*.png`` (one split), or ``train/CLASS/*`` with optional ``test/``."""
    base = os.path.basename(os.path.normpath(directory))
    folders = _class_folders(directory)
    splits = {"train": directory}
    if "train" in folders:
        splits = {s: os.path.join(directory, s) for s in ("train", "test") if s in folders}
    classes = _class_folders(splits["train"])
    if not classes:
        raise FileNotFoundError(f"{splits['train']}: no class folders (an image dataset is a folder per class, "
                                "each holding PNG or JPEG files)")
    out = {}
    for split, root in splits.items():
        other = _class_folders(root)
        if other != classes:
            raise ValueError(f"{root}: class folders {other} differ from the training set's {classes}")
        x, y = read_image_folder(root, classes)
        out[split] = Dataset(x if raw else _as_inputs(x), _as_targets(y), f"{base}/{split}", tuple(classes))
    return out


def _pillow():
    """Pillow's Image module; MissingDependency naming the extra when it is not installed."""
    try:
        from PIL import Image, UnidentifiedImageError  # optional: only image folders need it
    except ImportError:
        raise MissingDependency(f"reading PNG or JPEG images needs Pillow: pip install 'cnnc[{IMAGES_EXTRA}]'"
                                ) from None
    return Image, UnidentifiedImageError


def read_image_folder(root: str | os.PathLike[str], classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, C, H, W), int64 labels) of ``root/CLASS/*.png|jpg|jpeg``, label = position in `classes`.

    All images must share one size; they keep one channel when every one is
    grayscale, else all become RGB (3 channels). A file Pillow cannot read is a
    ValueError naming it. Files are read in sorted order, class by class.
    """
    image_mod, unreadable = _pillow()
    root = os.fspath(root)
    files = []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        files += [(os.path.join(folder, f), label) for f in names]
    if not files:
        raise ValueError(f"{root}: no .png, .jpg or .jpeg files in the class folders {list(classes)}")
    modes, size = set(), None
    for path, _ in files:  # headers only: sizes and modes are checked before the pixels are read
        with _open_image(image_mod, unreadable, path) as im:
            if size is None:
                size, first = im.size, path
            elif im.size != size:
                raise ValueError(f"{path}: {im.size[0]}x{im.size[1]} pixels, but {first} has {size[0]}x{size[1]}; "
                                 "all images of a dataset must have one size")
            modes.add(im.mode)
    gray = modes <= {"L", "1"}
    channels = 1 if gray else 3
    check_fits_in_memory((len(files), channels, size[1], size[0]), np.uint8, root)
    x = np.empty((len(files), channels, size[1], size[0]), dtype=np.uint8)
    y = np.empty(len(files), dtype=np.int64)
    for i, (path, label) in enumerate(files):
        with _open_image(image_mod, unreadable, path) as im:
            try:
                pixels = np.asarray(im.convert("L" if gray else "RGB"))
            except (OSError, ValueError, SyntaxError) as e:  # a header that reads but data that does not
                raise ValueError(f"{path}: cannot read the image ({e})") from None
        x[i] = pixels[None] if gray else pixels.transpose(2, 0, 1)
        y[i] = label
    return x, y


def _open_image(image_mod, unreadable, path: str):
    try:
        return image_mod.open(path)
    except (unreadable, image_mod.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable PNG or JPEG image ({e})") from None


def _check_pair(x: np.ndarray, y: np.ndarray, where: str) -> None:
    """ValueError unless x holds N inputs and y N targets, both numbers."""
    if x.ndim not in (2, 3, 4) or y.ndim < 1:
        raise ValueError(f"{where}: {x.shape} and {y.shape} are not N inputs (N, F), (N, H, W) or (N, C, H, W) "
                         "with N targets")
    if len(x) != len(y):
        raise ValueError(f"{where}: {len(x)} inputs but {len(y)} targets")
    for a in (x, y):
        if a.dtype.kind not in "uif":
            raise ValueError(f"{where}: dtype {a.dtype}; datasets hold integer or real numbers")


def _load_npz(path: str, raw: bool) -> dict[str, Dataset]:
    try:  # the file is opened here: np.load leaks its own when the archive is damaged
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            return _npz_splits(z, path, raw)
    except (OSError, EOFError, KeyError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None


def _npz_splits(z, path: str, raw: bool) -> dict[str, Dataset]:
    keys = set(z.files)
    train = ("x", "y") if {"x", "y"} <= keys else ("x_train", "y_train")  # the second: Keras' naming
    if not set(train) <= keys:
        raise ValueError(
            f"{path}: a dataset .npz needs arrays 'x' and 'y' (or 'x_train' and 'y_train'), and optionally "
            f"'x_test', 'y_test'; it has {sorted(keys)}"
        )
    if ("x_test" in keys) != ("y_test" in keys):
        raise ValueError(f"{path}: 'x_test' and 'y_test' must come together; it has {sorted(keys)}")
    base = os.path.splitext(os.path.basename(path))[0]
    splits = {"train": train, "test": ("x_test", "y_test")}
    out = {}
    for split, (kx, ky) in splits.items():
        if kx not in keys:
            continue
        x, y = _npz_member(z, kx, path), _npz_member(z, ky, path)
        _check_pair(x, y, f"{path}: '{kx}' and '{ky}'")
        out[split] = Dataset(x if raw else _as_inputs(x), _as_targets(y), f"{base}/{split}")
    return out


def _npz_member(z, key: str, path: str) -> np.ndarray:
    """The array `key` of an open .npz, its header read first: a shape the member cannot hold, or that does not
    fit in memory, is refused before anything is allocated."""
    name = key + ".npy" if key + ".npy" in z.zip.namelist() else key
    info = z.zip.getinfo(name)
    with z.zip.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: '{key}' is in .npy format {version}; datasets use 1.0 or 2.0")
        header = f.tell()
    where = f"{path}: '{key}'"
    nbytes = check_fits_in_memory(shape, dtype, where)
    if nbytes > info.file_size - header:
        raise ValueError(f"{where} claims shape {shape} of {dtype} ({nbytes} bytes) but holds "
                         f"{info.file_size - header} bytes")
    return z[key]


def load_dataset(path: str | os.PathLike[str], *, raw: bool = False) -> dict[str, Dataset]:
    """Splits "train" and, when present, "test" from a directory or a .npz archive.

    A directory holds IDX files (MNIST), CIFAR-10's binary batches
    (``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``) or a
    folder of images per class (``CLASS/*.png``, or ``train/CLASS/*`` and
    ``test/CLASS/*``; PNG or JPEG, read with Pillow: the ``images`` extra).

    Inputs come back float32 (uint8 scaled to [0, 1], (N, H, W) given a channel axis);
    call prepare_images to fit them to a network's input shape. With ``raw=True``
    they come back as stored (as ``keras.datasets`` and torchvision keep them):
    MNIST stays uint8 (N, 28, 28), 47 MiB instead of 235 MiB as float32 32x32, and
    ``Model.fit`` / ``evaluate`` scale, pad and normalize each mini-batch.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        if any(os.path.isfile(os.path.join(name, f)) for files in CIFAR_FILES.values() for f in files):
            return _load_cifar_dir(name, raw)
        if not any(_find(name, stem) for stems in IDX_FILES.values() for stem in stems) and _class_folders(name):
            return _load_image_dir(name, raw)
        return _load_idx_dir(name, raw)
    if not os.path.exists(name):
        raise FileNotFoundError(f"no dataset at {name}: expected a directory of IDX files or a .npz file")
    with open(name, "rb") as f:
        magic = f.read(4)
    if magic != _ZIP_MAGIC:
        raise ValueError(f"{name} is not a .npz archive; a dataset is a directory of IDX files or a .npz file")
    return _load_npz(name, raw)
