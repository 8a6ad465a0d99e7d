"""A learner for accounting-only runs (`--train none`): a model to read shapes and values
from, no data, no training, no evaluation.

The question such a run answers is what a method costs in bytes on a topology of thousands of
nodes; every message keeps the real tensor sizes of the model, but nothing is learned.
"""

from __future__ import annotations

import torch
from torch import nn


class AccountingLearner:
    """Holds a model; trains and evaluates nothing. Project decision: every node counts one
    training example, so example-weighted averages weight nodes equally."""

    def __init__(self, model: nn.Module, num_train_examples: int = 1) -> None:
        self.model = model
        self.num_train_examples = num_train_examples

    def train(self, epochs: int) -> dict[str, float]:
        return {}

    def evaluate(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore: an accounting run has no learned state."""
