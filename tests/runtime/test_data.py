"""IDX and .npz reading: the datasets `cnnc train --data` and ``load_dataset`` take."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from cnnc_runtime import data as data_mod
from cnnc_runtime import memory
from cnnc_runtime.data import Dataset, decode_idx, encode_idx, load_dataset, prepare_images, read_idx

MNIST = Path(__file__).resolve().parents[2] / "examples" / "data" / "mnist"

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _sample(dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=(3, 4, 5), endpoint=True).astype(dtype)
        a.flat[:2] = info.min, info.max
        return a
    return (rng.standard_normal((3, 4, 5)) * 1e3).astype(dtype)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_idx_round_trip(tmp_path, dtype, gz):
    a = _sample(dtype)
    raw = encode_idx(a)
    # Compression is told by content: the name says nothing either way.
    path = tmp_path / "data.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative and b.shape == a.shape
    np.testing.assert_array_equal(b, a)
    b[0] = 0  # writable, not a view of the file bytes


def test_idx_layout_by_hand(tmp_path):
    # int16, 2 dimensions (2, 3), big-endian values 1, -2, 3, 256, 0, -32768
    raw = bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes.fromhex("0001 fffe 0003 0100 0000 8000")
    np.testing.assert_array_equal(decode_idx(raw), [[1, -2, 3], [256, 0, -32768]])
    assert encode_idx(np.array([[1, -2, 3], [256, 0, -32768]], np.int16)) == raw
    labels = bytes([0, 0, 8, 1, 0, 0, 0, 4, 5, 0, 4, 1])
    (tmp_path / "labels.gz").write_bytes(gzip.compress(labels))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.gz"), [5, 0, 4, 1])


def test_idx_errors_name_the_file(tmp_path):
    raw = encode_idx(np.arange(100, dtype=np.int32).reshape(10, 10))
    cases = {
        "truncated.idx": (raw[:-7], "truncated IDX data"),
        "header.idx": (raw[:9], "truncated IDX header"),
        "extra.idx": (raw + b"\0", "wrong IDX sizes"),
        "magic.idx": (b"\x01\x00" + raw[2:], "bad magic"),
        "dtype.idx": (b"\x00\x00\x07" + raw[3:], "bad magic"),
        "empty.idx": (b"", "bad magic"),
        "truncated.gz": (gzip.compress(raw)[:-20], "gzip"),
        "short.gz": (gzip.compress(raw[:-4]), "truncated IDX data"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message) as e:
            read_idx(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")
    with pytest.raises(ValueError, match="cannot store"):
        encode_idx(np.zeros(3, np.int64))


@pytest.fixture(scope="module")
def mnist() -> dict[str, Dataset]:
    return load_dataset(MNIST)


def test_real_mnist(mnist):
    train, test = mnist["train"], mnist["test"]
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(train.y, minlength=10).tolist() == counts
    assert len(test) == 10000 and set(np.unique(test.y)) == set(range(10))
    assert train.name == "mnist/train"


def test_real_mnist_raw_idx():
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_real_mnist_into_lenet_input(mnist):
    x = prepare_images(mnist["test"].x[:100], (1, 32, 32))
    assert x.shape == (100, 1, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, :, 2:30, 2:30], mnist["test"].x[:100])
    assert not x[:, :, :2].any() and not x[:, :, 30:].any() and not x[:, :, :, :2].any() and not x[:, :, :, 30:].any()


def _write_idx_dir(directory: Path, n_train=6, n_test=4, gz=True, test=True) -> None:
    rng = np.random.default_rng(1)
    directory.mkdir(exist_ok=True)
    splits = [("train", n_train)] + ([("t10k", n_test)] if test else [])
    for prefix, n in splits:
        images = encode_idx(rng.integers(0, 256, (n, 5, 5), dtype=np.uint8))
        labels = encode_idx(rng.integers(0, 10, n, dtype=np.uint8))
        suffix = ".gz" if gz else ""
        (directory / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(gzip.compress(images) if gz else images)
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)


def test_load_idx_directory(tmp_path):
    _write_idx_dir(tmp_path / "d")
    d = load_dataset(tmp_path / "d")
    assert set(d) == {"train", "test"}
    assert d["train"].x.shape == (6, 1, 5, 5) and d["test"].y.shape == (4,)
    assert d["train"].y.dtype == np.int64 and 0 <= d["train"].x.min() <= d["train"].x.max() <= 1

    _write_idx_dir(tmp_path / "no_test", gz=False, test=False)
    assert set(load_dataset(tmp_path / "no_test")) == {"train"}


def test_load_idx_directory_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset(tmp_path / "empty")
    _write_idx_dir(tmp_path / "half")
    (tmp_path / "half" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset(tmp_path / "half")
    _write_idx_dir(tmp_path / "mismatch", n_train=6)
    (tmp_path / "mismatch" / "train-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(5, np.uint8)))
    with pytest.raises(ValueError, match="6 inputs but 5 targets"):
        load_dataset(tmp_path / "mismatch")
    with pytest.raises(FileNotFoundError, match="no dataset"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a .npz"):
        load_dataset(tmp_path / "notes.txt")


def test_load_npz(tmp_path):
    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([3, 1], np.uint8), x_test=x[:1], y_test=np.array([2]))
    d = load_dataset(tmp_path / "a.npz")
    assert set(d) == {"train", "test"} and d["train"].name == "a/train"
    assert d["train"].x.shape == (2, 1, 4, 4) and d["train"].x.dtype == np.float32
    np.testing.assert_array_equal(d["train"].x[:, 0], x / np.float32(255))
    assert d["train"].y.dtype == np.int64 and d["test"].y.tolist() == [2]

    feats = np.random.default_rng(0).standard_normal((5, 3))
    np.savez(tmp_path / "b.npz", x=feats, y=np.linspace(0, 1, 5))
    d = load_dataset(tmp_path / "b.npz")
    assert set(d) == {"train"} and d["train"].y.dtype == np.float32
    np.testing.assert_allclose(d["train"].x, feats.astype(np.float32))


def test_load_npz_errors(tmp_path):
    np.savez(tmp_path / "noy.npz", x=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="'y'"):
        load_dataset(tmp_path / "noy.npz")
    np.savez(tmp_path / "len.npz", x=np.zeros((2, 3)), y=np.zeros(3))
    with pytest.raises(ValueError, match="len.npz"):
        load_dataset(tmp_path / "len.npz")
    np.savez(tmp_path / "half.npz", x=np.zeros((2, 3)), y=np.zeros(2), x_test=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="x_test"):
        load_dataset(tmp_path / "half.npz")
    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        Dataset(np.zeros((3, 2), np.float32), np.zeros(2, np.int64))


def test_npz_with_keras_names(tmp_path):
    path = tmp_path / "k.npz"
    np.savez(path, x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.arange(4), x_test=np.zeros((2, 3, 3), np.uint8),
             y_test=np.arange(2))
    splits = load_dataset(path)
    assert splits["train"].x.shape == (4, 1, 3, 3) and len(splits["test"]) == 2


def test_load_dataset_raw_keeps_images_as_stored(tmp_path):
    _write_idx_dir(tmp_path / "d")
    raw, scaled = load_dataset(tmp_path / "d", raw=True), load_dataset(tmp_path / "d")
    for split in ("train", "test"):
        assert raw[split].x.dtype == np.uint8 and raw[split].x.shape == scaled[split].x.shape[:1] + (5, 5)
        np.testing.assert_array_equal(prepare_images(raw[split].x, (1, 5, 5)), scaled[split].x)
        np.testing.assert_array_equal(raw[split].y, scaled[split].y)
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([1, 0]))
    np.testing.assert_array_equal(load_dataset(tmp_path / "a.npz", raw=True)["train"].x, x)


def test_read_idx_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_READ_CHUNK", 7)  # many partial reads, and a chunk boundary mid-value
    for dtype in (np.uint8, np.int32, np.float64):
        a = _sample(dtype)
        for gz in (False, True):
            raw = encode_idx(a)
            (tmp_path / "a.idx").write_bytes(gzip.compress(raw) if gz else raw)
            np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)
            (tmp_path / "b.idx").write_bytes(raw + bytes(30))
            with pytest.raises(ValueError, match="wrong IDX sizes"):
                read_idx(tmp_path / "b.idx")


# ---- sizes that cannot be: refused from the header, before anything is allocated --------------------


def _idx_header(code: int, shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes()


HUGE = (60000, 100000, 100)  # 600 GB of uint8


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_an_idx_header_claiming_more_than_memory_is_refused(tmp_path, gz, monkeypatch):
    monkeypatch.setattr(memory, "physical_memory", lambda: 8 << 30)
    raw = _idx_header(0x08, HUGE) + bytes(100)
    path = tmp_path / "huge.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=r"huge.idx: shape \(60000, 100000, 100\) of uint8 needs 558.8 GiB, more "
                                         r"than this machine's"):
        read_idx(path)
    with pytest.raises(ValueError, match="truncated IDX data: shape \\(60000, 100000, 100\\)"):
        decode_idx(raw)


def test_a_plain_idx_file_shorter_than_its_header_says_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "short.idx"
    path.write_bytes(_idx_header(0x0D, (1000, 1000)) + bytes(64))
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(ValueError, match="needs 4000000 bytes, file has 64"):
        read_idx(path)


def _npz_with_member_header(path: Path, shape: tuple[int, ...], payload: int = 64) -> None:
    """An .npz whose 'x' claims `shape` of float32 but holds `payload` bytes, and a valid 'y'."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    y = io.BytesIO()
    np.save(y, np.zeros(shape[0] if shape else 1, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue() + bytes(payload))
        z.writestr("y.npy", y.getvalue())


def test_an_npz_member_claiming_more_than_memory_is_refused(tmp_path, monkeypatch):
    _npz_with_member_header(tmp_path / "huge.npz", (100000, 1000000))  # 10^11 floats
    monkeypatch.setattr(memory, "physical_memory", lambda: 8 << 30)
    with pytest.raises(ValueError, match=r"huge.npz: 'x': shape \(100000, 1000000\) of float32 needs 372.5 GiB, "
                                         r"more than this machine's 8.0 GiB of memory"):
        load_dataset(tmp_path / "huge.npz")


def test_an_npz_member_claiming_more_than_it_holds_is_refused(tmp_path):
    _npz_with_member_header(tmp_path / "short.npz", (1000, 1000))
    with pytest.raises(ValueError, match=r"'x' claims shape \(1000, 1000\) of float32 \(4000000 bytes\) but holds 64"):
        load_dataset(tmp_path / "short.npz")


def test_a_damaged_npz_is_a_value_error(tmp_path):
    np.savez_compressed(tmp_path / "a.npz", x=np.zeros((4, 3, 3)), y=np.zeros(4))
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    raw[60] ^= 0xFF  # inside x.npy's compressed data
    (tmp_path / "a.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="a.npz"):
        load_dataset(tmp_path / "a.npz")


@pytest.mark.parametrize("dtype", ["U3", "c8", "M8[s]", "?"])
def test_npz_arrays_that_are_not_numbers_are_refused(tmp_path, dtype):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 3)), y=np.zeros(2, dtype=dtype))
    with pytest.raises(ValueError, match=re.escape(f"'x' and 'y': dtype {np.dtype(dtype)}")):
        load_dataset(tmp_path / "a.npz")
