"""The round loop, written once: the simulator and the daemon both run `drive_rounds`.

Per round: train (blocking, off the event loop in the daemon), start the round, deliver until
the method's round is complete or the deadline passes, evaluate when due, then hand the row to
the port, which checkpoints (daemon) and logs. Where a node is evaluated is the run's
`eval_point`: after the round's aggregation (`aggregated`, the default: the model the round's
exchange produced, before any step on the node's data) or right after the round's local
training and before its exchange (`trained`: the model a node serves, aggregation of round
r - 1 followed by round r's local training), or `both` in one run, the trained point's metrics
named with `TRAINED_SUFFIX` (`accuracy@trained`). Only the `Port` differs between drivers: the
in-memory network of the simulator, or ZeroMQ in the daemon.

A client not sampled for the round (partial participation, `p2pmoe.participation`) skips
training and sits the round out instead of starting it; it still waits for whatever its method
awaits and still evaluates when due, so every client reports metrics for the same rounds (of
the model it holds) and the means over clients stay comparable with full participation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from p2pmoe.driver.runner import NodeRunner
from p2pmoe.wire.messages import Send

log = logging.getLogger("p2pmoe.driver")
T = TypeVar("T")


class Port(Protocol):
    """What the round loop needs from a transport and its surroundings."""

    async def send(self, node: NodeRunner, sends: list[Send]) -> None:
        """Deliver `node`'s sends (and whatever they cause, in the simulator)."""

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (training, evaluation) without stalling the node's I/O."""

    async def wait(self, node: NodeRunner, timeout: float) -> bool:
        """Until `node`'s round is complete (True) or its deadline passes (False)."""

    def stopping(self) -> bool:
        """The node was told to stop (SIGTERM): leave the loop before the next step."""

    async def round_done(self, node: NodeRunner, round_index: int, train: dict[str, float], metrics: dict[str, float] | None) -> None:
        """The round is complete: checkpoint (daemon) and log its row."""


EVAL_POINTS = ("aggregated", "trained", "both")
TRAINED_SUFFIX = "@trained"  # with eval_point "both": the metrics of the trained point are named so


def evaluation_due(round_index: int, rounds: int, every: int) -> bool:
    """Every `every` rounds, and always after the last one."""
    return (round_index + 1) % every == 0 or round_index == rounds - 1


async def drive_rounds(
    node: NodeRunner, port: Port, first: int, rounds: int, eval_every: int, deadline: float, stop: int | None = None, eval_point: str = "aggregated"
) -> int:
    """Run rounds `first`..`rounds - 1` of a `rounds`-round run (only up to `stop - 1` with
    `stop`: the simulator's stretches between checkpoints); return the last round completed
    (first - 1 if none). `eval_point` is one of `EVAL_POINTS`.

    A stop request mid-round leaves that round incomplete: it is neither logged nor
    checkpointed, so a restarted node runs it again.
    """
    if eval_point not in EVAL_POINTS:
        raise ValueError(f"eval_point must be one of {EVAL_POINTS}, got {eval_point!r}")
    completed = first - 1
    for r in range(first, rounds if stop is None else stop):
        if port.stopping():
            log.info("%s: stopping before round %d", node.node_id, r)
            break
        sampled = node.takes_part(r)
        present = node.exists(r)  # outside its churn window a node neither evaluates nor logs (as in a swarm, where it is not running)
        due = evaluation_due(r, rounds, eval_every) and present
        train = await port.blocking(node.blocking_call(node.train, r)) if sampled else {}
        metrics = await port.blocking(node.blocking_call(node.evaluate)) if due and eval_point != "aggregated" else None
        if metrics is not None and eval_point == "both":
            metrics = {f"{name}{TRAINED_SUFFIX}": value for name, value in metrics.items()}
        await port.send(node, node.start(r) if sampled else node.sit_out(r))
        finished = await port.wait(node, deadline)
        if port.stopping():
            log.info("%s: stopped during round %d; it will run again after a restart", node.node_id, r)
            break
        if not finished:
            log.warning("%s: round %d deadline passed; going on with what arrived", node.node_id, r)
            await port.send(node, node.deadline(r))
        if due and eval_point != "trained":
            metrics = {**(metrics or {}), **await port.blocking(node.blocking_call(node.evaluate))}
            await port.send(node, node.resume())
        if present:
            await port.round_done(node, r, train, metrics)
        completed = r
    return completed
