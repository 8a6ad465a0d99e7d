"""The round of a server-mediated method: one upload from every live sampled client, then
replies to the clients sampled for the next round.

Partial participation follows FedAvg at scale (McMahan et al. 2017): the clients sampled for a
round start it from the server's latest model, train, and upload. Here a round begins with
training, so the server sends round r's result at the end of round r to the clients sampled
for round r + 1 (every client computes that sample itself, `p2pmoe.participation`). With full
participation this is exactly one upload and one reply per live client and round, as before;
a client sampled in r but not in r + 1 gets no reply (FedAvg sends nothing to clients it did
not sample), and one sampled in r + 1 but not in r waits in round r for the model it starts
round r + 1 from.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from p2pmoe.methods.base import Learner, LearnerMethod, Method
from p2pmoe.participation import Participation
from p2pmoe.wire.codec import ProtocolError, require
from p2pmoe.wire.messages import Message, MessageKind, Send


class CollectingServer(Method):
    """Waits for a `model_update` from every live client sampled for the round, then replies
    to the live clients sampled for the next one (`receivers`).

    A lost client is not waited for (what it sent stays); on the deadline the server replies
    with what arrived, or closes the round without replies if nothing did. Subclasses check
    and keep an upload (`take`, raising ProtocolError before changing anything) and build the
    replies (`reply`).
    """

    def __init__(self, node_id: str, clients: Sequence[str], participation: Participation | None = None) -> None:
        super().__init__(node_id, participation)
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
        require(self.participation.takes_part(src, self._round), f"{src} is not sampled for round {self._round}")
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

    def receivers(self) -> list[str]:
        """Who gets the round's result: the live clients sampled for the next round, in
        configuration order (every live client under full participation)."""
        return [c for c in self.clients if c in self._live and self.participation.takes_part(c, self._round + 1)]

    def _finish_if_ready(self) -> list[Send]:
        awaited = self.participation.among(self._live, self._round)
        if self._done or not self._received or not awaited <= self._received:
            return []
        self._done = True
        return self.reply()


class ServerClient(LearnerMethod):
    """A client of a server-mediated method (see the module docstring for the round).

    Sampled for round r, it uploads `model_update(r)`; sampled for round r + 1, it waits in
    round r for the server's `model_global` and takes it in with `adopt`. On the deadline it
    goes on with what it holds.
    """

    def __init__(
        self, node_id: str, learner: Learner, server_id: str, local_epochs: int = 1, participation: Participation | None = None, finetune_epochs: int = 0
    ) -> None:
        super().__init__(node_id, learner, local_epochs, participation, finetune_epochs)
        self.server_id = server_id
        self._round = -1
        self._synced = True
        self._server_lost = False

    @abstractmethod
    def model_update(self, round_index: int) -> Message:
        """What this client uploads in a round it is sampled for."""

    @abstractmethod
    def adopt(self, message: Message) -> None:
        """Take in the server's answer (validated kind, sender and round); raise ProtocolError
        before changing anything when its content is wrong."""

    def start_round(self, round_index: int) -> list[Send]:
        self._enter(round_index)
        return [Send(self.server_id, self.model_update(round_index))]

    def sit_out(self, round_index: int) -> list[Send]:
        self._enter(round_index)
        return []

    def _enter(self, round_index: int) -> None:
        self._round = round_index
        self._synced = self._server_lost or not self.takes_part(round_index + 1)  # the server answers next round's sample

    def on_message(self, src: str, message: Message) -> list[Send]:
        require(src == self.server_id and message.kind == MessageKind.MODEL_GLOBAL, f"unexpected {message.kind.value} from {src}")
        require(message.round == self._round and not self._synced, f"reply for round {message.round} not awaited (round {self._round})")
        self.adopt(message)
        self._synced = True
        return []

    def on_deadline(self, round_index: int) -> list[Send]:
        self._synced = True  # nothing arrived in time: go on with what this client holds
        return []

    def on_peer_lost(self, peer: str) -> list[Send]:
        """Without its server no answer can come: go on with what this client holds at once, as
        the deadline would, and in later rounds too until the server is back (a restarted
        client whose server has finished the run no longer waits out every round deadline)."""
        if peer == self.server_id:
            self._server_lost = True
            self._synced = True
        return []

    def on_peer_joined(self, peer: str) -> list[Send]:
        if peer == self.server_id:
            self._server_lost = False
        return []

    def round_complete(self) -> bool:
        return self._synced


def example_count(message: Message) -> int:
    """An upload's `meta.num_examples`, the weight servers average by: a positive integer, or
    the message is refused (a peer's bytes decide it, so never an assert)."""
    count = message.meta.get("num_examples")
    if not (isinstance(count, int) and not isinstance(count, bool) and count > 0):
        raise ProtocolError("meta.num_examples must be a positive integer")
    return count
