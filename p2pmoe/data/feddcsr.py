"""Reader for FedDCSR's per-domain sequence folders, the layout of the FKCB benchmark.

``<root>/<Domain>/`` holds ``num_items.txt`` (N) and ``train_data.txt``, ``valid_data.txt``,
``test_data.txt`` with one sequence a line: ``user_id<TAB>item<TAB>item...``, item ids in
``0..N-1``. In valid and test the last item is the target. The data are read from wherever
the caller keeps them; nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from p2pmoe.data.errors import DataFormatError, DataNotFoundError
from p2pmoe.data.sequences import DomainSequences

FKCB_DOMAINS = ("Food", "Kitchen", "Clothing", "Beauty")
"""FKCB's domains in the order FedDCSR and FMoE-CDSR report them."""

SPLITS = ("train", "valid", "test")

HINT = "Pass the folder that holds <Domain>/num_items.txt and <Domain>/{train,valid,test}_data.txt (FedDCSR's layout, e.g. its FKCB split)."


def load_feddcsr(root: str | Path, domains: Sequence[str] | None = None) -> list[DomainSequences]:
    """The given domains of ``root`` in the given order (e.g. ``FKCB_DOMAINS``); by default
    every subfolder holding a ``train_data.txt``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError("FedDCSR sequences", root, HINT)
    if domains is None:
        domains = sorted(p.name for p in root.iterdir() if (p / "train_data.txt").is_file())
        if not domains:
            raise DataNotFoundError("FedDCSR sequences", root, HINT)
    return [load_feddcsr_domain(root / name) for name in domains]


def load_feddcsr_domain(folder: str | Path) -> DomainSequences:
    """One domain folder, validated: integer fields, item ids below num_items, and at least
    one item per train line and two (input and target) per valid or test line."""
    folder = Path(folder)
    for name in ("num_items.txt", *(f"{split}_data.txt" for split in SPLITS)):
        if not (folder / name).is_file():
            raise DataNotFoundError(f"FedDCSR domain {folder.name!r}", folder / name, HINT)
    num_items = _read_count(folder / "num_items.txt")
    read = {split: _read_sequences(folder / f"{split}_data.txt", num_items, 1 if split == "train" else 2) for split in SPLITS}
    return DomainSequences(
        name=folder.name,
        num_items=num_items,
        train=read["train"][1],
        valid=read["valid"][1],
        test=read["test"][1],
        train_users=read["train"][0],
        valid_users=read["valid"][0],
        test_users=read["test"][0],
    )


def _text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, raw.count(b"\n", 0, err.start) + 1, "UTF-8 text of integers") from None


def _read_count(path: Path) -> int:
    text = _text(path).strip()
    if not text.isdigit() or int(text) == 0:
        raise DataFormatError(path, 1, "a positive integer: the number of items", got=text[:40])
    return int(text)


def _read_sequences(path: Path, num_items: int, min_items: int) -> tuple[list[int], list[list[int]]]:
    users: list[int] = []
    sequences: list[list[int]] = []
    layout = f"user_id<TAB>item<TAB>item... with at least {min_items} item(s), integers"
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            user, *items = (int(field) for field in line.split())
        except ValueError:
            raise DataFormatError(path, number, layout, got=line[:80]) from None
        if len(items) < min_items:
            raise DataFormatError(path, number, layout, got=line[:80])
        out_of_range = next((i for i in items if not 0 <= i < num_items), None)
        if out_of_range is not None:
            expected = f"item ids in 0..{num_items - 1} (num_items.txt)"
            raise DataFormatError(path, number, expected, got=str(out_of_range))
        users.append(user)
        sequences.append(items)
    return users, sequences
