"""The learner contract: a node's local model, data and training loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn


class Learner(Protocol):
    """A node's local model, data and training loop; methods decide what to share of it."""

    model: nn.Module
    num_train_examples: int

    def train(self, epochs: int) -> dict[str, float]:
        """Blocking local training; returns training statistics such as the mean loss."""

    def evaluate(self) -> dict[str, float]:
        """Metrics with lowercase names (accuracy, mrr, ndcg@10, ...)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume local training, as named tensors."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned."""


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of one shuffled pass over `count` examples, `batch_size` at a time (the last
    batch may be smaller). Every learner draws its order from its own generator this way, so a
    checkpointed generator state resumes the same order."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]
