"""The node daemon: runs one method's rounds over real ZeroMQ sockets.

The method stays sans-IO; this module owns the I/O around it: a transport, heartbeats and
membership, per-round deadlines, checkpoints and the node's run folder. Local training runs
in a worker thread so the node keeps answering peers and heartbeats while it trains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict
from typing import Any

from p2pmoe.experiment import build_experiment
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.base import Method
from p2pmoe.node.checkpoint import load_checkpoint, save_checkpoint
from p2pmoe.node.config import NodeConfig
from p2pmoe.node.membership import Membership
from p2pmoe.node.transport import Transport, TransportError
from p2pmoe.runs import RunFolder
from p2pmoe.wire.codec import Envelope, ProtocolError
from p2pmoe.wire.compression import parse_compression
from p2pmoe.wire.messages import Message, MessageKind, Send

log = logging.getLogger("p2pmoe.node")

CONTROL_KINDS = {MessageKind.HELLO, MessageKind.HEARTBEAT, MessageKind.ERROR}
REQUEST_KINDS = {MessageKind.EXPERT_REQUEST}  # sent with a timeout and retries; the reply goes to the method
MAX_ROUNDS_AHEAD = 2  # messages for later rounds than this are dropped, not held
MAX_BUFFERED_BYTES = 512 * 2**20  # payload held for rounds this node has not reached yet


class NodeDaemon:
    """One node: `await NodeDaemon(cfg).run()` until its rounds are done or it is stopped."""

    def __init__(self, cfg: NodeConfig, method: Method | None = None) -> None:
        self.cfg = cfg
        self.method = method or build_experiment(cfg.experiment, only=cfg.node_id).nodes[cfg.node_id]
        self.ledger = ByteLedger()
        self._ledger_written = 0
        self.round = -1
        self.peer_rounds: dict[str, int] = {}
        self.peers_done: set[str] = set()
        self.done = False
        self._buffered: dict[int, list[Envelope]] = defaultdict(list)
        self._progress = asyncio.Event()
        self._stop = asyncio.Event()
        self.membership = Membership(cfg.peers, cfg.timing.suspect_after, cfg.timing.dead_after)
        self.transport: Transport | None = None
        self._requests: set[asyncio.Task[None]] = set()

    # -- sending ---------------------------------------------------------------------------

    async def _send(self, dst: str, message: Message) -> None:
        assert self.transport is not None
        try:
            await self.transport.send(dst, message)
        except TransportError as exc:
            log.warning("%s: could not send %s to %s: %s", self.cfg.node_id, message.kind.value, dst, exc)

    async def _send_all(self, sends: list[Send]) -> None:
        """In order per destination, concurrently across destinations, so one unreachable
        peer (each send waits up to the transport's send timeout) does not hold up the rest."""
        by_dst: dict[str, list[Message]] = defaultdict(list)
        for send in sends:
            by_dst[send.dst].append(send.message)

        async def to(dst: str, messages: list[Message]) -> None:
            for message in messages:
                if message.kind in REQUEST_KINDS:
                    self._requests.add(asyncio.create_task(self._request(dst, message)))
                else:
                    await self._send(dst, message)

        await asyncio.gather(*(to(dst, messages) for dst, messages in by_dst.items()))
        self._progress.set()

    async def _request(self, dst: str, message: Message) -> None:
        """A request whose reply the transport matches by meta.req, retried on silence."""
        assert self.transport is not None
        try:
            reply = await self.transport.request(dst, message, self.cfg.timing.request_timeout, self.cfg.timing.request_retries)
            await self._dispatch(Envelope(dst, reply))
        except TransportError as exc:
            log.warning("%s: %s to %s failed: %s", self.cfg.node_id, message.kind.value, dst, exc)
        finally:
            self._requests.discard(asyncio.current_task())  # type: ignore[arg-type]

    def _control(self, kind: MessageKind) -> Message:
        return Message(kind, max(self.round, 0), meta={"round": self.round, "done": self.done})

    # -- receiving -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self.transport is not None
        while True:
            envelope = await self.transport.recv()
            try:
                await self._dispatch(envelope)
            except Exception:  # a method bug must not take the node down
                log.exception("%s: error handling %s from %s", self.cfg.node_id, envelope.message.kind.value, envelope.src)

    async def _dispatch(self, envelope: Envelope) -> None:
        src, message = envelope.src, envelope.message
        if src in self.cfg.peers:
            self.membership.seen(src, time.monotonic())
        if message.kind in CONTROL_KINDS:
            if src in self.cfg.peers:  # only configured peers may move our round or liveness
                self._take_control(src, message)
            if message.kind == MessageKind.HELLO and not message.meta.get("reply"):
                await self._send(src, self._reply_to(message, MessageKind.HELLO, {"round": self.round, "done": self.done, "reply": True}))
            return
        if message.round > self.round:
            self._hold(envelope)
            return
        await self._handle(src, message)

    def _hold(self, envelope: Envelope) -> None:
        """Keep a peer's message for a round this node has not started, within bounds."""
        src, message = envelope.src, envelope.message
        size = sum(t.numel() * t.element_size() for t in message.tensors.values())
        held = sum(t.numel() * t.element_size() for group in self._buffered.values() for e in group for t in e.message.tensors.values())
        if src not in self.cfg.peers or message.round > self.round + MAX_ROUNDS_AHEAD or held + size > MAX_BUFFERED_BYTES:
            log.warning("%s: dropping %s from %s for round %d (at round %d)", self.cfg.node_id, message.kind.value, src, message.round, self.round)
            return
        self._buffered[message.round].append(envelope)

    def _reply_to(self, request: Message, kind: MessageKind, meta: dict[str, Any]) -> Message:
        """A reply that carries the request's id (meta.req) when it had one."""
        if "req" in request.meta:
            meta = {**meta, "req": request.meta["req"]}
        return Message(kind, request.round, meta=meta)

    def _take_control(self, src: str, message: Message) -> None:
        if message.kind == MessageKind.ERROR:
            log.warning("%s: %s reports an error: %s", self.cfg.node_id, src, message.meta.get("reason"))
            return
        peer_round = message.meta.get("round")
        if isinstance(peer_round, int):
            self.peer_rounds[src] = peer_round
        if message.meta.get("done") is True:
            self.peers_done.add(src)
            self._progress.set()

    async def _handle(self, src: str, message: Message) -> None:
        try:
            sends = self.method.on_message(src, message)
        except ProtocolError as exc:
            log.warning("%s: rejected %s from %s: %s", self.cfg.node_id, message.kind.value, src, exc)
            await self._send(src, self._reply_to(message, MessageKind.ERROR, {"reason": str(exc), "kind": message.kind.value}))
            return
        await self._send_all(sends)

    # -- liveness --------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            beat = self._control(MessageKind.HEARTBEAT)
            sending = [asyncio.ensure_future(self._send(peer, beat)) for peer in self.cfg.peers]
            if sending:  # a dead peer's send may wait for the transport timeout: don't wait for it
                await asyncio.wait(sending, timeout=self.cfg.timing.heartbeat)
            now = time.monotonic()
            for peer in self.membership.newly_dead(now):
                log.warning("%s: peer %s is gone", self.cfg.node_id, peer)
                await self._send_all(self.method.on_peer_lost(peer))
            for peer in self.membership.revived(now):
                log.info("%s: peer %s is back", self.cfg.node_id, peer)
                await self._send_all(self.method.on_peer_joined(peer))
            await asyncio.sleep(self.cfg.timing.heartbeat)

    async def _wait(self, condition: Any, timeout: float) -> bool:
        """Wait until condition() holds or `timeout` passes; True if it holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                return condition()
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), min(remaining, self.cfg.timing.heartbeat))
            except TimeoutError:
                pass
        return True

    # -- the round loop --------------------------------------------------------------------

    async def _startup(self) -> int:
        """Resume from the checkpoint, greet peers, and pick the first round to run.

        A restarted node continues from its last completed round but never behind the swarm:
        it starts at max(checkpoint round + 1, the highest round a peer reports).
        """
        first = 0
        checkpoint = load_checkpoint(self.cfg.checkpoint_path)
        if checkpoint is not None:
            self.method.load_state_dict(checkpoint.state)
            first = checkpoint.round + 1
            log.info("%s: resumed from %s after round %d", self.cfg.node_id, self.cfg.checkpoint_path, checkpoint.round)
        self.round = first - 1
        await self._send_all([Send(peer, self._control(MessageKind.HELLO)) for peer in self.cfg.peers])
        heard = await self._wait(lambda: set(self.peer_rounds) >= set(self.cfg.peers), self.cfg.timing.startup)
        if not heard:
            log.warning("%s: starting without %s", self.cfg.node_id, sorted(set(self.cfg.peers) - set(self.peer_rounds)))
        return max([first, *self.peer_rounds.values()])

    async def _run_round(self, r: int, folder: RunFolder) -> None:
        stats = await asyncio.to_thread(self.method.train_local, r)
        self.round = r
        await self._send_all(self.method.start_round(r))
        for envelope in self._buffered.pop(r, []):
            await self._handle(envelope.src, envelope.message)
        for stale in [k for k in self._buffered if k < r]:
            del self._buffered[stale]
        if not await self._wait(self.method.round_complete, self.cfg.timing.round_deadline):
            log.warning("%s: round %d deadline passed; going on with what arrived", self.cfg.node_id, r)
            await self._send_all(self.method.on_deadline(r))
        metrics = await asyncio.to_thread(self.method.evaluate)
        # Checkpoint first: a metrics line then always means the round can be resumed after.
        extra = {"node": self.cfg.node_id, "membership": self.membership.table(time.monotonic())}
        await asyncio.to_thread(save_checkpoint, self.cfg.checkpoint_path, r, self.method.state_dict(), extra)
        sent = sum(e.total for e in self.ledger.entries if e.round == r)
        folder.log({"round": r, "node": self.cfg.node_id, **stats, **metrics, "bytes_sent": sent})
        self._flush_ledger(folder)
        log.info("%s: round %d done %s", self.cfg.node_id, r, {k: round(v, 4) for k, v in metrics.items()})

    def _flush_ledger(self, folder: RunFolder) -> None:
        folder.log_messages(self.ledger.entries[self._ledger_written :])
        self._ledger_written = len(self.ledger.entries)

    async def run(self) -> None:
        """Run every remaining round, then linger until peers are done (or `linger` passes)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        self.cfg.out.mkdir(parents=True, exist_ok=True)
        self.transport = Transport(
            self.cfg.node_id, self.cfg.bind, ledger=self.ledger, curve=self.cfg.curve,
            max_inflight_bytes=self.cfg.max_inflight_bytes, round_of=lambda: max(self.round, 0),
            compression=parse_compression(self.cfg.experiment.compression),
        )
        for peer, address in self.cfg.peers.items():
            key = self.cfg.curve.allowed_public_keys.get(peer) if self.cfg.curve else None
            self.transport.add_peer(peer, address, key)
        tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._heartbeat_loop())]
        folder = RunFolder(self.cfg.out, append=True)
        try:
            first = await self._startup()
            for r in range(first, self.cfg.experiment.rounds):
                if self._stop.is_set():
                    log.info("%s: stopping before round %d", self.cfg.node_id, r)
                    break
                await self._run_round(r, folder)
            else:
                self.done = True
                await self._send_all([Send(peer, self._control(MessageKind.HEARTBEAT)) for peer in self.cfg.peers])
                alive = lambda: set(self.membership.alive(time.monotonic())) <= self.peers_done  # noqa: E731
                await self._wait(alive, self.cfg.timing.linger)
        finally:
            for task in [*tasks, *self._requests]:
                task.cancel()
            await asyncio.gather(*tasks, *self._requests, return_exceptions=True)
            self._flush_ledger(folder)
            folder.close()
            await self.transport.close()
