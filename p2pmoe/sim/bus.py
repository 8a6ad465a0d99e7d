"""The simulator's port: every node of a run in one process, messages over an in-memory queue.

Each message is encoded and decoded with the real codec, so the ledger counts the bytes the
daemon would put on the wire, and a message a method could not send over ZeroMQ fails here too.
Nodes run the same `drive_rounds` loop as daemons, as asyncio tasks on one event loop; blocking
calls (training, evaluation) run inline, one node at a time, or with ``workers`` > 1 in a pool
of that many threads, several nodes at once. There is no clock: a node's deadline passes when
nothing can change any more, i.e. every node still running waits for its round and no message
is in flight.

Parallel blocking calls (project decision): torch's global RNG is one per process, so nodes
running at once cannot each have their own stream of it as they do one at a time. With
workers the calls run on the process's stream and the network checks after every call that
the stream is untouched; a method that draws from it (dropout, a noisy gate) stops the run
with `GlobalRNGUsed` rather than give results that depend on thread timing (the check sees
the CPU generator only, so the simulator runs workers on the CPU only). Methods combine what
arrives in client order, never arrival order (the swarm relies on it too), so a run with
workers gives the metrics and byte counts of a one-at-a-time run with the same torch threads
per call. Only the order of lines in metrics.jsonl and the ledger may differ.

Message phases (the causal depth that `sim_seconds` is built from): a node's sends at the
start of its round are phase 0, a reply is one more than what it answers. A message that
reaches a node still training, or not yet in the message's round, waits in its runner; it
keeps its phase there and the runner marks what answers it (`CausedSend`), so phases, and
the simulated time, do not depend on which node happened to run first: not with workers, not
after a checkpoint (`p2pmoe.sim.resume`), not in round 0.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import nn

from p2pmoe.driver.rounds import drive_rounds
from p2pmoe.driver.runner import CausedSend, NodeRunner, request_id
from p2pmoe.driver.summary import Row, metrics_row
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.attacks import Adversary
from p2pmoe.methods.base import Method, SendFailure
from p2pmoe.runs import RunFolder
from p2pmoe.wire.codec import DEFAULT_LIMITS, Limits, decode, encode, frame_sizes
from p2pmoe.wire.messages import Send

T = TypeVar("T")


class RoundStalled(RuntimeError):
    """Nodes still waited after their deadline: a method that never finishes its round."""


class GlobalRNGUsed(ValueError):
    """A method drew from torch's global RNG while nodes ran in parallel (see the module doc):
    a setting that cannot work, hence a ValueError (the command line prints one line)."""


def random_module(model: nn.Module) -> str | None:
    """The first submodule of `model` that draws from torch's global RNG in training (dropout
    with a positive rate, as a module or as a `dropout` rate it applies itself), else None.

    Lets a parallel simulation refuse before round 0 what `blocking` would catch only after
    the first training call (issue 28). A model drawing in another way is still caught there.
    """
    for name, module in model.named_modules():
        rate = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else getattr(module, "dropout", None)
        if isinstance(rate, float | int) and not isinstance(rate, bool) and rate > 0:
            return f"{type(model).__name__}.{name}" if name else type(model).__name__
    return None


class SimNetwork:
    """An in-memory network of `NodeRunner`s that is also each node's `Port`."""

    def __init__(
        self,
        nodes: Mapping[str, Method],
        ledger: ByteLedger | None = None,
        seeds: Mapping[str, int] | None = None,
        accounting: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        compression: Mapping[str, str] | None = None,
        folder: RunFolder | None = None,
        on_round: Callable[[Row], None] | None = None,
        workers: int = 1,
        adversaries: Mapping[str, Adversary] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.runners = {
            node: NodeRunner(
                node,
                method,
                strict=True,
                seed=(seeds or {}).get(node, 0),
                accounting=accounting,
                fork_rng=workers == 1,
                adversary=(adversaries or {}).get(node),
            )
            for node, method in nodes.items()
        }
        self.ledger = ledger if ledger is not None else ByteLedger()
        self.limits = limits
        self.compression = dict(compression or {})
        self.folder = folder
        self.on_round = on_round
        self.rows: list[Row] = []
        self._queue: deque[tuple[str, Send, int]] = deque()
        self._draining = False
        self._deepest: dict[int, int] = {}
        self._late: set[str] = set()
        self._running = 0
        self._waiting: dict[str, asyncio.Future[bool]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._rng_at_start = torch.get_rng_state()

    # -- Port --------------------------------------------------------------------------------------

    async def send(self, node: NodeRunner, sends: list[Send]) -> None:
        phase = 0
        if node.node_id in self._late:  # sent on the deadline: after everything the round carried
            self._late.discard(node.node_id)
            phase = self._deepest.get(node.round, -1) + 1
        self._queue.extend((node.node_id, send, max(phase, send.phase) if isinstance(send, CausedSend) else phase) for send in sends)
        self._drain()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            return fn(*args)
        out = await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        if not torch.equal(torch.get_rng_state(), self._rng_at_start):
            name = getattr(fn, "__qualname__", repr(fn))
            raise GlobalRNGUsed(f"{name} drew from torch's global random generator, which the nodes of a parallel simulation share; run with --workers 1")
        return out

    async def wait(self, node: NodeRunner, timeout: float) -> bool:
        while not node.round_complete():
            if len(self._waiting) + 1 >= self._running:  # everyone else waits too: nothing can change
                self._stall()
                self._late.add(node.node_id)
                return node.round_complete()
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._waiting[node.node_id] = future
            if not await future:
                self._late.add(node.node_id)
                return node.round_complete()
        return True

    def stopping(self) -> bool:
        return False

    async def round_done(self, node: NodeRunner, round_index: int, train: dict[str, float], metrics: dict[str, float] | None) -> None:
        traffic = self.ledger.node_traffic(node.node_id, round_index)
        row = metrics_row(node.node_id, round_index, train, metrics, traffic["sent"], traffic["received"], node.diagnostics())
        if self.folder is not None:
            self.folder.log(row)
            # Written out: the summary never reads a row's diagnostics, and FedMoE-DA's (plan and
            # gate, ~6 KB of JSON per node and round) were most of a 10,000-node run's memory.
            row.pop("diagnostics", None)
        self.rows.append(row)
        if self.on_round is not None:
            self.on_round(row)

    # -- running -----------------------------------------------------------------------------------

    async def _drive(self, node: NodeRunner, first: int, rounds: int, eval_every: int, stop: int | None, eval_point: str) -> None:
        try:
            await drive_rounds(node, self, first, rounds, eval_every, deadline=float("inf"), stop=stop, eval_point=eval_point)
        finally:
            self._running -= 1
            if self._waiting and len(self._waiting) >= self._running:
                self._stall()

    async def run(self, rounds: int, eval_every: int = 1, first: int = 0, stop: int | None = None, eval_point: str = "aggregated") -> list[Row]:
        """Run every node's rounds `first`..`rounds - 1` (`stop - 1` with `stop`) of a
        `rounds`-round run; return all rows so far. When it returns, every node has finished
        the same round and no message is in flight or held: a consistent cut to checkpoint."""
        self._running = len(self.runners)
        tasks = [asyncio.ensure_future(self._drive(node, first, rounds, eval_every, stop, eval_point)) for node in self.runners.values()]
        if self.workers > 1:
            self._rng_at_start = torch.get_rng_state()
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="p2pmoe-sim")
        try:
            await asyncio.gather(*tasks)
        finally:
            # On an error the other nodes stop, calls still queued in the pool never start (a
            # whole round of training otherwise), and the process's RNG stream is as before.
            for task in tasks:
                task.cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
                torch.set_rng_state(self._rng_at_start)
        return self.rows

    def run_round(self, round_index: int) -> dict[str, dict[str, float]]:
        """One round of every node (tests of a method); returns each node's training statistics."""
        start = len(self.rows)
        asyncio.run(self.run(round_index + 1, eval_every=10**9, first=round_index))
        stalled = [n for n, r in self.runners.items() if not r.round_complete()]
        if stalled:
            raise RoundStalled(f"round {round_index}: nodes {stalled} did not complete after their deadline")
        return {row["node"]: row["train"] for row in self.rows[start:]}

    # -- internals ---------------------------------------------------------------------------------

    def _stall(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_result(False)

    def _wake(self, touched: set[str]) -> None:
        """Let the waiting nodes that got a call recheck their round: a method's state changes
        only through calls, so nobody else needs waking (thousands of nodes stay O(messages))."""
        for node in touched & self._waiting.keys():
            future = self._waiting.pop(node)
            if not future.done():
                future.set_result(True)

    def _drain(self) -> None:
        """Deliver until the queue is empty (re-entrant calls just enqueue)."""
        if self._draining:
            return
        self._draining = True
        touched: set[str] = set()
        try:
            while self._queue:
                src, send, phase = self._queue.popleft()
                origin, replies = self._deliver(src, send, phase)
                touched.add(origin)
                self._queue.extend((origin, reply, phase + 1) for reply in replies)
        finally:
            self._draining = False
        self._wake(touched)

    def _deliver(self, src: str, send: Send, phase: int) -> tuple[str, list[Send]]:
        """Move one message; return who answers and with what (the sender itself when the
        destination does not exist: its method hears of the failure)."""
        message = send.message
        runner = self.runners.get(send.dst)
        if runner is None:
            failure = SendFailure(message.kind, message.round, f"no node {send.dst!r} in this run", "unreachable", request_id(message))
            return src, self.runners[src].failed(send.dst, failure)
        frames = encode(src, message, self.limits, self.compression)
        self.ledger.record(message.round, src, send.dst, message.kind.value, *frame_sizes(frames), phase=phase)
        self._deepest[message.round] = max(self._deepest.get(message.round, -1), phase)
        envelope = decode(frames, self.limits)
        return send.dst, runner.deliver(envelope.src, envelope.message, phase)
