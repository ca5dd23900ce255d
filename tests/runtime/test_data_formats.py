"""CIFAR-10 binary batches and folders of images per class: read from small files the tests write, kept uint8,
malformed files refused with a ValueError naming them (per-channel normalization: test_inputs.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cnnc_runtime.data import (
    CIFAR_FILES,
    CIFAR_RECORD,
    MissingDependency,
    load_dataset,
    read_cifar,
)


def cifar_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, n, dtype=np.uint8)
    raw = np.concatenate([y[:, None], x.reshape(n, -1)], axis=1).tobytes()
    return x, y, raw


@pytest.fixture
def cifar_dir(tmp_path):
    xs, ys = [], []
    for i, name in enumerate(CIFAR_FILES["train"]):
        x, y, raw = cifar_records(3 + i, seed=i)
        (tmp_path / name).write_bytes(raw)
        xs.append(x)
        ys.append(y)
    x, y, raw = cifar_records(4, seed=99)
    (tmp_path / CIFAR_FILES["test"][0]).write_bytes(raw)
    return tmp_path, np.concatenate(xs), np.concatenate(ys), x, y


def test_cifar_batches_load_as_stored(cifar_dir):
    path, x, y, tx, ty = cifar_dir
    splits = load_dataset(path, raw=True)
    assert splits["train"].x.dtype == np.uint8 and splits["train"].x.shape == (25, 3, 32, 32)
    np.testing.assert_array_equal(splits["train"].x, x)  # red plane, green plane, blue plane, row by row
    np.testing.assert_array_equal(splits["train"].y, y)
    np.testing.assert_array_equal(splits["test"].x, tx)
    np.testing.assert_array_equal(splits["test"].y, ty)
    prepared = load_dataset(path)["train"].x
    np.testing.assert_array_equal(prepared, x.astype(np.float32) / 255)


def test_cifar_test_batch_is_optional(cifar_dir):
    path = cifar_dir[0]
    (path / "test_batch.bin").unlink()
    assert set(load_dataset(path, raw=True)) == {"train"}


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:-1], "not a whole number of 3073-byte records"),
    (lambda raw: b"", "not a whole number"),
    (lambda raw: bytes([10]) + raw[1:], "record 0 has label 10"),
    (lambda raw: raw[:CIFAR_RECORD] + bytes([255]) + raw[CIFAR_RECORD + 1:], "record 1 has label 255"),
])
def test_malformed_cifar_files_are_a_value_error_naming_the_file(cifar_dir, damage, message):
    path = cifar_dir[0]
    f = path / "data_batch_2.bin"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(path, raw=True)
    assert "data_batch_2.bin" in str(info.value)


def test_a_missing_cifar_training_batch_is_named(cifar_dir):
    path = cifar_dir[0]
    (path / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_4.bin"):
        load_dataset(path)


def test_read_cifar_refuses_a_size_beyond_memory(tmp_path, monkeypatch):
    f = tmp_path / "data_batch_1.bin"
    f.write_bytes(cifar_records(2, 0)[2])
    monkeypatch.setattr("os.path.getsize", lambda p: CIFAR_RECORD * 10**12)
    with pytest.raises(ValueError, match="memory"):
        read_cifar([f])


# ---- folders of images --------------------------------------------------------------------------


def write_images(root, classes: dict[str, list[np.ndarray]], fmt: str = "PNG") -> None:
    image = pytest.importorskip("PIL.Image")
    for cls, images in classes.items():
        (root / cls).mkdir(parents=True)
        for i, a in enumerate(images):
            mode = "L" if a.ndim == 2 else "RGB"
            image.fromarray(a, mode).save(root / cls / f"{i}.{fmt.lower()}", fmt)


def rgb(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_a_folder_per_class_loads_in_sorted_class_order(tmp_path):
    cats, dogs = [rgb(1), rgb(2)], [rgb(3)]
    write_images(tmp_path, {"dog": dogs, "cat": cats})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")  # ignored: not .png/.jpg/.jpeg
    d = load_dataset(tmp_path, raw=True)["train"]
    assert d.classes == ("cat", "dog")
    assert d.x.dtype == np.uint8 and d.x.shape == (3, 3, 6, 5)
    np.testing.assert_array_equal(d.x, np.stack([a.transpose(2, 0, 1) for a in cats + dogs]))
    np.testing.assert_array_equal(d.y, [0, 0, 1])


def test_train_and_test_folders_and_grayscale(tmp_path):
    gray = [np.full((4, 4), v, np.uint8) for v in (0, 100, 200)]
    write_images(tmp_path / "train", {"a": gray[:2], "b": gray[2:]})
    write_images(tmp_path / "test", {"a": gray[1:2], "b": gray[:1]})
    splits = load_dataset(tmp_path, raw=True)
    assert splits["train"].x.shape == (3, 1, 4, 4)  # every image grayscale: one channel
    np.testing.assert_array_equal(splits["test"].x[:, 0, 0, 0], [100, 0])
    np.testing.assert_array_equal(splits["test"].y, [0, 1])


def test_jpeg_images_load(tmp_path):
    a = np.full((8, 8, 3), 128, np.uint8)
    write_images(tmp_path, {"x": [a], "y": [a]}, fmt="JPEG")
    d = load_dataset(tmp_path, raw=True)["train"]
    assert d.x.shape == (2, 3, 8, 8) and np.abs(d.x.astype(int) - 128).max() <= 2  # JPEG is lossy, a flat image barely


def test_mixed_grayscale_and_color_become_rgb(tmp_path):
    write_images(tmp_path, {"a": [np.full((4, 4), 7, np.uint8)], "b": [rgb(0, 4, 4)]})
    d = load_dataset(tmp_path, raw=True)["train"]
    assert d.x.shape == (2, 3, 4, 4) and (d.x[0] == 7).all()


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "not a readable PNG or JPEG"),
    (lambda p: p.write_bytes(p.read_bytes()[:60]), "cannot read the image|not a readable"),
    (lambda p: p.write_bytes(b""), "not a readable"),
])
def test_broken_image_files_are_a_value_error_naming_them(tmp_path, damage, message):
    write_images(tmp_path, {"a": [rgb(0, 32, 32)], "b": [rgb(1, 32, 32)]})
    broken = tmp_path / "b" / "0.png"
    damage(broken)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(tmp_path, raw=True)
    assert str(broken) in str(info.value)


def test_images_of_different_sizes_are_refused(tmp_path):
    write_images(tmp_path, {"a": [rgb(0, 4, 4)], "b": [rgb(1, 5, 4)]})
    with pytest.raises(ValueError, match="all images of a dataset must have one size"):
        load_dataset(tmp_path, raw=True)


def test_class_folders_must_agree_between_train_and_test(tmp_path):
    write_images(tmp_path / "train", {"a": [rgb(0)], "b": [rgb(1)]})
    write_images(tmp_path / "test", {"a": [rgb(0)], "c": [rgb(1)]})
    with pytest.raises(ValueError, match="differ from the training set's"):
        load_dataset(tmp_path, raw=True)


def test_without_pillow_the_error_names_the_extra(tmp_path, monkeypatch):
    write_images(tmp_path, {"a": [rgb(0)], "b": [rgb(1)]})
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails, as without Pillow
    with pytest.raises(MissingDependency, match=r"pip install 'cnnc\[images\]'"):
        load_dataset(tmp_path, raw=True)
