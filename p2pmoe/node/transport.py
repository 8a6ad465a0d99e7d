"""The node's ZeroMQ transport: one ROUTER that peers and clients connect to, one DEALER per
configured peer, every incoming message validated before anyone sees it.

Routing. `send(dst)` goes over our DEALER to `dst` when `dst` is a configured peer, else back
through our ROUTER on the connection that `dst` last sent a valid message on.

Identity. Without CURVE, a connection's identity is its routing id: our DEALERs carry
`ROUTING_ID = node_id`, and a message on the ROUTER must carry its routing id as `src` (a
plain pyzmq client sets `ROUTING_ID` to the node id it puts in its headers). With CURVE, the
identity is the node id the connection's key is listed under (the ZAP User-Id) and routing
ids carry no meaning: our DEALERs set none, so libzmq numbers their connections, and a listed
client that claims a peer's id as its ROUTING_ID occupies nothing the peer needs.
`ROUTER_HANDOVER` is on: a peer that reconnects while its old connection still looks alive
to us gets its routing id back at once. Project decision, measured against the alternative
(issue 26 N2): with handover off, libzmq keeps the second connection open but never reads it,
even after the first has gone, so a reconnecting peer went mute for the rest of the run. The
price is that without CURVE anyone who can connect may take over a connected peer's id; so a
node without CURVE listens on loopback only unless told `insecure`
(`NodeConfig.check_plaintext_bind`), and with CURVE routing ids carry no meaning at all.

Trust. A peer is untrusted input. Every ZeroMQ message is a head frame and at most one
payload frame (codec, protocol version 2); a message of more frames is refused, its extra
frames dropped unread. A header starts a message; a big message's further bytes come as
chunks of its transfer (`xfer`), each its own ZeroMQ message, read into the message's buffers
through `codec.MessageReader` as they arrive. The header's `src` must equal the connection's
identity. A bad message is logged, answered with an ERROR message when it came on the ROUTER,
and never returned.

Memory (issue 26 N4). libzmq holds at most RCVHWM complete ZeroMQ messages per connection,
each at most MAXMSGSIZE a frame: a few hundred KiB, not a whole expert. What the node holds
itself is budgeted in bytes: a message's declared payload is reserved when its header arrives
(before its chunks are sent or stored) and stays reserved until `recv()` hands the message
out. The reservations of all senders stay under `max_held_bytes`, and a sender already holding
something may not pass `max_peer_held_bytes`; a message over either is refused at its header
with an ERROR that carries its `req`, and its chunks are then dropped at the cost of reading a
small head. A transfer without a chunk for `transfer_timeout` seconds is dropped and its
reservation freed. `heard(sender)` is called for every ZeroMQ message that comes from a
sender, chunks included, so a peer sending a big expert over a slow link is seen alive.

Flow control. High-water marks count messages, not bytes. Frames of 64 KB or more are sent
zero-copy, and the last frame of a message of 64 KB or more is tracked (a MessageTracker);
libzmq releases frames in order, so a message counts as in flight until libzmq has released
that last frame, i.e. handed the whole message to the kernel. `send` waits while a
destination has more than `max_inflight_bytes` in flight. Messages under 64 KB are copied,
not tracked, and bounded in number by the high-water mark.

Waiting. The sockets are plain pyzmq sockets; one event-loop reader on each socket's ZMQ_FD
wakes the tasks waiting to read or send on it (`_Readiness`), and reads and sends that need
not wait are made at once, without a future.

Tensors are sent zero-copy: do not modify a sent tensor in place until `in_flight(dst)` says
its bytes have left (send copies, e.g. `state_dict` clones, when training continues).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import zmq

from p2pmoe.driver.runner import RateLimitedLog
from p2pmoe.ledger import ByteLedger
from p2pmoe.node.security import CurveGuard, CurveSettings
from p2pmoe.wire.codec import (
    DEFAULT_LIMITS,
    XFER_BYTES,
    ChunkHead,
    Envelope,
    Limits,
    MessageReader,
    ProtocolError,
    encode,
    frame_sizes,
    read_head,
    wire_messages,
)
from p2pmoe.wire.messages import Message, MessageKind

log = logging.getLogger("p2pmoe.transport")

ZERO_COPY_BYTES = 64 * 1024  # below this, copying a frame is cheaper than sharing it
HWM = 1000  # messages queued per connection and direction
LINGER_MS = 200  # how long close() lets queued messages drain
DECODE_IN_THREAD_BYTES = 1 << 20  # bigger compressed messages are restored off the event loop
HEARTBEAT_IVL_MS = 1000  # ZMTP PING every second on every connection ...
HEARTBEAT_TIMEOUT_MS = 5000  # ... and a connection silent this long after one is dropped
YIELD_FRAMES = 1024  # frames dropped between two yields to the event loop ...
YIELD_BYTES = 8 << 20  # ... and bytes read (a message counted as at least 64 KiB): a few milliseconds of work either way
_DISCARD = bytearray()  # recv_into an empty buffer drops a frame without copying it
_NOBLOCK, _RCVMORE, _EVENTS = int(zmq.NOBLOCK), int(zmq.RCVMORE), int(zmq.EVENTS)  # plain ints: pyzmq's enum flags cost microseconds a call
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
_SRCFD = int(zmq.SRCFD)  # the file descriptor of the connection a frame came on
INBOX_MESSAGES = 1024  # valid messages waiting for recv(); beyond it, backpressure to sockets
HELD_BYTES = 256 * 2**20  # bytes the node holds for messages being received or waiting for recv() (issue 26 N4) ...
PEER_HELD_BYTES = 64 * 2**20  # ... of which a sender already holding something may hold this much
TRANSFER_TIMEOUT = 30.0  # seconds a transfer may go without a chunk before it is dropped
REMEMBERED_REFUSALS = 4096  # refused transfers whose chunks are dropped without a word
REMEMBERED_CONNECTIONS = 4096  # routing ids whose latest connection is kept, to log a handover
RCVHWM = 8  # complete ZeroMQ messages (each at most a head and a chunk) libzmq keeps per connection
MAX_REASON_CHARS = 300  # error reasons quote peer input: keep replies and log lines short
UNASKED_ERRORS_PER_SECOND = 20  # ERROR replies a sender gets each second for messages that asked nothing (no req) ...
ASKED_ERRORS_PER_SECOND = 200  # ... and for refused requests (a req): more, but a bound (junk can carry a req)
_REMEMBERED_REQUESTS = 1024  # finished request ids whose late duplicate replies are dropped


class TransportError(RuntimeError):
    """Base of the transport's own errors."""


