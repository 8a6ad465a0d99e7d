"""Sequence data, the common currency of the sequential-recommendation methods.

``DomainSequences`` is the non-overlapped setting (FedDCSR's FKCB folders and the MovieLens
genre views both become it, so FMoE-CDSR and its baselines never need to know where their data
came from); ``Timeline`` is the overlapped one (SyNCRec).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass
class DomainSequences:
    """One domain's train/valid/test sequences with item ids ``0..num_items-1``.

    ``train`` holds training sequences (every position predicts the next item). In ``valid``
    and ``test`` the last item of each sequence is the target and the rest its input.
    ``*_users`` give the user id of each sequence, aligned by position. ``global_items`` maps a
    local item id to its id in a larger catalogue when the domain was cut from one (MovieLens
    genre views); it is ``None`` when the files themselves define the ids (FedDCSR).
    """

    name: str
    num_items: int
    train: list[list[int]]
    valid: list[list[int]]
    test: list[list[int]]
    train_users: list[int]
    valid_users: list[int]
    test_users: list[int]
    global_items: np.ndarray | None = None

    def __post_init__(self) -> None:
        for split in ("train", "valid", "test"):
            if len(getattr(self, split)) != len(getattr(self, f"{split}_users")):
                raise ValueError(f"{self.name}: {split} and {split}_users differ in length")
        if self.global_items is not None and len(self.global_items) != self.num_items:
            raise ValueError(f"{self.name}: global_items must have num_items entries")


@dataclass
class Timeline:
    """One user's merged, time-ordered history across domains (the overlapped setting).

    ``items`` are catalogue-wide item ids, ``domains[i]`` the domain of ``items[i]`` and
    ``timestamps[i]`` when it happened; the three arrays are aligned.
    """

    user: int
    items: np.ndarray
    domains: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.items)


def unseen_share(targets: list[int], seen: set[int]) -> float | None:
    """The share of ``targets`` that never occur in ``seen`` (the training items): cold-start
    targets, which an ID-based model cannot rank above chance. None without targets."""
    return sum(t not in seen for t in targets) / len(targets) if targets else None


def unseen_targets(domains: Iterable[DomainSequences]) -> dict[str, dict[str, float | None]]:
    """Per domain, the share of valid and test targets that no training sequence of that domain
    holds (`unseen_share`), for a ranking task's data profile."""
    found = {}
    for d in domains:
        seen = {item for seq in d.train for item in seq}
        found[d.name] = {split: unseen_share([seq[-1] for seq in getattr(d, split)], seen) for split in ("valid", "test")}
    return found
