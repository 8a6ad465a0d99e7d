"""Gossip averaging with topology neighbours (D-PSGD), sans-IO.

One helper serves the serverless baseline (the whole model) and FedMoE-DA's `gossip`
embedding mode (only φ): send our tensors to every neighbour with our degree, and when the
neighbours' tensors are in, mix them with Metropolis–Hastings weights
w_kj = 1 / (1 + max(deg_k, deg_j)), w_kk = 1 − Σ_j w_kj (doubly stochastic on any graph).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from p2pmoe.methods.base import Learner, LearnerMethod, Method
from p2pmoe.methods.registry import BuildContext, MethodSpec, register_method, topology_peers
from p2pmoe.models.params import float_state, load_float_state
from p2pmoe.wire.codec import ProtocolError, check_like, require
from p2pmoe.wire.messages import Message, MessageKind, Send


class GossipExchange:
    """One round of neighbour averaging over the tensors `read()` returns."""

    def __init__(
        self,
        neighbours: Sequence[str],
        kind: MessageKind,
        read: Callable[[], dict[str, torch.Tensor]],
        write: Callable[[dict[str, torch.Tensor]], None],
    ) -> None:
        self.configured = set(neighbours)
        self.neighbours = set(neighbours)
        self.degree = len(self.configured)  # fixed, so both ends of a link agree on its weight
        self.kind = kind
        self._read = read
        self._write = write
        self._own: dict[str, torch.Tensor] = {}
        self._received: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
        self._waiting: set[str] = set()
        self.done = True

    def start(self, round_index: int) -> list[Send]:
        """Snapshot our tensors and send them to every live neighbour. Without neighbours (a
        lone node, FedMoE-DA's frozen phi) there is nothing to snapshot: a copy of phi per node
        would be most of an accounting run's memory on thousands of nodes."""
        self._received = {}
        self._waiting = set(self.neighbours)
        self.done = not self._waiting
        if self.done:
            self._own = {}
            return []
        self._own = self._read()
        message = Message(self.kind, round_index, self._own, {"degree": self.degree})
        return [Send(peer, message) for peer in sorted(self.neighbours)]

    def take(self, src: str, message: Message) -> None:
        """A neighbour's tensors; mix once all have arrived."""
        require(src in self.neighbours, f"{src} is not a gossip neighbour")
        degree = message.meta.get("degree")
        if not (isinstance(degree, int) and not isinstance(degree, bool) and degree >= 1):  # a raise, not require(): it narrows degree
            raise ProtocolError("meta.degree must be a positive integer")
        check_like(message.tensors, self._own)
        self._received[src] = (message.tensors, degree)
        self._waiting.discard(src)
        self._finish_if_ready()

    def lose(self, peer: str) -> None:
        """`peer` is gone: stop waiting for it, this round and the next."""
        self.neighbours.discard(peer)
        self._waiting.discard(peer)
        self._finish_if_ready()

    def rejoin(self, peer: str) -> None:
        """A configured neighbour is back: exchange with it again from the next round."""
        if peer in self.configured:
            self.neighbours.add(peer)

    def give_up(self) -> None:
        """Mix with whatever arrived."""
        self._waiting.clear()
        self._finish_if_ready()

    def _finish_if_ready(self) -> None:
        if self.done or self._waiting:
            return
        # Sorted by sender, not arrival: the same sums in the same order whatever the network did,
        # so a swarm computes exactly what the simulator does.
        received = sorted(self._received.items())
        weights = {src: 1.0 / (1 + max(self.degree, degree)) for src, (_, degree) in received}
        own_weight = 1.0 - sum(weights[src] for src, _ in received)
        mixed = {}
        for name, own in self._own.items():
            total = own_weight * own
            for src, (tensors, _) in received:
                total = total + weights[src] * tensors[name]
            mixed[name] = total
        self._write(mixed)
        self.done = True


class GossipNode(LearnerMethod):
    """D-PSGD: train locally, then average the whole model with topology neighbours."""

    def __init__(self, node_id: str, learner: Learner, neighbours: Sequence[str], local_epochs: int = 1) -> None:
        super().__init__(node_id, learner, local_epochs)
        model = learner.model
        self.exchange = GossipExchange(neighbours, MessageKind.GOSSIP, lambda: float_state(model), lambda state: load_float_state(model, state))

    def start_round(self, round_index: int) -> list[Send]:
        return self.exchange.start(round_index)

    def on_message(self, src: str, message: Message) -> list[Send]:
        require(message.kind == MessageKind.GOSSIP, f"gossip nodes take gossip messages, not {message.kind.value}")
        self.exchange.take(src, message)
        return []

    def on_peer_lost(self, peer: str) -> list[Send]:
        self.exchange.lose(peer)
        return []

    def on_peer_joined(self, peer: str) -> list[Send]:
        self.exchange.rejoin(peer)
        return []

    def on_deadline(self, round_index: int) -> list[Send]:
        self.exchange.give_up()
        return []

    def round_complete(self) -> bool:
        return self.exchange.done


def _client(ctx: BuildContext, node: str) -> Method:
    return GossipNode(node, ctx.learner(node), sorted(ctx.graph.neighbors(node)), ctx.cfg.run.local_epochs)


register_method(
    MethodSpec(
        name="gossip",
        summary="D-PSGD: the whole model averaged with topology neighbours (Metropolis-Hastings weights), no server",
        tasks=("image",),
        build_client=_client,
        peers=topology_peers,
    )
)
