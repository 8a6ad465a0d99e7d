"""The sans-IO contract between a method and the driver that runs it.

A method is plain synchronous code: events in (a round starts, a message arrives, a peer is
lost, time is up), sends out. It never touches a socket, a clock or an event loop, so the
daemon and the simulator run the very same objects (the way h11 keeps HTTP apart from I/O).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from p2pmoe.learners.base import Learner
from p2pmoe.participation import Participation
from p2pmoe.wire.messages import Message, MessageKind, Send

__all__ = ["Learner", "LearnerMethod", "Method", "SendFailure"]

log = logging.getLogger("p2pmoe.methods")


@dataclass(frozen=True)
class SendFailure:
    """Why a message this node sent came to nothing: it could not be sent (`unreachable`),
    a request got no reply in time (`timeout`), or the receiver refused it (`refused`, with
    the receiver's reason). `req` is the request id when the message had one."""

    kind: MessageKind
    round: int
    reason: str
    cause: str = "refused"
    req: int | None = None


class Method(ABC):
    """One node's role in a federated method.

    The driver (`p2pmoe.driver`) calls, each round r: `train_local(r)` (blocking, may run in a
    worker thread), `start_round(r)`, then `on_message` for every delivery until
    `round_complete()`; if the round's deadline passes first, `on_deadline(r)` lets the method
    go on with what it has. Calls never overlap: a delivery that arrives while the method
    trains or evaluates waits until that call returns.

    Under partial participation (`participation`, run option `participation`) a client not
    sampled for round r is neither trained nor started: the driver calls `sit_out(r)` instead
    of `train_local` and `start_round`, then waits for `round_complete()` as usual.
    """

    def __init__(self, node_id: str, participation: Participation | None = None) -> None:
        self.node_id = node_id
        self.participation = participation or Participation()

    def takes_part(self, round_index: int) -> bool:
        """Whether this node is sampled for `round_index` (a server always is)."""
        return self.participation.takes_part(self.node_id, round_index)

    def sit_out(self, round_index: int) -> list[Send]:
        """Round r without this node: it trains and sends nothing. Default: nothing to do and
        nothing to wait for (a method whose round state would be left waiting resets it here)."""
        return []

    def train_local(self, round_index: int) -> dict[str, float]:
        """Local work before the round's exchange; nodes without data do nothing."""
        return {}

    @abstractmethod
    def start_round(self, round_index: int) -> list[Send]:
        """What to publish or request once local training is done."""

    @abstractmethod
    def on_message(self, src: str, message: Message) -> list[Send]:
        """Take in a validated message from `src`; answer with further sends."""

    def on_peer_joined(self, peer: str) -> list[Send]:
        """`peer` is (back) in the membership table; count on it again."""
        return []

    def on_peer_lost(self, peer: str) -> list[Send]:
        """The driver gave up on `peer`; stop waiting for it."""
        return []

    def on_send_failed(self, dst: str, failure: SendFailure) -> list[Send]:
        """Something this node sent to `dst` failed (see `SendFailure`): stop waiting for what
        it would have brought, or try another way. Default: nothing to do."""
        return []

    def on_refused(self, src: str, message: Message) -> list[Send]:
        """`message` from `src` broke a rule and was refused (the sender got an ERROR): stop
        waiting for what it would have brought this round, so that one liar cannot hold every
        honest node's round to its deadline. Default: nothing to do."""
        return []

    def on_deadline(self, round_index: int) -> list[Send]:
        """The round's time is up: finish it with whatever has arrived."""
        return []

    @abstractmethod
    def round_complete(self) -> bool:
        """True once this node has everything it needs from the current round."""

    def evaluate(self) -> dict[str, float]:
        """Metrics of this node after the round; empty for nodes with no data (a server)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything to checkpoint, as named tensors (the codec can carry it)."""
        return {}

    def diagnostics(self) -> dict[str, Any]:
        """What the method decided this round, for reports (JSON-ready, small): FedMoE-DA's
        aggregation plan, say. The driver writes it into the round's metrics.jsonl row under
        `diagnostics` when it is not empty. Default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: B027 - an optional hook: a method with no state restores nothing
        """Restore what `state_dict` returned."""


def fine_tuned_metrics(learner: Learner, epochs: int) -> dict[str, float]:
    """The learner's metrics after `epochs` of local training on a copy of its state, then the
    state as it was (weights and shuffling RNG, so the run's own training is untouched), with
    the examples that training cost as `eval_sample_epochs` (the summary adds it to the
    run's compute). What FedAvg-FT evaluates: the global model as a client would serve it."""
    before = {name: t.clone() for name, t in learner.state_dict().items()}
    learner.train(epochs)
    metrics = learner.evaluate()
    learner.load_state_dict(before)
    return {**metrics, "eval_sample_epochs": float(learner.num_train_examples * epochs)}


EXPLODING_LOSS = 100.0
"""A training loss above this many times the node's previous one (or 1, whichever is larger), or
one that is not a number, means what the node merged since is poison (see `LearnerMethod`)."""


def loss_exploded(loss: float, previous: float | None) -> bool:
    """Whether `loss` is not finite or `EXPLODING_LOSS` times past `previous` (or 1)."""
    return not math.isfinite(loss) or loss > EXPLODING_LOSS * max(previous or 0.0, 1.0)


class LearnerMethod(Method):
    """A method whose node owns a Learner: training, evaluation and checkpoints delegate to it.

    Training reports its compute as `sample_epochs` (training examples x epochs); with
    `finetune_epochs` k > 0 every evaluation scores the model after k local epochs on a copy
    (`fine_tuned_metrics`), and the node's own model goes on unchanged.

    Numbers from peers cannot kill the node: the state right after local training (before the
    round's exchange merges anything foreign) is kept, and when the next training's loss
    explodes (`loss_exploded`), the node rolls back to it, drops what the exchange merged, logs
    it, trains again and reports `rolled_back`. Project decision: one model copy per node is
    the price; bounds on receipt (`p2pmoe.wire.codec.check_like`) stop the crude attacks first.
    """

    def __init__(self, node_id: str, learner: Learner, local_epochs: int = 1, participation: Participation | None = None, finetune_epochs: int = 0) -> None:
        super().__init__(node_id, participation)
        if finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
        self.learner = learner
        self.local_epochs = local_epochs
        self.finetune_epochs = finetune_epochs
        self._before_merge: dict[str, torch.Tensor] | None = None
        self._last_loss: float | None = None

    def train_local(self, round_index: int) -> dict[str, float]:
        stats = self.learner.train(self.local_epochs)
        loss = stats.get("train_loss")
        if loss is not None and self._before_merge is not None and loss_exploded(loss, self._last_loss):
            log.warning(
                "%s: training loss %.3g in round %d after merging peers' values: rolled back to the state before that merge and dropped it",
                self.node_id,
                loss,
                round_index,
            )
            self.learner.load_state_dict(self._before_merge)
            stats = {**self.learner.train(self.local_epochs), "rolled_back": 1.0}
            loss = stats.get("train_loss")
        self._before_merge = {name: t.clone() for name, t in self.learner.state_dict().items()}
        self._last_loss = loss if loss is not None and math.isfinite(loss) else self._last_loss
        return {**stats, "sample_epochs": float(self.learner.num_train_examples * self.local_epochs)}

    def evaluate(self) -> dict[str, float]:
        return fine_tuned_metrics(self.learner, self.finetune_epochs) if self.finetune_epochs else self.learner.evaluate()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.learner.load_state_dict(state)
