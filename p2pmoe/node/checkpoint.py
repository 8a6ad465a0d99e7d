"""Checkpoints a node can resume from after a crash: safetensors, written atomically.

safetensors holds only named tensors and string metadata, so loading one runs no code; the
atomic rename means a kill -9 at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from p2pmoe.fsio import atomic_write_bytes

FORMAT = "p2pmoe-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used."""


@dataclass(frozen=True)
class Checkpoint:
    """The state of a node after `round` completed."""

    round: int
    state: dict[str, torch.Tensor]
    extra: dict[str, Any]


def save_checkpoint(path: str | Path, round_index: int, state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
    """Write the state after round `round_index`; the previous file survives any crash here."""
    tensors = {name: t.detach().contiguous().clone() for name, t in state.items()}
    metadata = {"format": FORMAT, "round": str(round_index), "extra": json.dumps(extra or {})}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_checkpoint(path: str | Path) -> Checkpoint | None:
    """The checkpoint at `path`, None if there is none, CheckpointError if it is unusable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        round_index = int(metadata["round"])
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad metadata ({exc})") from None
    return Checkpoint(round_index, state, extra)
