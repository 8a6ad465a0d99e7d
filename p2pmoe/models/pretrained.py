"""Pretrained weights on disk: safetensors files, checked against the model they go into.

Weights are never pickled: a safetensors file holds only named tensors and string metadata, so
reading one runs no code. `load_pretrained` refuses a file whose names, shapes or dtypes differ
from the model's, or that holds a non-finite value, with an error that says which and how to
make a fitting file, before anything is written into a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["PretrainedError", "load_pretrained", "read_metadata", "save_pretrained"]


class PretrainedError(ValueError):
    """A pretrained-weights file that is missing, unreadable or does not fit the model."""


def save_pretrained(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write `tensors` (contiguous CPU copies) and `metadata` (how they were made) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(path), metadata=dict(metadata))
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The file's string metadata (what it was trained on, for how long, its accuracy)."""
    return dict(_open(path)[1])


def _open(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise PretrainedError(f"{path}: no such file; write one with `p2pmoe pretrain-phi --out {path}` (or `make phi`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise PretrainedError(f"{path}: not a readable safetensors file ({err})") from None


def load_pretrained(path: Path, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `path`, checked to have exactly the names, shapes and dtypes of `like`
    (the model's own tensors) and only finite values."""
    tensors, _ = _open(path)
    missing, extra = sorted(set(like) - set(tensors)), sorted(set(tensors) - set(like))
    hint = "pretrain with the run's model settings (--embed-dim, the data's channels and image size)"
    if missing or extra:
        raise PretrainedError(f"{path}: tensor names differ from the model's: missing {missing}, unexpected {extra}; {hint}")
    for name, own in like.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(own.shape) or got.dtype != own.dtype:
            raise PretrainedError(f"{path}: {name!r} is {got.dtype} {tuple(got.shape)}, the model's is {own.dtype} {tuple(own.shape)}; {hint}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise PretrainedError(f"{path}: {name!r} holds non-finite values")
    return tensors
