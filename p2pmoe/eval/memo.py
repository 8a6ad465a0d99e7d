"""Scores of identical models computed once.

In a simulation every node of a process is scored on the same global test sample, and after a
server-mediated round (FedAvg, FedSASRec's encoders aside) many nodes hold bit-identical
weights: ten FedAvg clients then classified the same 2,000 images with the same model ten
times a round, two thirds of a Fashion-MNIST simulation's evaluation time. A `ScoreMemo`
belongs to one fixed data set; it keys a score by the model's fingerprint, so a model whose
class and every state entry match one already scored gets that score back without running.
Inference on a CPU is deterministic for equal weights and inputs, so the numbers are the ones
a recomputation gives (tested).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ScoreMemo", "model_fingerprint"]


def model_fingerprint(model: nn.Module) -> bytes:
    """A digest of the model's class and of every state entry's name, dtype, shape and bytes:
    equal fingerprints mean the same function (same architecture, same weights and buffers)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.digest()


class ScoreMemo:
    """The scores of the last `capacity` distinct models on one data set.

    Thread-safe: a simulation with workers evaluates several nodes at once, and one node's
    eviction must not pull an entry from under another's lookup. The score itself is computed
    outside the lock; two threads that meet the same new model both compute it, to the same
    value.
    """

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._scores: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def score(self, model: nn.Module, compute: Callable[[], float]) -> float:
        """``compute()``'s value for this model, computed only if no identical model was scored."""
        key = model_fingerprint(model)
        with self._lock:
            if key in self._scores:
                self._scores.move_to_end(key)
                self.hits += 1
                return self._scores[key]
        value = compute()
        with self._lock:
            self._scores[key] = value
            if len(self._scores) > self.capacity:
                self._scores.popitem(last=False)
        return value