class PeerUnreachable(TransportError):
    """No route to the destination, or no connection took the message in time."""


class SendTimeout(TransportError):
    """The destination kept more than `max_inflight_bytes` in flight for `send_timeout` seconds."""


class RequestTimeout(TransportError):
    """A request got no reply after all its tries."""


class TransportClosed(TransportError):
    """The transport was closed."""


@dataclasses.dataclass
class _Transfer:
    """A message whose header has come and whose chunks are arriving."""

    reader: MessageReader
    held: int  # bytes reserved for it: the header and the payload it declares
    header: zmq.Frame  # its properties (CURVE User-Id) name the sender
    routing_id: bytes | None
    last: float  # loop time of its last chunk


@dataclasses.dataclass
class _Hold:
    nbytes: int
    tracker: zmq.MessageTracker | None = None  # None while the message is being handed over


class _InFlight:
    """Bytes handed to libzmq for one destination and not yet released by it."""

    def __init__(self) -> None:
        self._holds: list[_Hold] = []

    def total(self) -> int:
        self._holds = [h for h in self._holds if h.tracker is None or not h.tracker.done]
        return sum(h.nbytes for h in self._holds)

    def try_reserve(self, nbytes: int, limit: int) -> _Hold | None:
        """Reserve `nbytes` if they fit under `limit` (or nothing else is in flight), else None."""
        if self._holds and (used := self.total()) and used + nbytes > limit:
            return None
        hold = _Hold(nbytes)
        self._holds.append(hold)
        return hold

    async def wait_for_room(self, nbytes: int, limit: int, timeout: float, dst: str) -> _Hold:
        """Reserve `nbytes` once they fit under `limit` (or nothing else is in flight)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.0005
        while (hold := self.try_reserve(nbytes, limit)) is None:
            if loop.time() >= deadline:
                raise SendTimeout(f"{dst!r} still has {self.total()} bytes in flight after {timeout}s (limit {limit})")
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.02)
        return hold

    def release(self, hold: _Hold) -> None:
        self._holds.remove(hold)


def _zmq_parts(frames: Sequence[bytes | memoryview], track: bool) -> tuple[list[bytes | memoryview | zmq.Frame], zmq.MessageTracker | None]:
    """Frames to hand to `send_multipart`: big ones as zero-copy Frames, the last one tracked
    when `track` says so.

    libzmq releases a connection's frames in order, so the tracker of the last frame of a
    message's last ZeroMQ message says the whole message has left: one tracker a message, not
    one a frame (each is an Event that pyzmq's garbage-collector thread must set). The caller
    must drop the returned parts after sending: a tracker completes only once no Python Frame
    refers to the buffer any more.
    """
    parts: list[bytes | memoryview | zmq.Frame] = list(frames)
    for i, frame in enumerate(frames[:-1] if track else frames):
        if len(frame) >= ZERO_COPY_BYTES:
            parts[i] = zmq.Frame(frame, copy=False)
    if not track:
        return parts, None
    last = zmq.Frame(frames[-1], copy=False, track=True)
    parts[-1] = last
    assert last.tracker is not None  # track=True always makes one
    return parts, last.tracker


class _Readiness:
    """Wakes the tasks waiting on one socket, from an event-loop reader on its ZMQ_FD.

    Why not zmq.asyncio: its futures, timers, event queues and enum flags cost a fifth of a
    small round trip here, once per message each way. The FD is libzmq's mailbox signal: it
    signals once when the socket's state changes and is cleared by any call that processes
    the mailbox (reading ZMQ_EVENTS, a send, a receive), whoever makes it. So every read of
    ZMQ_EVENTS goes through `events`, which wakes the waiters those events satisfy; after a
    send or a receive, `settle` does the same. Without that, a receive that consumed the
    signal "writable" left a sender asleep until its timeout (seen as a flaky 10 s stall of
    the first send to a new peer).
    """

    def __init__(self, socket: zmq.Socket) -> None:
        self._socket = socket
        self._loop = asyncio.get_running_loop()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._fd = cast(int, socket.getsockopt(zmq.FD))  # an int option
        self._loop.add_reader(self._fd, self.events)

    def events(self) -> int:
        """ZMQ_EVENTS (which clears the FD), waking every waiter whose events are among them."""
        events = cast(int, self._socket.get(_EVENTS))  # an int option
        if events and self._waiters:
            self._release(events)
        return events

    def settle(self) -> None:
        """After a send or a receive on the socket: it may have consumed the FD's signal."""
        if self._waiters:
            self.events()

    def _release(self, events: int) -> None:
        keep = []
        for wanted, waiter in self._waiters:
            if waiter.done():
                continue
            if wanted & events:
                waiter.set_result(None)
            else:
                keep.append((wanted, waiter))
        self._waiters = keep

    async def next_signal(self, events: int) -> None:
        """Sleep until the socket has any of `events` (call only after `events()` came back short)."""
        waiter = self._loop.create_future()
        entry = (events, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        finally:
            if not waiter.done():  # cancelled: do not keep it until the next signal
                self._waiters.remove(entry)

    async def wait_for(self, events: int) -> None:
        """Return once the socket has any of `events` (_POLLIN, _POLLOUT)."""
        while not self.events() & events:
            await self.next_signal(events)

    def close(self) -> None:
        """Stop watching the FD (before the socket closes: the loop must not poll a dead FD) and
        wake every waiter, whose next call on the closed socket then fails instead of hanging."""
        self._loop.remove_reader(self._fd)
        self._release(-1)


async def _drop_rest(frames: zmq.Socket) -> tuple[int, int]:
    """Receive the rest of the current multipart into nothing: (frames, bytes) dropped.

    The cheapest way libzmq offers (a message cannot be skipped whole): about a microsecond a
    frame, with int flags (pyzmq's enum flags cost several times that). Yields to the event
    loop every YIELD_FRAMES frames so that a flood delays other tasks little at a time.
    """
    recv_into, get = frames.recv_into, frames.get
    count = nbytes = 0
    more = True
    while more:
        for _ in range(YIELD_FRAMES):
            nbytes += recv_into(_DISCARD, flags=_NOBLOCK)
            count += 1
            if not get(_RCVMORE):
                more = False
                break
        await asyncio.sleep(0)
    return count, nbytes


async def _settled_within(future: asyncio.Future[Message], timeout: float) -> bool:
    """Wait up to `timeout` seconds for `future` without cancelling it; True if it is done.

    A request's waiter outlives a try (a late reply to the first try answers the second), so
    a timeout must not cancel it. asyncio.timeout around asyncio.shield does that too, for
    ~35 us more per wait here: a seventh of a small round trip.
    """
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    turn = loop.create_future()

    def wake(_: object = None) -> None:
        if not turn.done():
            turn.set_result(None)

    timer = loop.call_later(timeout, wake)
    future.add_done_callback(wake)
    try:
        await turn
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
    return future.done()


def _refusal(exc: Exception) -> ProtocolError:
    """The error a sender gets back: a ProtocolError as it is, anything else by its type only."""
    return exc if isinstance(exc, ProtocolError) else ProtocolError(f"undecodable message ({type(exc).__name__})")


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


@dataclasses.dataclass
class _Peer:
    address: str
    socket: zmq.Socket
    pump: asyncio.Task[None]


class Transport:
    """Sends and receives validated protocol messages for one node.

    Create it inside a running event loop (it starts reader tasks and, with CURVE, the ZAP
    handler); `close()` it, or use `async with`.
    """

    def __init__(
        self,
        node_id: str,
        bind: str,
        limits: Limits = DEFAULT_LIMITS,
        ledger: ByteLedger | None = None,
        curve: CurveSettings | None = None,
        max_inflight_bytes: int = 64 * 2**20,
        round_of: Callable[[], int] | None = None,
        send_timeout: float = 10.0,
        compression: Mapping[str, str] | None = None,
        max_held_bytes: int = HELD_BYTES,
        max_peer_held_bytes: int = PEER_HELD_BYTES,
        transfer_timeout: float = TRANSFER_TIMEOUT,
        heard: Callable[[str], None] | None = None,
        error_replies_per_second: tuple[float, float] = (UNASKED_ERRORS_PER_SECOND, ASKED_ERRORS_PER_SECOND),
    ) -> None:
        """`error_replies_per_second`: ERROR replies a sender gets a second for refused
        messages without a req and with one (`_may_answer`); (inf, inf) answers every one."""
        asyncio.get_running_loop()  # fail early and clearly outside a coroutine
        self.error_replies_per_second = error_replies_per_second
        self.node_id = node_id
        self.limits = limits
        self.ledger = ledger
        self.max_inflight_bytes = max_inflight_bytes
        self.send_timeout = send_timeout
        self.compression = dict(compression or {})
        self.bytes_received: dict[str, int] = defaultdict(int)
        self.refused = 0  # messages refused: malformed, or over a byte budget
        self.stray_chunks = 0  # chunks of no open transfer (refused, expired or never started), dropped
        self.unanswered = 0  # refusals not answered: over UNASKED_ERRORS_PER_SECOND for their sender
        self.handovers = 0  # ROUTER routing ids seen on a new connection while known on another
        self._connection_of: OrderedDict[bytes, int] = OrderedDict()  # routing id -> its latest connection's fd
        self._errors_sent: dict[tuple[str, bool], int] = {}  # ERROR replies per (sender, with a req), this second
        self._errors_second = 0.0
        self._round_of = round_of or (lambda: 0)
        self._peers: dict[str, _Peer] = {}
        self._contacts: dict[str, bytes] = {}  # node id -> routing id of its last valid ROUTER message
        self._inflight: dict[str, _InFlight] = defaultdict(_InFlight)
        self._inbox: asyncio.Queue[tuple[Envelope, str, int] | None] = asyncio.Queue(INBOX_MESSAGES)
        self.max_held_bytes = max_held_bytes
        self.max_peer_held_bytes = min(max_peer_held_bytes, max_held_bytes)
        self.transfer_timeout = transfer_timeout
        self._held = 0  # bytes reserved for messages being received or waiting in the inbox
        self._held_by_sender: dict[str, int] = {}
        self._transfers: dict[tuple[str, bytes], _Transfer] = {}
        self._refused_transfers: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._xfer_ids = itertools.count(secrets.randbits(31))  # per node; a restart does not reuse ids still open at a peer
        self._heard = heard
        # (peer, req) -> (waiter, the request's kind): a reply is a message with that req and
        # another kind (or meta.reply true, as hello's), so a peer's own request that happens
        # to reuse the number is not taken for a reply
        self._waiters: dict[tuple[str, int], tuple[asyncio.Future[Message], MessageKind]] = {}
        self._finished_requests: OrderedDict[tuple[str, int], MessageKind] = OrderedDict()
        self._closed = False
        self._rejections = RateLimitedLog(logger=log)  # one flood, a few lines (every 1,000th after the first 5)
        # plain sockets: their waits are ours (_Readiness), not zmq.asyncio's
        self._ready: dict[zmq.Socket, _Readiness] = {}
        self._send_turns: dict[zmq.Socket, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._waiting_sends: dict[zmq.Socket, int] = defaultdict(int)

        self._context = zmq.Context()
        self._guard: CurveGuard | None = None
        try:
            if curve:
                self._guard = CurveGuard(curve, self._context)  # before bind: see CurveGuard
            self._router = self._socket(zmq.ROUTER)
            # No ZMTP heartbeat timeout on the ROUTER, where anyone can connect. libzmq 4.3
            # aborts the process (`!_io_error`, stream_engine_base.cpp; libzmq issues #3937,
            # #4364) when a heartbeat times out on a connection whose input it has stopped
            # because the receive queue is full: 8 processes flooding empty messages killed a
            # node within 10 s (bench/bench_flood.py). A stalled frame now holds at most
            # MAXMSGSIZE per connection; TCP keepalive ends connections to dead hosts. The
            # DEALERs to configured peers keep heartbeats: only those peers can stop them.
            self._router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 0)
            self._router.setsockopt(zmq.HEARTBEAT_IVL, 0)
            self._router.setsockopt(zmq.TCP_KEEPALIVE, 1)
            self._router.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # see the module doc: a reconnecting peer gets its id back
            if self._guard:
                self._guard.serve(self._router)
            self._router.bind(bind)
        except BaseException:  # a bad key file or a busy port must not leak the context
            if self._guard:
                self._guard.stop()
            self._context.destroy(linger=0)
            raise
        endpoint = self._router.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)  # LAST_ENDPOINT is a bytes option
        self.address: str = endpoint.decode()
        self._ready[self._router] = _Readiness(self._router)
        self._router_pump = asyncio.create_task(self._pump(self._router, None), name=f"{node_id}-router")
        self._sweeper = asyncio.create_task(self._sweep_transfers(), name=f"{node_id}-transfers")
        if not self._guard:
            log.warning(
                "traffic is NOT encrypted or authenticated: node %r at %s runs without CURVE keys; "
                "anyone who can reach it can read its messages and speak as any node",
                node_id,
                self.address,
            )

    def _socket(self, kind: int) -> zmq.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, LINGER_MS)
        socket.setsockopt(zmq.SNDHWM, HWM)
        socket.setsockopt(zmq.RCVHWM, RCVHWM)
        # libzmq checks MAXMSGSIZE per frame, against the size a frame announces before its
        # bytes come, and drops the connection: no frame bigger than the protocol allows is stored
        socket.setsockopt(zmq.MAXMSGSIZE, self.limits.max_socket_frame_bytes)
        # ZMTP heartbeats: a connection that answers nothing for HEARTBEAT_TIMEOUT is dropped
        # with its half-received message, so a stalled sender cannot hold memory
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        return socket

    # -- peers ---------------------------------------------------------------------------------

    @property
    def peers(self) -> dict[str, str]:
        """Configured peers: node id -> address."""
        return {peer_id: peer.address for peer_id, peer in self._peers.items()}

    def add_peer(self, peer_id: str, address: str, public_key: bytes | None = None) -> None:
        """Connect a DEALER to `peer_id` at `address` (replacing an earlier one).

        With CURVE, `public_key` (z85) is the peer's server key and joins our allow-list;
        without it the key listed for `peer_id` in the CURVE settings is used.
        """
        if self._closed:
            raise TransportClosed("transport is closed")
        if public_key is not None and not self._guard:
            raise ValueError(f"a public key was given for {peer_id!r} but this transport has no CURVE settings")
        self.remove_peer(peer_id)
        socket = self._socket(zmq.DEALER)
        if not self._guard:  # with CURVE our key says who we are; a routing id could be squatted
            socket.setsockopt(zmq.ROUTING_ID, self.node_id.encode())
        socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: a dead peer blocks, not buffers
        if self._guard:
            self._guard.connect_to(socket, peer_id, public_key)
        socket.connect(address)
        self._ready[socket] = _Readiness(socket)
        pump = asyncio.create_task(self._pump(socket, peer_id), name=f"{self.node_id}-to-{peer_id}")
        self._peers[peer_id] = _Peer(address, socket, pump)
        # once per link, so a reader of any node's log sees which links are protected (issue 29)
        protection = "CURVE-encrypted, the peer's key checked against the allow-list" if self._guard else "plaintext: NOT encrypted or authenticated"
        log.info("%s: link to %r at %s is %s", self.node_id, peer_id, address, protection)

    def remove_peer(self, peer_id: str) -> None:
        """Drop the DEALER to `peer_id` and its queued messages (no-op for an unknown peer)."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        peer.pump.cancel()
        self._ready.pop(peer.socket).close()
        self._send_turns.pop(peer.socket, None)
        self._waiting_sends.pop(peer.socket, None)
        peer.socket.close(linger=0)
        self._inflight.pop(peer_id, None)

    @property
    def held_bytes(self) -> int:
        """Bytes reserved for messages being received or waiting for recv() (at most `max_held_bytes`)."""
        return self._held

    def in_flight(self, dst: str) -> int:
        """Bytes sent to `dst` that libzmq has not released yet (see the module docstring)."""
        return self._inflight[dst].total() if dst in self._inflight else 0

    # -- sending -------------------------------------------------------------------------------

    def _record(self, round_index: int, dst: str, kind: MessageKind, frames: Sequence[bytes | memoryview]) -> None:
        if self.ledger is not None:
            header, payload = frame_sizes(frames)
            self.ledger.record(round_index, self.node_id, dst, MessageKind(kind).value, header, payload)

    async def send(self, dst: str, message: Message, timeout: float | None = None) -> None:
        """Queue `message` for `dst`; returns once libzmq holds it.

        Raises PeerUnreachable (no route, or no connection took it within `timeout`, default
        `send_timeout`) or SendTimeout (too many bytes still in flight to `dst` for as long).
        """
        timeout = self.send_timeout if timeout is None else timeout
        if self._closed:
            raise TransportClosed("transport is closed")
        peer = self._peers.get(dst)
        if peer is None and dst not in self._contacts:
            raise PeerUnreachable(f"{dst!r} is neither a configured peer nor a client connected to us")
        xfer = (next(self._xfer_ids) % 2**32).to_bytes(XFER_BYTES, "big")
        frames = encode(self.node_id, message, self.limits, self.compression, xfer)
        nbytes = sum(len(f) for f in frames)
        inflight, hold, tracker = self._inflight[dst], None, None
        track = nbytes >= ZERO_COPY_BYTES  # copied messages leave no bytes in flight: the HWM bounds them
        if track:
            hold = inflight.try_reserve(nbytes, self.max_inflight_bytes)
            if hold is None:
                hold = await inflight.wait_for_room(nbytes, self.max_inflight_bytes, timeout, dst)
        socket = peer.socket if peer else self._router
        wire = wire_messages(frames)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            for i, frames_of_one in enumerate(wire):
                parts, tracker = _zmq_parts(frames_of_one, track and i == len(wire) - 1)
                if peer is None:
                    parts.insert(0, self._contacts[dst])
                await self._send_parts(socket, parts, max(0.0, deadline - asyncio.get_running_loop().time()))
                del parts  # a live Frame keeps its tracker pending
        except BaseException as exc:
            if hold is not None:
                inflight.release(hold)
            if isinstance(exc, TimeoutError):
                raise PeerUnreachable(f"no connection to {dst!r} took the message within {timeout}s") from None
            if isinstance(exc, zmq.ZMQError):
                if self._closed:  # woken by close(): the node is shutting down, the peer did nothing wrong
                    raise TransportClosed(f"transport closed while a message for {dst!r} waited") from None
                self._contacts.pop(dst, None)
                raise PeerUnreachable(f"{dst!r} is unreachable: {exc}") from None
            raise
        if hold is not None:
            hold.tracker = tracker
        self._record(message.round, dst, message.kind, frames)

    async def _send_parts(self, socket: zmq.Socket, parts: list[bytes | memoryview | zmq.Frame], timeout: float) -> None:
        """Hand `parts` to libzmq: at once when it takes them, else waiting up to `timeout`.

        Most sends go at once, without a future or a timer. A send that would block waits its
        turn (a FIFO lock), and while any waits, later sends on that socket queue behind it,
        so messages keep their order. A ROUTER says it can send when any connection has room,
        not the one this message is for: then the retry backs off instead of spinning.
        """
        if not self._waiting_sends[socket]:
            try:
                socket.send_multipart(parts, flags=_NOBLOCK, copy=True)
                if (ready := self._ready.get(socket)) is not None:  # gone if the socket closed meanwhile
                    ready.settle()
                return
            except zmq.Again:
                pass
        self._waiting_sends[socket] += 1
        ready, delay = self._ready[socket], 0.0005
        try:
            async with asyncio.timeout(timeout), self._send_turns[socket]:
                while True:
                    try:
                        socket.send_multipart(parts, flags=_NOBLOCK, copy=True)
                        ready.settle()
                        return
                    except zmq.Again:
                        pass
                    if ready.events() & _POLLOUT:
                        await asyncio.sleep(delay)
                        delay = min(2 * delay, 0.02)
                    else:
                        await ready.next_signal(_POLLOUT)
        finally:
            self._waiting_sends[socket] -= 1

    async def request(self, dst: str, message: Message, timeout: float, retries: int = 2) -> Message:
        """Send `message` and return the reply from `dst` carrying the same `meta["req"]`.

        The caller's `meta["req"]` is kept (so the bytes match a simulation of the same method);
        without one a random id is drawn. The request is sent again after each `timeout`
        without a reply, `retries` times, then RequestTimeout is raised. A responder copies
        `meta["req"]` into its reply; an ERROR reply carrying it is returned like any other.
        Later duplicate replies are dropped.
        """
        req = message.meta.get("req")
        if not isinstance(req, int) or isinstance(req, bool):
            req = secrets.randbits(62)
        key = (dst, req)
        if key in self._waiters:
            raise TransportError(f"request {req} to {dst!r} is already waiting for its reply")
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters[key] = (waiter, message.kind)
        outgoing = Message(message.kind, message.round, message.tensors, {**message.meta, "req": req})
        try:
            for _ in range(retries + 1):
                await self.send(dst, outgoing)
                if await _settled_within(waiter, timeout):
                    return waiter.result()
            raise RequestTimeout(f"{dst!r} did not answer {MessageKind(message.kind).value} request {req}: {retries + 1} tries of {timeout}s")
        finally:
            del self._waiters[key]
            self._finished_requests[key] = message.kind
            while len(self._finished_requests) > _REMEMBERED_REQUESTS:
                self._finished_requests.popitem(last=False)

    # -- receiving -----------------------------------------------------------------------------

    async def recv(self) -> Envelope:
        """The next valid message from any peer or client, in arrival order per connection."""
        if self._closed and self._inbox.empty():
            raise TransportClosed("transport is closed")
        item = await self._inbox.get()
        if item is None:
            raise TransportClosed("transport is closed")
        envelope, sender, nbytes = item
        self._release(sender, nbytes)
        return envelope

    async def _pump(self, socket: zmq.Socket, peer: str | None) -> None:
        """Read `socket` until closed; `peer` is the DEALER's peer, None for the ROUTER."""
        ready = self._ready[socket]
        unyielded = 0
        while True:
            try:
                if unyielded >= YIELD_BYTES:  # a stream of chunks must not keep recv() and other tasks waiting
                    unyielded = 0
                    await asyncio.sleep(0)
                await ready.wait_for(_POLLIN)
                first = socket.recv(flags=_NOBLOCK, copy=False)
                routing_id = first.bytes if peer is None else None
                if routing_id is not None:
                    self._note_connection(routing_id, first.get(_SRCFD))
                head = first if peer is not None else socket.recv(flags=_NOBLOCK, copy=False)
                body = socket.recv(flags=_NOBLOCK, copy=False) if head.more else None
                extra = await _drop_rest(socket) if body is not None and body.more else (0, 0)
                ready.settle()
                unyielded += len(head) + (len(body) if body is not None else 0) + extra[1] + 64 * 2**10  # a message costs as much as 64 KiB
                await self._take(head, body, extra, peer, routing_id)
            except zmq.ZMQError as exc:
                if self._closed or exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                log.warning("receive error on %s: %s", peer or "router", exc)
                await asyncio.sleep(0.01)
            except Exception:  # last line of defence: one message never stops the loop
                log.exception("dropped a message after an unexpected error")

    def _sender(self, head: zmq.Frame, peer: str | None, routing_id: bytes | None) -> str:
        """Who a ZeroMQ message comes from: the DEALER's peer, the CURVE key's node, or the routing id."""
        if routing_id is None:
            assert peer is not None  # _pump passes a peer exactly when there is no routing id
            return peer
        if self._guard:  # with CURVE, who a ROUTER connection is comes from its key, not its routing id
            user_id = head.get("User-Id")
            assert isinstance(user_id, str)  # a message property, always a string
            return user_id
        return routing_id.decode("utf-8", "backslashreplace")

    async def _take(self, head: zmq.Frame, body: zmq.Frame | None, extra: tuple[int, int], peer: str | None, routing_id: bytes | None) -> None:
        """One ZeroMQ message: a header (a message, or a transfer's start) or a transfer's chunk.

        Constant work for a chunk nobody waits for: its head is unpacked and looked up, its bytes
        are never copied. Nothing here waits except handing a finished message to the inbox."""
        sender = self._sender(head, peer, routing_id)
        received = len(head) + (len(body) if body is not None else 0) + extra[1]
        self.bytes_received[sender] += received
        if self._heard is not None:
            self._heard(sender)
        reader: MessageReader | None = None
        try:
            parsed = read_head(head.buffer, self.limits)
            if extra[0]:  # a chunk's transfer is dropped with it: its later chunks are then strays, not errors
                if isinstance(parsed, ChunkHead) and (transfer := self._transfers.get((sender, parsed.xfer))) is not None:
                    reader = transfer.reader
                raise ProtocolError(f"a message is a head frame and at most one payload frame, got {2 + extra[0]} frames")
            if isinstance(parsed, ChunkHead):
                await self._continue(sender, parsed, body)
                return
            reader = parsed
            self._check_sender(reader.src, head, peer, routing_id)
            if reader.transfer is not None and not self._start(sender, reader, head, routing_id):
                return
            if body is not None:
                reader.feed(body.buffer)
            elif reader.size:
                raise ProtocolError(f"header declares {reader.size} payload bytes and no payload frame follows it")
        except Exception as exc:  # hostile bytes may raise more than ProtocolError: the same refusal, by type
            if reader is not None and reader.transfer is not None:
                self._abort((sender, reader.transfer))
            req = reader.meta.get("req") if reader is not None and isinstance(exc, ProtocolError) else None
            self._refuse(sender, routing_id, _short(str(_refusal(exc))), req)
            return
        if reader.transfer is None:
            if self._reserve(sender, routing_id, len(head) + reader.size, reader.meta.get("req")):
                await self._finish(sender, reader, len(head) + reader.size, routing_id)
        elif reader.complete:
            transfer = self._transfers.pop((sender, reader.transfer))
            await self._finish(sender, reader, transfer.held, routing_id)

    def _reserve(self, sender: str, routing_id: bytes | None, size: int, req: Any) -> bool:
        """Hold `size` bytes for `sender` if its budgets allow, else refuse the message.

        A sender holding nothing may take one message of any size up to `max_held_bytes`; one
        already holding something must stay within `max_peer_held_bytes`, so one sender cannot
        take the node's whole budget from everyone else."""
        mine = self._held_by_sender.get(sender, 0)
        if mine and mine + size > self.max_peer_held_bytes:
            reason = f"{mine} bytes of yours are still held here (limit {self.max_peer_held_bytes}): slow down"
        elif self._held and self._held + size > self.max_held_bytes:
            reason = f"this node holds {self._held} bytes (limit {self.max_held_bytes}): busy, try again later"
        else:
            self._held += size
            self._held_by_sender[sender] = mine + size
            return True
        self._refuse(sender, routing_id, reason, req, "over budget")
        return False

    def _release(self, sender: str, nbytes: int) -> None:
        self._held -= nbytes
        left = self._held_by_sender.pop(sender) - nbytes
        if left:
            self._held_by_sender[sender] = left

    def _start(self, sender: str, reader: MessageReader, head: zmq.Frame, routing_id: bytes | None) -> bool:
        """Open a transfer for a header that announces chunks, if its bytes can be held (else
        the message is refused and False returned)."""
        assert reader.transfer is not None  # only headers with a transfer id start one
        key, held = (sender, reader.transfer), len(head) + reader.size
        if key in self._transfers:
            raise ProtocolError(f"transfer {reader.transfer.hex()} is already open")
        if not self._reserve(sender, routing_id, held, reader.meta.get("req")):
            self._refused_transfers[key] = None  # its chunks are now dropped without a word
            while len(self._refused_transfers) > REMEMBERED_REFUSALS:
                self._refused_transfers.popitem(last=False)
            return False
        self._transfers[key] = _Transfer(reader, held, head, routing_id, asyncio.get_running_loop().time())
        return True

    def _abort(self, key: tuple[str, bytes]) -> None:
        """Drop an open transfer and free its reservation (no-op if it is not open)."""
        transfer = self._transfers.pop(key, None)
        if transfer is not None:
            self._release(key[0], transfer.held)

    async def _continue(self, sender: str, chunk: ChunkHead, body: zmq.Frame | None) -> None:
        """A chunk: into its transfer's buffers, and the message out once it is complete."""
        key = (sender, chunk.xfer)
        transfer = self._transfers.get(key)
        if transfer is None:
            self.stray_chunks += 1
            if key not in self._refused_transfers:
                self._rejections.warning("stray chunk", "dropped a chunk from %r of no open transfer (refused, expired or never started)", sender)
            return
        reader = transfer.reader
        try:
            if body is None:
                raise ProtocolError("a chunk head without its payload frame")
            if chunk.offset != reader.received:
                raise ProtocolError(f"a chunk at offset {chunk.offset}, expected {reader.received}")
            reader.feed(body.buffer)
        except Exception as exc:
            self._abort(key)
            self._refuse(sender, transfer.routing_id, _short(str(_refusal(exc))), reader.meta.get("req"))
            return
        transfer.last = asyncio.get_running_loop().time()
        if reader.complete:
            del self._transfers[key]
            await self._finish(sender, reader, transfer.held, transfer.routing_id)

    async def _finish(self, sender: str, reader: MessageReader, held: int, routing_id: bytes | None) -> None:
        """A message whose bytes have all come (`held` of them reserved): restored, then accepted."""
        try:
            if reader.size > DECODE_IN_THREAD_BYTES and reader.compressed:  # restoring is a pass over every value
                envelope = await asyncio.to_thread(reader.finish)
            else:
                envelope = reader.finish()
        except Exception as exc:
            self._release(sender, held)
            self._refuse(sender, routing_id, _short(str(_refusal(exc))), reader.meta.get("req"))
            return
        await self._accept(envelope, sender, held, routing_id)

    async def _sweep_transfers(self) -> None:
        """Drop transfers that went `transfer_timeout` seconds without a chunk."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.transfer_timeout / 4))
            now = loop.time()
            for key, transfer in list(self._transfers.items()):
                if now - transfer.last > self.transfer_timeout:
                    self._abort(key)
                    got, size = transfer.reader.received, transfer.reader.size
                    self._rejections.warning(
                        "expired", "dropped a transfer from %r: no chunk for %.0f s (%d of %d bytes came)", key[0], self.transfer_timeout, got, size
                    )

    def _refuse(self, sender: str, routing_id: bytes | None, reason: str, req: Any = None, key: str = "rejected") -> None:
        self.refused += 1
        self._rejections.warning(key, "refused a message from %r: %s", sender, reason)
        if routing_id is not None:
            self._reply_error(routing_id, sender, reason, req)

    async def _accept(self, envelope: Envelope, sender: str, held: int, routing_id: bytes | None) -> None:
        """Hand a valid message (its `held` bytes reserved for `sender`) to its waiting request or to recv()."""
        if routing_id is not None:
            self._contacts[envelope.src] = routing_id
        req = envelope.message.meta.get("req")
        if req is not None:  # the codec let through only a count
            key, kind = (envelope.src, req), envelope.message.kind
            flagged = envelope.message.meta.get("reply") is True
            waiting = self._waiters.get(key)
            if waiting is not None and (kind != waiting[1] or flagged):
                self._release(sender, held)
                if not waiting[0].done():
                    waiting[0].set_result(envelope.message)
                return
            finished = self._finished_requests.get(key)
            if finished is not None and (kind != finished or flagged):
                self._release(sender, held)
                return  # a duplicate reply to a request already answered
        # Backpressure by count only: the bytes are reserved already. The sockets then keep at
        # most RCVHWM messages per connection, and senders block.
        if self._inbox.full():
            await self._inbox.put((envelope, sender, held))
        else:
            self._inbox.put_nowait((envelope, sender, held))

    def _check_sender(self, src: str, header: zmq.Frame, peer: str | None, routing_id: bytes | None) -> None:
        """The header's src must be who the connection is: its peer, routing id and CURVE key."""
        if peer is not None and src != peer:
            raise ProtocolError(f"header src {src!r} arrived on the connection to {peer!r}")
        if routing_id is None:
            return
        if self._guard:
            owner = header.get("User-Id")
            if owner != src:
                raise ProtocolError(f"header src {src!r} but the CURVE key belongs to {owner!r}")
        elif routing_id != src.encode():
            raise ProtocolError(f"header src {src!r} differs from the routing id {routing_id!r}: set ROUTING_ID to your node id")

    def _reply_error(self, routing_id: bytes, sender: str, reason: str, req: int | None = None) -> None:
        """Best effort: an ERROR to the connection a bad message came on, never blocking; with
        the refused message's `req`, so a refused request fails at once instead of timing out."""
        if not self._may_answer(sender, asked=req is not None):
            self.unanswered += 1
            return
        message = Message(MessageKind.ERROR, self._round_of(), meta={"reason": reason, **({"req": req} if req is not None else {})})
        frames = encode(self.node_id, message, self.limits)
        try:
            self._router.send_multipart([routing_id, *frames], flags=_NOBLOCK)
            if (ready := self._ready.get(self._router)) is not None:
                ready.settle()
        except zmq.ZMQError as exc:
            log.debug("could not send an error reply to %r: %s", sender, exc)
            return
        self._record(message.round, sender, message.kind, frames)

    def _note_connection(self, routing_id: bytes, fd: int) -> None:
        """Log a routing id that arrives on another connection than before (issue 26 N2):
        with ROUTER_HANDOVER that connection now gets the id's replies. A peer that reconnects
        does this; so does, without CURVE, anyone who claims a connected peer's id."""
        known = self._connection_of.get(routing_id)
        self._connection_of[routing_id] = fd
        self._connection_of.move_to_end(routing_id)
        if known is not None and known != fd:
            self.handovers += 1
            self._rejections.warning(
                "handover", "routing id %r moved to a new connection: replies go there now (a reconnect, or someone claiming it)", _short(repr(routing_id))
            )
        while len(self._connection_of) > REMEMBERED_CONNECTIONS:
            self._connection_of.popitem(last=False)

    def _may_answer(self, sender: str, asked: bool) -> bool:
        """Whether `sender` may get one more ERROR this second: for a refused request (`asked`,
        it carries a req) up to ASKED_ERRORS_PER_SECOND by default, so an honest refused request
        fails at once; for one that asked nothing up to UNASKED_ERRORS_PER_SECOND. A flood of garbage
        (issue 26 N9), with a req or without, then costs a parse and a counter per message past
        those, not an encode and a send. Project decision."""
        now = time.monotonic()
        if now - self._errors_second >= 1.0:
            self._errors_second, self._errors_sent = now, {}
        key = (sender, asked)
        sent = self._errors_sent.get(key, 0)
        if sent >= self.error_replies_per_second[asked]:
            return False
        self._errors_sent[key] = sent + 1
        return True

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the readers, fail pending requests, close every socket and the context."""
        if self._closed:
            return
        self._closed = True
        pumps = [self._router_pump, self._sweeper, *(p.pump for p in self._peers.values())]
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for waiter, _ in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(TransportClosed("transport closed while waiting for a reply"))
        if self._guard:
            self._guard.stop()
        for socket, ready in self._ready.items():
            ready.close()
            socket.close()
        self._ready.clear()
        self._peers.clear()
        await asyncio.to_thread(self._context.term)
        try:
            self._inbox.put_nowait(None)  # wake a recv() that is waiting
        except asyncio.QueueFull:
            pass

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
