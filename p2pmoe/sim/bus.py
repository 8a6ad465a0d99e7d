"""The in-process driver: every node of a run in one process, messages over a queue.

Each message is encoded and decoded with the real codec, so the ledger counts the bytes the
daemon would put on the wire, and a message a method could not send over ZeroMQ fails here too.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping

from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.base import Method
from p2pmoe.wire.codec import DEFAULT_LIMITS, Limits, decode, encode, frame_sizes
from p2pmoe.wire.messages import Send


class RoundStalled(RuntimeError):
    """Nodes still waited after their deadline: a method that never finishes its round."""


class InMemoryBus:
    """Runs rounds over a fixed set of methods, recording every message in a ledger."""

    def __init__(
        self,
        nodes: Mapping[str, Method],
        ledger: ByteLedger | None = None,
        limits: Limits = DEFAULT_LIMITS,
        compression: Mapping[str, str] | None = None,
    ) -> None:
        self.nodes = dict(nodes)
        self.ledger = ledger if ledger is not None else ByteLedger()
        self.limits = limits
        self.compression = dict(compression or {})

    def run_round(self, round_index: int) -> dict[str, dict[str, float]]:
        """Train every node, exchange until every node's round is complete; return train stats."""
        stats = {node_id: node.train_local(round_index) for node_id, node in self.nodes.items()}
        queue: deque[tuple[str, Send, int]] = deque()
        for node_id, node in self.nodes.items():
            queue.extend((node_id, send, 0) for send in node.start_round(round_index))
        depth = self._deliver(round_index, queue)
        late = [node_id for node_id, node in self.nodes.items() if not node.round_complete()]
        for node_id in late:
            queue.extend((node_id, send, depth + 1) for send in self.nodes[node_id].on_deadline(round_index))
        self._deliver(round_index, queue)
        stalled = [node_id for node_id, node in self.nodes.items() if not node.round_complete()]
        if stalled:
            raise RoundStalled(f"round {round_index}: nodes {stalled} did not complete after their deadline")
        return stats

    def _deliver(self, round_index: int, queue: deque[tuple[str, Send, int]]) -> int:
        """Deliver until the queue is empty; return the deepest causal phase delivered."""
        deepest = -1
        while queue:
            src, send, phase = queue.popleft()
            if send.dst not in self.nodes:
                raise KeyError(f"{src} sent {send.message.kind.value} to unknown node {send.dst!r}")
            frames = encode(src, send.message, self.limits, self.compression)
            self.ledger.record(round_index, src, send.dst, send.message.kind.value, *frame_sizes(frames), phase=phase)
            deepest = max(deepest, phase)
            envelope = decode(frames, self.limits)
            replies = self.nodes[send.dst].on_message(envelope.src, envelope.message)
            queue.extend((send.dst, reply, phase + 1) for reply in replies)
        return deepest
