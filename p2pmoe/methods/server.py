"""The round of a server-mediated method: one upload from every live client, then replies."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from p2pmoe.methods.base import Method
from p2pmoe.wire.codec import require
from p2pmoe.wire.messages import Message, MessageKind, Send


class CollectingServer(Method):
    """Waits for a `model_update` from every live client of the round, then replies to all.

    A lost client is not waited for (what it sent stays); on the deadline the server replies
    with what arrived, or closes the round without replies if nothing did. Subclasses check
    and keep an upload (`take`, raising ProtocolError before changing anything) and build the
    replies (`reply`).
    """

    def __init__(self, node_id: str, clients: Sequence[str]) -> None:
        super().__init__(node_id)
        self.clients = list(clients)
        self._live = set(self.clients)
        self._received: set[str] = set()
        self._round = -1
        self._done = True

    @abstractmethod
    def take(self, src: str, message: Message) -> None:
        """Validate and keep `src`'s upload for the current round."""

    @abstractmethod
    def reply(self) -> list[Send]:
        """The round's answers, once the uploads are in."""

    def start_round(self, round_index: int) -> list[Send]:
        self._round = round_index
        self._received = set()
        self._done = False
        return []

    def on_message(self, src: str, message: Message) -> list[Send]:
        require(message.kind == MessageKind.MODEL_UPDATE, f"server takes model_update, not {message.kind.value}")
        require(src in self._live, f"{src} is not a client of this server")
        require(message.round == self._round and not self._done, f"update for round {message.round}, server is at {self._round}")
        self.take(src, message)
        self._received.add(src)
        return self._finish_if_ready()

    def on_peer_joined(self, peer: str) -> list[Send]:
        if peer in self.clients:
            self._live.add(peer)
        return []

    def on_peer_lost(self, peer: str) -> list[Send]:
        self._live.discard(peer)
        return self._finish_if_ready()

    def on_deadline(self, round_index: int) -> list[Send]:
        if self._done:
            return []
        self._done = True
        return self.reply() if self._received else []

    def round_complete(self) -> bool:
        return self._done

    def live_clients(self) -> list[str]:
        """Clients still counted on, in configuration order."""
        return [c for c in self.clients if c in self._live]

    def _finish_if_ready(self) -> list[Send]:
        if self._done or not self._received or not self._live <= self._received:
            return []
        self._done = True
        return self.reply()
