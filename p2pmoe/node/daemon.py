"""The node daemon: one method's rounds over real ZeroMQ sockets.

The round loop is the driver's (`p2pmoe.driver.rounds.drive_rounds`, the same the simulator
runs); this module is its ZeroMQ port and what only a real node has: heartbeats and membership,
the start-up handshake (peers must run the same experiment), deadlines on the clock,
checkpoints and the node's run folder. Training runs in a worker thread so the node keeps
answering peers and heartbeats while it trains; deliveries meanwhile wait in the `NodeRunner`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar, cast

import zmq

from p2pmoe.driver.rounds import drive_rounds
from p2pmoe.driver.runner import NodeRunner, RateLimitedLog, clip, error_reply, request_id
from p2pmoe.driver.summary import metrics_row
from p2pmoe.experiment import build_experiment
from p2pmoe.fsio import atomic_write_json
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.base import Method, SendFailure
from p2pmoe.naming import SERVER_ID
from p2pmoe.node.checkpoint import load_checkpoint, save_checkpoint
from p2pmoe.node.config import NodeConfig
from p2pmoe.node.mdns import MdnsPeers
from p2pmoe.node.membership import Membership
from p2pmoe.node.metrics import DaemonState, MetricsServer
from p2pmoe.node.status import ask
from p2pmoe.node.transport import PeerUnreachable, RequestTimeout, Transport, TransportClosed, TransportError
from p2pmoe.report.tables import round_ranges
from p2pmoe.runs import NODE_FILE, RunFolder
from p2pmoe.settings import config_differences
from p2pmoe.trackers import open_trackers
from p2pmoe.wire.codec import Envelope
from p2pmoe.wire.compression import parse_compression
from p2pmoe.wire.messages import Message, MessageKind, Send

log = logging.getLogger("p2pmoe.node")
T = TypeVar("T")

CONTROL_KINDS = {MessageKind.HELLO, MessageKind.HEARTBEAT}
REQUEST_KINDS = {MessageKind.EXPERT_REQUEST}  # sent with a timeout and retries; the reply goes to the method


def agreed_round(peer_rounds: dict[str, int], configured: int) -> int:
    """The latest round that enough configured peers report having reached to be believed: the
    coordinator's word alone (it runs every round with everyone), else the round that a
    majority of the configured peers, and at least two of them, are at or past. One peer's word
    never moves a node ahead (issue 26 N5: a single liar claiming round 48 of 50 made a fresh
    node skip the run). -1 when there is no such round."""
    if SERVER_ID in peer_rounds:
        return peer_rounds[SERVER_ID]
    quorum = max(2, configured // 2 + 1)
    rounds = sorted(peer_rounds.values(), reverse=True)
    return rounds[quorum - 1] if len(rounds) >= quorum else -1


STATUS_EVERY = 0.5  # seconds a computed status answer is reused
MAX_ADDRESS_CHARS = 256  # a roster address longer than this is ignored (peer data)


def dialable(address: object) -> bool:
    """A peer-given address this node may dial: tcp://HOST:PORT with a port number, at most
    MAX_ADDRESS_CHARS long (ipc:// only names this machine's files: never from a peer)."""
    if not isinstance(address, str) or len(address) > MAX_ADDRESS_CHARS or not address.startswith("tcp://"):
        return False
    host, _, port = address[len("tcp://") :].rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536 and not any(c.isspace() for c in host)


SILENT_PEER_SEND_TIMEOUT = 1.0  # seconds a message waits for a connection to a peer that has gone quiet


class NodeDaemon:
    """One node: `await NodeDaemon(cfg).run()` until its rounds are done or it is stopped."""

    def __init__(self, cfg: NodeConfig, method: Method | None = None) -> None:
        cfg.check_plaintext_bind()
        self.cfg = cfg
        experiment = cfg.experiment  # resolved where the config was read
        self.rounds = experiment.run.rounds
        self.config_hash = experiment.config_hash
        self._canonical = experiment.canonical
        if method is None:
            built = build_experiment(experiment, only=cfg.node_id)
            built.task.release_data()  # this process builds no other learner: keep only its own split
            method = built.nodes[cfg.node_id]
        self.runner = NodeRunner(cfg.node_id, method, seed=experiment.node_seed(cfg.node_id), adversary=experiment.adversary(cfg.node_id))
        self.ledger = ByteLedger()
        self._ledger_written = 0
        self.peer_rounds: dict[str, int] = {}
        self.peers_done: set[str] = set()
        self.refused_peers: dict[str, list[str]] = {}
        self.done = False
        self._progress = asyncio.Event()
        self._stop = asyncio.Event()
        self.membership = Membership(cfg.peers, cfg.timing.suspect_after, cfg.timing.dead_after)
        self.transport: Transport | None = None
        self._requests: set[asyncio.Task[None]] = set()
        self._folder: RunFolder | None = None
        self._received: dict[int, int] = defaultdict(int)
        self._noise = RateLimitedLog(logger=log)
        self.rounds_done = 0
        self.last_metrics: dict[str, float] = {}
        self.thin_rounds: list[int] = []  # rounds run with fewer than min_peers live peers
        self._heard_before: set[str] = set()  # peers heard by this node's run before a restart (from its checkpoint)
        self.failures: list[str] = []  # what the run did not do that was asked (the command exits non-zero)
        self.compute_seconds: dict[str, float] = defaultdict(float)  # /metrics: wall seconds in training and evaluation
        self.requests = (0, 0.0)  # /metrics: request round trips so far, (count, seconds)
        self.refusals = 0  # messages refused here (the transport counts its own)
        self.events: list[dict[str, Any]] = []  # peers found, lost and back, with the wall time (node.json)
        self._started = round(time.time(), 3)
        self.metrics: MetricsServer | None = None
        self._status: tuple[float, dict[str, Any]] | None = None
        # who is where: this node, its configured peers, and whatever `roster` requests taught it
        self.roster: dict[str, str] = {cfg.node_id: cfg.advertise or cfg.bind, **cfg.peers}
        self._members = set(experiment.node_ids)
        self.window = experiment.window(cfg.node_id)  # (join round, leave round or None) of a churn schedule
        self._join_ids: dict[str, str] = {}  # a bare --join address -> the id that answered there

    # -- Port (see p2pmoe.driver.rounds) -----------------------------------------------------------

    async def send(self, node: NodeRunner, sends: list[Send]) -> None:
        """In order per destination, concurrently across destinations, so one unreachable
        peer (each send waits up to the transport's send timeout) does not hold up the rest."""
        by_dst: dict[str, list[Message]] = defaultdict(list)
        for item in sends:
            by_dst[item.dst].append(item.message)

        async def to(dst: str, messages: list[Message]) -> None:
            for message in messages:
                if message.kind in REQUEST_KINDS:
                    task = asyncio.create_task(self._request(dst, message))
                    self._requests.add(task)
                    task.add_done_callback(self._requests.discard)
                else:
                    await self._send_one(dst, message)

        await asyncio.gather(*(to(dst, messages) for dst, messages in by_dst.items()))
        self._progress.set()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:  # the driver's blocking calls are the runner's train and evaluate: what /metrics reports as compute
            self.compute_seconds[getattr(getattr(fn, "func", fn), "__name__", "other")] += time.perf_counter() - started

    async def wait(self, node: NodeRunner, timeout: float) -> bool:
        return await self._wait(node.round_complete, timeout)

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _event(self, peer: str, what: str) -> None:
        self.events.append({"time": round(time.time(), 3), "peer": peer, "event": what})

    def _write_node_file(self, finished: bool) -> None:
        """`node.json` in the run folder: what `p2pmoe report` needs to merge a LAN run's
        per-node folders (the setting, when this node ran, who it lost and found, what failed)."""
        state = {
            "node": self.cfg.node_id,
            "config_hash": self.config_hash,
            "setting": self.cfg.experiment.cfg.to_dict(),
            "peers": dict(self.cfg.peers),
            "started": self._started,
            "finished": round(time.time(), 3) if finished else None,
            "rounds_done": self.rounds_done,
            "failures": self.failures,
            "events": self.events,
        }
        atomic_write_json(self.cfg.out / NODE_FILE, state)

    def _failures(self) -> list[str]:
        """Issue 29: every process exited 0 when a peer never came or a node trained alone. A
        peer heard before a restart counts as reached: a client restarted after its server
        finished the run ran its remaining rounds alone, as designed."""
        failures = []
        unfound = sorted(self.cfg.discover - set(self.cfg.peers))
        if unfound:
            failures.append(f"never learnt where topology neighbour(s) {', '.join(unfound)} are: check --join and that they were started")
        never = [peer for peer in self.membership.never_heard() if peer not in self._heard_before]
        if never:
            failures.append(f"never reached configured peer(s) {', '.join(never)}: check their addresses, ports and keys")
        if self.thin_rounds:
            failures.append(f"ran rounds {round_ranges(self.thin_rounds)} with fewer than min_peers = {self.cfg.min_peers} live peers")
        return failures

    def _serve_metrics(self) -> MetricsServer | None:
        """Prometheus /metrics when the config asks for it, read from this daemon's own state."""
        if self.cfg.metrics_port is None:
            return None
        transport = self.transport
        assert transport is not None

        state = DaemonState(
            node=self.cfg.node_id,
            round=lambda: self.runner.round,
            rounds_done=lambda: self.rounds_done,
            sent=lambda: self.ledger.entries,
            received=lambda: transport.bytes_received,
            peers=lambda: {peer: self.membership.state(peer, time.monotonic()) for peer in self.cfg.peers},
            last_metrics=lambda: self.last_metrics,
            compute_seconds=lambda: dict(self.compute_seconds),
            requests=lambda: self.requests,
            refused=lambda: self.refusals + transport.refused,
        )
        server = MetricsServer(state, self.cfg.metrics_port, self.cfg.metrics_addr)
        log.info("%s: Prometheus metrics at http://%s:%d/metrics", self.cfg.node_id, self.cfg.metrics_addr, server.port)
        return server

    async def round_done(self, node: NodeRunner, round_index: int, train: dict[str, float], metrics: dict[str, float] | None) -> None:
        """Checkpoint first: a metrics line then always means the round can be resumed after."""
        extra = {"node": self.cfg.node_id, "membership": self.membership.table(time.monotonic()), "config_hash": self.config_hash}
        await asyncio.to_thread(save_checkpoint, self.cfg.checkpoint_path, round_index, node.state_dict(), extra)
        sent = sum(e.total for e in self.ledger.entries[self._ledger_written :] if e.round == round_index)
        assert self._folder is not None
        received = self._received.pop(round_index, 0)
        row = metrics_row(self.cfg.node_id, round_index, train, metrics, sent, received, node.diagnostics())
        self._folder.log({**row, "time": round(time.time(), 3)})  # wall clock: the report's per-node timeline
        self.rounds_done += 1
        if len(self.membership.alive(time.monotonic())) < self.cfg.min_peers:
            self.thin_rounds.append(round_index)
        if metrics:
            self.last_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self._flush_ledger()
        shown = {k: round(v, 4) for k, v in {**train, **(metrics or {})}.items() if isinstance(v, int | float) and not k.startswith("valid_")}
        alive = len(self.membership.alive(time.monotonic()))
        log.info(
            "%s: round %d done %s; sent %d B, received %d B; %d/%d peers alive",
            self.cfg.node_id,
            round_index,
            shown,
            sent,
            received,
            alive,
            len(self.cfg.peers),
        )

    # -- sending -----------------------------------------------------------------------------------

    async def _send_one(self, dst: str, message: Message) -> None:
        """Send, failing into the method on error. A configured peer not heard from for
        `suspect_after` gets `SILENT_PEER_SEND_TIMEOUT` to take a message, a dead one none (one
        try), not the transport's send timeout: every round waited 10 s per message for a peer
        that never came."""
        assert self.transport is not None
        state = self.membership.state(dst, time.monotonic()) if dst in self.cfg.peers else "alive"
        timeout = {"alive": None, "suspect": SILENT_PEER_SEND_TIMEOUT, "dead": 0.0}[state]  # a dead peer costs no wait at all
        try:
            await self.transport.send(dst, message, timeout)
        except TransportClosed:
            log.debug("%s: %s to %s dropped: the transport is closing", self.cfg.node_id, message.kind.value, dst)
        except TransportError as exc:
            if message.kind in (MessageKind.HELLO, MessageKind.HEARTBEAT, MessageKind.ERROR, MessageKind.ROSTER, MessageKind.STATUS):
                self._noise.warning(f"send:{dst}", "%s: could not send %s to %s: %s", self.cfg.node_id, message.kind.value, dst, exc)
                return
            await self.send(self.runner, self.runner.failed(dst, SendFailure(message.kind, message.round, str(exc), "unreachable", request_id(message))))

    async def _request(self, dst: str, message: Message) -> None:
        """A request whose reply the transport matches by meta.req, retried on silence; a
        timeout or an unreachable peer reaches the method as a failure."""
        assert self.transport is not None
        started = time.perf_counter()
        try:
            reply = await self.transport.request(dst, message, self.cfg.timing.request_timeout, self.cfg.timing.request_retries)
            self.requests = (self.requests[0] + 1, self.requests[1] + time.perf_counter() - started)
        except TransportError as exc:
            cause = "timeout" if isinstance(exc, RequestTimeout) else "unreachable" if isinstance(exc, PeerUnreachable) else "failed"
            await self.send(self.runner, self.runner.failed(dst, SendFailure(message.kind, message.round, str(exc), cause, request_id(message))))
            return
        await self._dispatch(Envelope(dst, reply))

    @staticmethod
    def _req_of(message: Message) -> dict[str, Any]:
        """The request id to copy into a reply, if the message had one."""
        return {"req": message.meta["req"]} if "req" in message.meta else {}

    def status(self) -> dict[str, Any]:
        """What `p2pmoe status` shows (issue 29): round, peers' liveness, bytes, refusals, the
        last metrics. Recomputed at most every STATUS_EVERY seconds, so a flood of status
        requests costs one pass over the ledger per interval, not one per request."""
        now = time.monotonic()
        if self._status is not None and now - self._status[0] < STATUS_EVERY:
            return self._status[1]
        sent: dict[str, int] = defaultdict(int)
        for entry in self.ledger.entries:
            sent[entry.kind] += entry.total
        table = self.membership.table(now)
        status = {
            "node": self.cfg.node_id,
            "method": self.cfg.experiment.run.method,
            "round": self.runner.round,
            "rounds": self.rounds,
            "rounds_done": self.rounds_done,
            "done": self.done,
            "peers": {peer: {"state": row["state"], "silence_s": round(cast(float, row["silence"]), 1)} for peer, row in table.items()},
            "sent_bytes": dict(sorted(sent.items())),
            "received_bytes": sum(self.transport.bytes_received.values()) if self.transport is not None else 0,
            "refused": sorted(self.refused_peers),
            "metrics": dict(self.last_metrics),
            "roster": dict(self.roster),
        }
        self._status = (now, status)
        return status

    def _control(self, kind: MessageKind, reply: bool = False) -> Message:
        meta: dict[str, Any] = {"round": self.runner.round, "done": self.done, "config": self.config_hash}
        if kind == MessageKind.HELLO:
            meta["setting"] = self._canonical
            meta["address"] = self.roster[self.cfg.node_id]
        if reply:
            meta["reply"] = True
        return Message(kind, max(self.runner.round, 0), meta=meta)

    # -- receiving ---------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self.transport is not None
        while True:
            envelope = await self.transport.recv()
            try:
                await self._dispatch(envelope)
            except Exception:  # a bug here must not take the node down
                log.exception("%s: error handling %s from %s", self.cfg.node_id, envelope.message.kind.value, envelope.src)

    async def _dispatch(self, envelope: Envelope) -> None:
        src, message = envelope.src, envelope.message
        configured = src in self.cfg.peers
        if message.kind == MessageKind.STATUS:  # `p2pmoe status`: answered, never counted as a sign of life
            if message.meta.get("reply") is not True:
                await self._send_one(
                    src, Message(MessageKind.STATUS, max(self.runner.round, 0), meta={"reply": True, **self._req_of(message), "status": self.status()})
                )
            return
        if message.kind == MessageKind.ROSTER:  # `--join`: who is where, answered to any node of the same experiment
            if message.meta.get("reply") is not True and src in self._members and self._same_experiment(src, message):
                self._learn(message.meta.get("roster"), src, adopt=False)  # the asker's own address goes into the answer
                roster = Message(MessageKind.ROSTER, max(self.runner.round, 0), meta={"reply": True, **self._req_of(message), **self._roster_meta()})
                await self._send_one(src, roster)  # first: once the asker is a peer, replies would take our link, not its connection
                self._learn({}, src)
            return
        if message.kind in CONTROL_KINDS:
            said = message.meta.get("address")
            if configured and self.cfg.curve is not None and src in self.cfg.discover and dialable(said) and said != self.cfg.peers[src]:
                # under CURVE a hello is the peer's own, authenticated word: re-point a link someone
                # else's roster or announcement sent to the wrong address
                self.roster[src] = str(said)
                self.cfg = dataclasses.replace(self.cfg, peers={k: v for k, v in self.cfg.peers.items() if k != src})
                self._adopt(src, str(said))
                configured = src in self.cfg.peers
            if not configured and src in self.cfg.discover and self._same_experiment(src, message):
                self._learn({src: message.meta.get("address")}, src)  # a neighbour that found us first says where it is
                configured = src in self.cfg.peers
            if configured and self._same_experiment(src, message):
                self.membership.seen(src, time.monotonic())
                self._take_control(src, message)
            if message.kind == MessageKind.HELLO and message.meta.get("reply") is not True:
                answer = self._control(MessageKind.HELLO, reply=True)
                answer.meta.update(self._req_of(message))  # a hello with a request id doubles as a ping
                await self._send_one(src, answer)
            return
        if src in self.refused_peers:
            # one key for every sender: per-sender keys would let strangers with fresh ids log without limit
            self.refusals += 1
            self._noise.warning("refused", "%s: ignoring %s from %s, which runs another experiment", self.cfg.node_id, message.kind.value, clip(src))
            return
        if configured:
            self.membership.seen(src, time.monotonic())
        elif self.runner.would_hold(message):
            # Only configured peers' messages wait for later (PROTOCOL.md §7): a stranger must not
            # fill the holding budget that the real peers' early messages need (issue 26 N3).
            self._noise.warning(
                "unconfigured-held", "%s: refused %s from %s: only configured peers' messages are held", self.cfg.node_id, message.kind.value, clip(src)
            )
            self.refusals += 1
            await self._send_one(src, error_reply(message, "only configured peers' messages are held for later rounds"))
            return
        self._received[message.round] += sum(t.numel() * t.element_size() for t in message.tensors.values())
        await self.send(self.runner, self.runner.deliver(src, message))

    def _same_experiment(self, src: str, message: Message) -> bool:
        """A peer's HELLO and heartbeats carry its config hash; a peer running another experiment
        (another seed, another split, another method option) is refused, with the keys named."""
        theirs = message.meta.get("config")
        if theirs == self.config_hash:
            self.refused_peers.pop(src, None)
            return True
        if src not in self.refused_peers or (message.kind == MessageKind.HELLO and "setting" in message.meta):
            keys = config_differences(self._canonical, message.meta.get("setting")) if "setting" in message.meta else ["<config hash>"]
            if self.refused_peers.get(src) != keys:
                self._noise.error(
                    "refused-experiment",
                    "%s: refusing %s: it runs another experiment; keys that differ: %s",
                    self.cfg.node_id,
                    clip(src),
                    clip(", ".join(keys)),
                )
            self.refused_peers[src] = keys
        return False

    def _take_control(self, src: str, message: Message) -> None:
        peer_round = message.meta.get("round")
        if type(peer_round) is int and -1 <= peer_round < self.rounds:  # a round outside the run is ignored
            self.peer_rounds[src] = peer_round
        if message.meta.get("done") is True:
            self.peers_done.add(src)
        self._progress.set()

    # -- liveness ----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            beat = self._control(MessageKind.HEARTBEAT)
            sending = [asyncio.ensure_future(self._send_one(peer, beat)) for peer in self.cfg.peers]
            if sending:  # a dead peer's send may wait for the transport timeout: don't wait for it
                await asyncio.wait(sending, timeout=self.cfg.timing.heartbeat)
            now = time.monotonic()
            for peer in self.membership.newly_dead(now):
                log.warning("%s: peer %s is gone", self.cfg.node_id, peer)
                self._event(peer, "lost")
                await self.send(self.runner, self.runner.peer_lost(peer))
            for peer in self.membership.revived(now):
                log.info("%s: peer %s is back", self.cfg.node_id, peer)
                self._event(peer, "back")
                await self.send(self.runner, self.runner.peer_joined(peer))
            await asyncio.sleep(self.cfg.timing.heartbeat)

    async def _wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until condition() holds or `timeout` passes (or a stop); True if it holds."""
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

    # -- discovery (`--join`) -----------------------------------------------------------------------

    def _roster_meta(self) -> dict[str, Any]:
        return {"config": self.config_hash, "roster": dict(self.roster)}

    def _learn(self, entries: object, src: str, adopt: bool = True) -> None:
        """Merge a peer's roster (untrusted: ids of this experiment only, addresses as the
        protocol writes them). A node's word about its own address replaces what we had; a
        third party's only fills a gap. Topology neighbours learnt here are connected at once."""
        for node, address in (entries if isinstance(entries, dict) else {}).items():
            if node not in self._members or node == self.cfg.node_id or not dialable(address):
                continue
            if (node == src and node not in self.cfg.peers) or node not in self.roster:  # a linked peer's address stays as it is
                self.roster[node] = address
        for peer in sorted(self.cfg.discover - set(self.cfg.peers)) if adopt else ():
            if peer in self.roster:
                self._adopt(peer, self.roster[peer])

    def _adopt(self, peer: str, address: str) -> None:
        """`peer`, a topology neighbour whose address was just learnt, becomes a configured peer."""
        assert self.transport is not None
        key = self.cfg.curve.allowed_public_keys.get(peer) if self.cfg.curve else None
        try:
            self.transport.add_peer(peer, address, key)
        except (zmq.ZMQError, ValueError) as exc:  # an address libzmq refuses: forget it, wait for a better one
            self._noise.warning(f"adopt:{peer}", "%s: cannot dial %s at %s: %s", self.cfg.node_id, peer, clip(address), exc)
            self.roster.pop(peer, None)
            return
        self.cfg = dataclasses.replace(self.cfg, peers={**self.cfg.peers, peer: address})
        self.membership.add(peer)
        log.info("%s: found %s at %s", self.cfg.node_id, peer, address)
        self._event(peer, "found")
        self._progress.set()

    def _bytes_from(self, sender: str) -> None:
        """The transport read a ZeroMQ message from `sender` (a chunk of a big expert, say): a
        configured peer of this experiment that is sending is alive, even while its heartbeats
        wait behind its chunks on a slow link (issue 26 N8)."""
        if sender in self.cfg.peers and sender not in self.refused_peers:
            self.membership.seen(sender, time.monotonic())

    def _heard_by_mdns(self, node: str, address: str, config: str) -> None:
        """An mDNS announcement, unauthenticated even under CURVE (anyone on the LAN may
        announce any id): it only fills a gap, like a third party's roster entry."""
        if config == self.config_hash:
            self._learn({node: address}, "")

    async def _ask_members(self) -> None:
        """One `roster` request to each `--join` member: over a one-off connection while its id
        is unknown or it is not a peer of ours, over our link to it once it is (a one-off
        connection with our routing id would take that link's place)."""
        assert self.transport is not None
        for target in self.cfg.join:
            named, _, address = target.rpartition("=")
            member = named or self._join_ids.get(target, "")
            try:
                if member in self.cfg.peers:
                    message = Message(MessageKind.ROSTER, max(self.runner.round, 0), meta=self._roster_meta())
                    reply = await self.transport.request(member, message, self.cfg.timing.heartbeat, retries=0)
                    self._learn(reply.meta.get("roster"), member)
                    continue
                curve = None
                if self.cfg.curve is not None:
                    public, secret = self.cfg.curve.keypair()
                    curve = (public, secret, self.cfg.curve.allowed_public_keys[member])
                message = Message(MessageKind.ROSTER, max(self.runner.round, 0), meta={"req": 1, **self._roster_meta()})
                envelope = await asyncio.to_thread(ask, address, message, self.cfg.node_id, self.cfg.timing.heartbeat, curve)
            except (TransportError, ValueError) as exc:
                self._noise.warning(f"join:{target}", "%s: no roster from %s yet: %s", self.cfg.node_id, clip(target), exc)
                continue
            if named and envelope.src != named:  # the member answering must be the one named
                self._noise.warning(f"join:{target}", "%s: %s answered as %s, not %s", self.cfg.node_id, address, clip(envelope.src), named)
                continue
            if envelope.src in self._members and envelope.message.meta.get("config") == self.config_hash:
                self._join_ids[target] = envelope.src
                self._learn(envelope.message.meta.get("roster"), envelope.src)

    async def _discover(self) -> None:
        """Find the addresses of this node's topology neighbours before its first round: ask the
        `--join` members until every neighbour is known or the start-up wait is over (a node
        without `--join` is a first member: it learns its neighbours as they ask it)."""
        deadline = time.monotonic() + self.cfg.timing.startup
        missing = lambda: self.cfg.discover - set(self.cfg.peers)  # noqa: E731
        if not self.cfg.join:
            log.info("%s: waiting for %s to join at %s", self.cfg.node_id, sorted(missing()), self.roster[self.cfg.node_id])
        while missing() and time.monotonic() < deadline and not self._stop.is_set():
            await self._ask_members()
            await self._wait(lambda: not missing(), min(self.cfg.timing.heartbeat, max(deadline - time.monotonic(), 0)))
        if missing():
            log.warning("%s: never learnt where %s are; going on without them", self.cfg.node_id, sorted(missing()))

    # -- the run -----------------------------------------------------------------------------------

    async def _startup(self) -> int:
        """Resume from the checkpoint, greet peers, and pick the first round to run.

        A restarted node continues after its last completed round but never behind the swarm:
        it starts at the round that a quorum of configured peers running the same experiment
        report (`agreed_round`), or its coordinator alone, if that is later (peers' rounds
        outside the run are ignored; the jump is logged).
        """
        first = 0
        checkpoint = load_checkpoint(self.cfg.checkpoint_path)
        if checkpoint is not None:
            saved = checkpoint.extra.get("config_hash")
            if saved is not None and saved != self.config_hash:
                raise ValueError(
                    f"{self.cfg.checkpoint_path} belongs to another experiment "
                    f"(config hash {saved[:12]}..., this node's {self.config_hash[:12]}...); move it away to start afresh"
                )
            self.runner.load_state_dict(checkpoint.state)
            earlier = checkpoint.extra.get("membership")  # peers this node heard before it was stopped count as reached
            if isinstance(earlier, dict):
                self._heard_before = {p for p, row in earlier.items() if isinstance(row, dict) and row.get("last_seen") is not None}
            first = checkpoint.round + 1
            log.info("%s: resumed from %s after round %d", self.cfg.node_id, self.cfg.checkpoint_path, checkpoint.round)
        self.runner.round = first - 1
        hello = self._control(MessageKind.HELLO)
        saying = [asyncio.ensure_future(self._send_one(peer, hello)) for peer in self.cfg.peers]
        if saying:  # as heartbeats: a peer that is not up yet must not hold the wait for the others
            await asyncio.wait(saying, timeout=self.cfg.timing.heartbeat)
        first = max(first, self.window[0])  # a node scheduled to join later starts at its join round
        # peers scheduled to join after this node's first round are not waited for (churn)
        present = {peer for peer in self.cfg.peers if self.cfg.experiment.window(peer)[0] <= first}
        heard = await self._wait(lambda: set(self.peer_rounds) >= present, self.cfg.timing.startup)
        if not heard:
            log.warning("%s: starting without %s", self.cfg.node_id, sorted(present - set(self.peer_rounds)))
        ahead = max(first, agreed_round(self.peer_rounds, len(present)))
        if ahead > first:
            log.info("%s: peers are at round %d; joining there instead of round %d", self.cfg.node_id, ahead, first)
        return ahead

    def _flush_ledger(self) -> None:
        if self._folder is not None:
            self._folder.log_messages(self.ledger.entries[self._ledger_written :])
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
        run = self.cfg.experiment.run
        trackers = open_trackers(run.tensorboard, run.mlflow, self.cfg.node_id, self._canonical)  # a missing package: an error before anything binds
        self.transport = Transport(
            self.cfg.node_id,
            self.cfg.bind,
            ledger=self.ledger,
            curve=self.cfg.curve,
            max_inflight_bytes=self.cfg.max_inflight_bytes,
            round_of=lambda: max(self.runner.round, 0),
            compression=parse_compression(self.cfg.experiment.run.compression),
            heard=self._bytes_from,
        )
        for peer, address in self.cfg.peers.items():
            key = self.cfg.curve.allowed_public_keys.get(peer) if self.cfg.curve else None
            self.transport.add_peer(peer, address, key)
        tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._heartbeat_loop())]
        self._folder = RunFolder(self.cfg.out, append=True, trackers=trackers)
        self.metrics = self._serve_metrics()
        self._write_node_file(finished=False)
        mdns = MdnsPeers(self.cfg.node_id, self.roster[self.cfg.node_id], self.config_hash, self._heard_by_mdns) if self.cfg.mdns else None
        try:
            if mdns is not None:
                await mdns.start()
            if self.cfg.discover:
                await self._discover()
            first = await self._startup()
            leave = self.window[1]  # a node scheduled to leave runs its rounds before that one, then finishes
            timing = self.cfg.timing
            last = await drive_rounds(self.runner, self, first, self.rounds, run.eval_every, timing.round_deadline, stop=leave, eval_point=run.eval_point)
            self.failures = self._failures()
            if last == (self.rounds if leave is None else leave) - 1:
                self.done = True
                await self.send(self.runner, [Send(peer, self._control(MessageKind.HEARTBEAT)) for peer in self.cfg.peers])
                await self._wait(lambda: set(self.membership.alive(time.monotonic())) <= self.peers_done, self.cfg.timing.linger)
        finally:
            for task in [*tasks, *self._requests]:
                task.cancel()
            await asyncio.gather(*tasks, *self._requests, return_exceptions=True)
            self._flush_ledger()
            self._write_node_file(finished=True)
            self._folder.close()
            if self.metrics is not None:
                self.metrics.close()
            if mdns is not None:
                await mdns.close()
            await self.transport.close()
