"""A method that sends nothing, for daemon tests about everything but a method: who finds
whom, status, metrics, reports. Its rounds take `seconds` of training."""

from __future__ import annotations

import time

from p2pmoe.methods.base import Method


class Idle(Method):
    seconds = 0.0  # a subclass or an instance sets how long a round's training takes
    accuracy = 0.5

    def train_local(self, round_index: int) -> dict[str, float]:
        time.sleep(self.seconds)
        return {"train_loss": 1.0}

    def evaluate(self) -> dict[str, float]:
        return {"accuracy": self.accuracy}

    def start_round(self, round_index: int) -> list:
        return []

    def on_message(self, src, message) -> list:
        return []

    def round_complete(self) -> bool:
        return True
