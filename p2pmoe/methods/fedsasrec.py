"""FedSASRec (FedDCSR's baseline): FedAvg over the SASRec encoder only.

Item ids are per domain, so item embeddings cannot be averaged across domains; only the
self-attention encoder (``encoder.*``) is shared. The client is `FedAvgClient` looking at the
encoder alone, so the FedAvg logic is not repeated here; the server is `FedAvgServer` with
`encoder_template` as its template.
"""

from __future__ import annotations

import torch
from torch import nn

from p2pmoe.methods.base import Learner
from p2pmoe.methods.fedavg import FedAvgClient
from p2pmoe.methods.params import float_state

ENCODER_PREFIX = "encoder."


def encoder_template(model: nn.Module) -> dict[str, torch.Tensor]:
    """What crosses the network: the model's ``encoder.*`` floating-point tensors."""
    return float_state(model, ENCODER_PREFIX)


class _EncoderView:
    """A learner whose ``model`` shows only the real model's ``encoder`` (same tensors, same
    ``encoder.*`` names); training, evaluation and checkpoints go to the real learner."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.model = nn.ModuleDict({"encoder": learner.model.encoder})
        self.num_train_examples = learner.num_train_examples

    def train(self, epochs: int) -> dict[str, float]:
        return self.learner.train(epochs)

    def evaluate(self) -> dict[str, float]:
        return self.learner.evaluate()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.learner.load_state_dict(state)


class FedSASRecClient(FedAvgClient):
    """A FedAvg client that uploads and adopts only ``encoder.*`` of its SASRec model.

    ``self.learner`` is a view whose ``model`` is the encoder; the real learner is
    ``self.learner.learner``.
    """

    def __init__(self, node_id: str, learner: Learner, server_id: str, local_epochs: int = 1) -> None:
        super().__init__(node_id, _EncoderView(learner), server_id, local_epochs)
