"""A user's own aggregation rule as a p2pmoe plugin, in one file outside the package.

Coordinate-wise median FedAvg (Yin et al. 2018): the server takes, for every weight, the median
of the clients' uploads instead of their mean, so a minority of wild updates cannot drag the
global model. Everything else (clients, messages, rounds, partial participation) is FedAvg's.

    p2pmoe simulate --plugins examples/median_fedavg.py --method fedavg-median --data fmnist
    p2pmoe methods --plugins examples/median_fedavg.py      # listed with the built-ins

Importing this file registers the method; the package never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from p2pmoe.methods.base import Method
from p2pmoe.methods.fedavg import FedAvgServer, build_client
from p2pmoe.methods.registry import BuildContext, MethodSpec, NoOptions, register_method
from p2pmoe.models.params import float_state
from p2pmoe.naming import SERVER_ID


class MedianServer(FedAvgServer):
    """FedAvg's server with the coordinate-wise median as its aggregation rule."""

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], counts: Sequence[int]) -> dict[str, torch.Tensor]:
        # torch's median of an even count is the lower middle value: a weight every client could have sent
        return {name: torch.stack([s[name] for s in states]).median(dim=0).values for name in states[0]}


def build_server(ctx: BuildContext[NoOptions]) -> Method:
    return MedianServer(SERVER_ID, ctx.clients, float_state(ctx.template()), ctx.participation)


register_method(
    MethodSpec(
        name="fedavg-median",
        summary="FedAvg with the coordinate-wise median of the uploads (an example plugin)",
        needs=frozenset({"whole_model"}),  # runs on every family whose clients share one architecture
        options=NoOptions,  # no options of its own
        build_client=build_client,  # FedAvg's clients: only the server's rule differs
        build_server=build_server,
    )
)
