"""FedSASRec (FedDCSR's baseline): FedAvg over the SASRec encoder only.

Item ids are per domain, so item embeddings cannot be averaged across domains; only the
self-attention encoder (``encoder.*``) is shared. The client is `FedAvgClient` restricted to
that prefix; the server is `FedAvgServer` with `encoder_template` as its template.
"""

from __future__ import annotations

import torch
from torch import nn

from p2pmoe.methods.base import Learner, Method
from p2pmoe.methods.fedavg import FedAvgClient, FedAvgServer
from p2pmoe.methods.registry import BuildContext, MethodSpec, NoOptions, register_method
from p2pmoe.models.params import float_state
from p2pmoe.naming import SERVER_ID
from p2pmoe.participation import Participation

ENCODER_PREFIX = "encoder."


def encoder_template(model: nn.Module) -> dict[str, torch.Tensor]:
    """What crosses the network: the model's ``encoder.*`` floating-point tensors."""
    return float_state(model, ENCODER_PREFIX)


class FedSASRecClient(FedAvgClient):
    """A FedAvg client that uploads and adopts only ``encoder.*`` of its SASRec model."""

    def __init__(self, node_id: str, learner: Learner, server_id: str, local_epochs: int = 1, participation: Participation | None = None) -> None:
        super().__init__(node_id, learner, server_id, local_epochs, prefix=ENCODER_PREFIX, participation=participation)


def _client(ctx: BuildContext[NoOptions], node: str) -> Method:
    return FedSASRecClient(node, ctx.learner(node), SERVER_ID, ctx.cfg.run.local_epochs, ctx.participation)


def _server(ctx: BuildContext[NoOptions]) -> Method:
    return FedAvgServer(SERVER_ID, ctx.clients, encoder_template(ctx.template()), ctx.participation)


register_method(
    MethodSpec(
        name="fedsasrec",
        summary="FedDCSR's baseline: FedAvg of the SASRec encoder only (item embeddings stay local)",
        needs=frozenset({"domain_sequences"}),
        options=NoOptions,
        build_client=_client,
        build_server=_server,
    )
)
