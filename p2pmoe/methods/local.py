"""Local training only: the no-communication baseline every table needs."""

from __future__ import annotations

from p2pmoe.methods.base import Learner, Method
from p2pmoe.wire.messages import Message, Send


class LocalMethod(Method):
    """Each node trains alone and sends nothing."""

    def __init__(self, node_id: str, learner: Learner, local_epochs: int = 1) -> None:
        super().__init__(node_id)
        self.learner = learner
        self.local_epochs = local_epochs

    def train_local(self, round_index: int) -> dict[str, float]:
        return self.learner.train(self.local_epochs)

    def start_round(self, round_index: int) -> list[Send]:
        return []

    def on_message(self, src: str, message: Message) -> list[Send]:
        return []

    def round_complete(self) -> bool:
        return True

    def evaluate(self) -> dict[str, float]:
        return self.learner.evaluate()
