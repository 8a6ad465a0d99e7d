"""FedAvg over the whole model: the byte-count baseline every other method is compared to.

The server is one more node: it waits for every live client's weights, averages them weighted
by the client's number of training examples and sends the average back to every client.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from p2pmoe.methods.base import Learner, LearnerMethod, Method
from p2pmoe.methods.registry import BuildContext, MethodSpec, register_method
from p2pmoe.methods.server import CollectingServer
from p2pmoe.models.params import float_state, load_float_state, weighted_average
from p2pmoe.naming import SERVER_ID
from p2pmoe.wire.codec import ProtocolError, check_like, require
from p2pmoe.wire.messages import Message, MessageKind, Send


class FedAvgClient(LearnerMethod):
    """Trains locally, uploads its floating-point weights, adopts the server's average.

    `prefix` limits what is shared to the state entries whose names start with it (FedSASRec
    shares only ``encoder.``); everything else stays local.
    """

    def __init__(self, node_id: str, learner: Learner, server_id: str, local_epochs: int = 1, prefix: str = "") -> None:
        super().__init__(node_id, learner, local_epochs)
        self.server_id = server_id
        self.prefix = prefix
        self._round = -1
        self._synced = True

    def start_round(self, round_index: int) -> list[Send]:
        self._round = round_index
        self._synced = False
        update = Message(
            MessageKind.MODEL_UPDATE,
            round_index,
            float_state(self.learner.model, self.prefix),
            {"num_examples": self.learner.num_train_examples},
        )
        return [Send(self.server_id, update)]

    def on_message(self, src: str, message: Message) -> list[Send]:
        require(src == self.server_id and message.kind == MessageKind.MODEL_GLOBAL, f"unexpected {message.kind.value} from {src}")
        require(message.round == self._round, f"global model for round {message.round}, current round is {self._round}")
        load_float_state(self.learner.model, message.tensors, self.prefix)
        self._synced = True
        return []

    def on_deadline(self, round_index: int) -> list[Send]:
        self._synced = True  # no average arrived in time: go on with the local weights
        return []

    def round_complete(self) -> bool:
        return self._synced


class FedAvgServer(CollectingServer):
    """Collects client weights for a round and broadcasts their weighted average."""

    def __init__(self, node_id: str, clients: Sequence[str], template: dict[str, torch.Tensor]) -> None:
        super().__init__(node_id, clients)
        self.global_state = {name: t.clone() for name, t in template.items()}
        self._updates: dict[str, tuple[dict[str, torch.Tensor], int]] = {}

    def start_round(self, round_index: int) -> list[Send]:
        self._updates = {}
        return super().start_round(round_index)

    def take(self, src: str, message: Message) -> None:
        count = message.meta.get("num_examples")
        if not (isinstance(count, int) and not isinstance(count, bool) and count > 0):  # a raise, not require(): it narrows count
            raise ProtocolError("meta.num_examples must be a positive integer")
        check_like(message.tensors, self.global_state)
        self._updates[src] = (message.tensors, count)

    def reply(self) -> list[Send]:
        states, counts = zip(*(self._updates[c] for c in sorted(self._updates)), strict=True)  # client order, not arrival
        self.global_state = weighted_average(states, counts)
        message = Message(MessageKind.MODEL_GLOBAL, self._round, self.global_state)
        return [Send(client, message) for client in self.live_clients()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.global_state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_like(state, self.global_state)
        self.global_state = dict(state)


def _client(ctx: BuildContext, node: str) -> Method:
    return FedAvgClient(node, ctx.learner(node), SERVER_ID, ctx.cfg.run.local_epochs)


def _server(ctx: BuildContext) -> Method:
    return FedAvgServer(SERVER_ID, ctx.clients, float_state(ctx.template()))


register_method(
    MethodSpec(
        name="fedavg",
        summary="the whole model averaged by a server, weighted by training examples (the byte baseline)",
        tasks=("image", "multitask", "timelines"),
        build_client=_client,
        build_server=_server,
    )
)
