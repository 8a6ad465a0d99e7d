"""Fuzz a LIVE transport on loopback with hostile multiparts from one persistent raw DEALER.

The default run is at least 10,000 cases (the sum of max_examples below) and takes about a
minute and a half on a 2-core machine.

After every case the client sends a valid probe that the node echoes, so each case proves the
receive loop is still alive, and (the connection being ordered) everything the case caused has
happened by the time the echo comes back: exactly one ERROR reply for a rejected message, or
exactly one message handed to recv() for a valid one, and nothing that recv() yields is invalid.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from dataclasses import dataclass, field

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pmoe.node.transport import Transport
from p2pmoe.wire.codec import DTYPES, PROTOCOL_VERSION, XFER_BYTES, Envelope, Limits, decode, encode, wire_messages
from p2pmoe.wire.messages import Message, MessageKind

LIMITS = Limits(max_message_bytes=2**20, max_tensors=16, max_header_bytes=2**16, frame_bytes=1024)
FLOOD_FRAMES = 1024  # empty frames a flood case appends to one ZeroMQ message
ME = "fuzzer"
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.large_base_example],
)
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # minutes of live-node fuzzing: make test-slow
RESERVED_META = {"probe", "req", "reply", "round", "done"}  # fields with one type (drawn apart)


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Outcome:
    errors: list[Message]
    accepted: list[Envelope]


@dataclass
class Harness:
    """A transport, a task that echoes probes and checks everything else, and the raw client."""

    transport: Transport
    context: zmq.asyncio.Context
    client: zmq.asyncio.Socket
    accepted: list[Envelope] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    cases: int = 0

    async def echo(self) -> None:
        while True:
            env = await self.transport.recv()
            if env.message.kind is MessageKind.HEARTBEAT and set(env.message.meta) == {"probe"}:
                await self.transport.send(env.src, env.message)
                continue
            self.accepted.append(env)
            try:
                assert env.src == ME, f"src {env.src!r}"
                decode(encode(env.src, env.message, LIMITS), LIMITS)  # what recv yields is itself valid
                for name, t in env.message.tensors.items():
                    assert not t.is_floating_point() or bool(torch.isfinite(t).all()), f"non-finite {name}"
            except Exception as exc:
                self.violations.append(f"recv yielded an invalid message: {exc!r}")

    async def ask(self, message: Message) -> asyncio.Task[Message]:
        """Start a request from the node to the fuzzer and return once the fuzzer holds it."""
        pending = asyncio.create_task(self.transport.request(ME, message, timeout=30, retries=0))
        got = decode(await asyncio.wait_for(self.client.recv_multipart(), 10), LIMITS)
        assert got.message.meta == message.meta, got
        return pending

    async def case(self, messages: list[list[bytes]]) -> Outcome:
        """Send `messages` (each one ZeroMQ message), then a probe; what came back before it."""
        self.cases += 1
        probe = self.cases
        before = len(self.accepted)
        for frames in messages:
            await self.client.send_multipart(frames)
        await self.client.send_multipart(encode(ME, Message(MessageKind.HEARTBEAT, 0, meta={"probe": probe})))
        errors: list[Message] = []
        while True:
            reply = decode(await asyncio.wait_for(self.client.recv_multipart(), 10), LIMITS)
            if reply.message.meta == {"probe": probe}:
                return Outcome(errors, self.accepted[before:])
            assert reply.message.kind is MessageKind.ERROR and isinstance(reply.message.meta["reason"], str)
            errors.append(reply.message)


@pytest.fixture(scope="module")
def live():
    loop = asyncio.new_event_loop()
    logger = logging.getLogger("p2pmoe.transport")
    counter, level = _Counter(), logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.ERROR)  # thousands of rejection warnings are expected; errors are not

    async def start() -> tuple[Harness, asyncio.Task[None]]:
        # Every rejected case must get its one ERROR: no rate limit on replies here (the limit
        # has its own test in test_node_transport_hostile.py).
        transport = Transport("node", "tcp://127.0.0.1:0", limits=LIMITS, error_replies_per_second=(math.inf, math.inf))
        context = zmq.asyncio.Context()
        client = context.socket(zmq.DEALER)
        client.linger = 0
        client.routing_id = ME.encode()
        client.connect(transport.address)
        harness = Harness(transport, context, client)
        return harness, asyncio.create_task(harness.echo())

    harness, echo = loop.run_until_complete(start())

    def run(coroutine):
        return loop.run_until_complete(asyncio.wait_for(coroutine, 20))

    def run_case(messages: list[list[bytes]]) -> Outcome:
        return run(harness.case(messages))

    yield harness, run_case, run
    try:
        assert not echo.done(), "the echo task died"
        assert harness.violations == []
        assert counter.records == [], [r.getMessage() for r in counter.records]
    finally:
        echo.cancel()
        loop.run_until_complete(asyncio.gather(echo, return_exceptions=True))
        loop.run_until_complete(harness.transport.close())
        harness.context.destroy(linger=0)
        loop.close()
        logger.removeHandler(counter)
        logger.setLevel(level)


def rejected(outcome: Outcome) -> None:
    assert len(outcome.errors) == 1 and outcome.accepted == [], outcome


def handled(outcome: Outcome) -> None:
    """Either rejected with one ERROR or accepted once, never both, never silently lost."""
    assert len(outcome.errors) + len(outcome.accepted) == 1, outcome


# -- strategies --------------------------------------------------------------------------------

_DTYPE_NAMES = sorted(DTYPES)
_small_shapes = st.lists(st.integers(0, 6), max_size=3)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(_DTYPE_NAMES))]
    shape = draw(_small_shapes)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    if dtype.is_floating_point:
        values = draw(st.lists(st.floats(-1e3, 1e3, width=16), min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point else torch.int64).to(dtype).reshape(shape)


@st.composite
def valid_messages(draw, float32_only: bool = False) -> Message:
    values = st.lists(st.floats(-1e4, 1e4, width=32), max_size=40).map(torch.tensor) if float32_only else tensors()
    named = draw(st.dictionaries(st.text("abcxyz._", min_size=1, max_size=8), values, max_size=4))
    meta = draw(st.dictionaries(st.text(max_size=5).filter(lambda k: k not in RESERVED_META), _ints | st.text(max_size=10), max_size=3))
    kind = draw(st.sampled_from(list(MessageKind)))
    if draw(st.booleans()):
        meta["req"] = draw(st.integers(0, 2**64 - 1))
    if kind in (MessageKind.HELLO, MessageKind.HEARTBEAT) and draw(st.booleans()):
        meta.update(round=draw(st.integers(-1, 2**31)), done=draw(st.booleans()))
    return Message(kind, draw(st.integers(0, 2**31)), named, meta)


def _header(messages: list[list[bytes]]) -> dict:
    return msgpack.unpackb(messages[0][0], raw=False)


def _pack(header: object, payload: list[bytes]) -> list[list[bytes]]:
    """One ZeroMQ message: the header and the given payload frames (one, for a valid message)."""
    return [[msgpack.packb(header, use_bin_type=True), *payload]]


_transfers = itertools.count()  # a fresh transfer id per case: a transfer left open never clashes with a later one


def _encoded(message: Message, compression: dict[str, str] | None = None) -> list[list[bytes]]:
    """`message` as the ZeroMQ messages a node sends: a header, then its transfer's chunks."""
    xfer = (next(_transfers) % 2**32).to_bytes(XFER_BYTES, "big")
    return wire_messages([bytes(f) for f in encode(ME, message, LIMITS, compression, xfer)])


_ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_not_a_kind = st.text(max_size=20).filter(lambda s: s not in {k.value for k in MessageKind}) | _ints | st.none()
_msgpack_values = st.recursive(
    st.none() | st.booleans() | _ints | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def corrupted(draw) -> list[list[bytes]]:
    """A valid message broken in exactly one way that the protocol forbids, as the ZeroMQ
    messages it travels in. Each breaks the header or a chunk that is not the transfer's last:
    a transfer whose last bytes never come is dropped after `transfer_timeout`, unanswered."""
    message = draw(valid_messages())
    messages = _encoded(message)
    header = _header(messages)
    payload = b"".join(m[1] for m in messages if len(m) > 1)  # the tensors' bytes, for ways that rebuild one message
    table = header["tensors"]
    sized = [i for i, row in enumerate(table) if row[3] > 0]
    floats = [name for name, t in message.tensors.items() if t.is_floating_point() and t.numel()]
    ways = [
        "version",
        "kind",
        "src",
        "round",
        "meta",
        "tensors",
        "not_a_map",
        "garbage",
        "extra_frame",
        "huge",
        "dtype",
        "dup_name",
        "dims",
        "meta_types",
        "comp_field",
        "flood",
    ]
    if payload:
        ways += ["drop_frame", "truncate"]
    if sized:
        ways += ["lie_nbytes"]
    if floats:
        ways += ["nan"]
    way = draw(st.sampled_from(ways))
    rest = messages[1:]  # the transfer's chunks, if any: after a refused header they are dropped unanswered
    if way == "version":
        header["v"] = draw(_ints.filter(lambda v: v != PROTOCOL_VERSION) | st.text(max_size=3) | st.none() | st.sampled_from([1.0, True]))
    elif way == "meta_types":  # booleans are not counts, 1.0 is not an int, 1 is not true
        field, bad = draw(
            st.sampled_from(
                [
                    ("req", st.booleans() | st.floats() | st.integers(-(2**63), -1) | st.text(max_size=3)),
                    ("reply", st.just(False) | _ints | st.floats() | st.text(max_size=3) | st.none()),
                ]
            )
        )
        header["meta"] = {**header.get("meta", {}), field: draw(bad)}
    elif way == "comp_field":
        header["comp"] = draw(_hostile_comp(header["tensors"]))
    elif way == "kind":
        header["kind"] = draw(_not_a_kind)
    elif way == "src":
        header["src"] = draw(st.text(max_size=10).filter(lambda s: s != ME) | _ints | st.none())
    elif way == "round":
        header["round"] = draw(st.text(max_size=3) | st.floats() | st.none() | st.lists(_ints, max_size=2))
    elif way == "meta":
        header["meta"] = draw(st.lists(_ints, max_size=3) | _ints | st.text(max_size=3))
    elif way == "tensors":
        header["tensors"] = draw(st.dictionaries(st.text(max_size=3), _ints, max_size=2) | _ints | st.none())
    elif way == "not_a_map":
        return [*_pack(draw(st.lists(_ints, max_size=3) | _ints | st.text(max_size=5)), messages[0][1:]), *rest]
    elif way == "garbage":  # a strict prefix of a msgpack object, or trailing bytes after it
        head = messages[0][0]
        broken = head[: draw(st.integers(0, len(head) - 1))] if draw(st.booleans()) else head + draw(st.binary(min_size=1, max_size=16))
        return [[broken, *messages[0][1:]], *rest]
    elif way in ("flood", "extra_frame"):  # a third frame (or a thousand more) in one ZeroMQ message
        i = draw(st.integers(0, len(messages) - 1))
        more = [b""] * FLOOD_FRAMES if way == "flood" else [draw(st.binary(max_size=64))]
        frames = messages[i] if len(messages[i]) == 2 else [*messages[i], b""]
        return [*messages[:i], [*frames, *more], *messages[i + 1 :]]
    elif way == "drop_frame":  # a head whose payload frame is missing
        i = draw(st.integers(0, len(messages) - 1))
        return [*messages[:i], messages[i][:1], *messages[i + 1 :]]
    elif way == "truncate":  # a payload shorter than sent: the message falls short, or the next chunk's offset no longer fits
        i = draw(st.integers(0, max(0, len(messages) - 2)))  # never a transfer's last chunk (see above)
        chunk = messages[i][1]
        return [*messages[:i], [messages[i][0], chunk[: draw(st.integers(0, len(chunk) - 1))]], *messages[i + 1 :]]
    elif way == "huge":
        dims = draw(st.lists(st.integers(2**10, 2**30), min_size=2, max_size=2))  # > limit, < 2**64
        table.append(["huge", "float32", dims, 4 * math.prod(dims)])
    elif way == "dtype":
        bad = draw(st.sampled_from(["object", "complex64", "float8", "str", "", "uint16"]) | _ints | st.none())
        if not table:  # a tensor to give the bad dtype to, its bytes in the one message
            return _pack(header | {"tensors": [["t", bad, [1], 4]]}, [b"\x00" * 4])
        table[0][1] = bad
    elif way == "dup_name":
        table += [["d", "uint8", [1], 1], ["d", "uint8", [1], 1]]
    elif way == "dims":
        table.append(["deep", "uint8", [1] * (LIMITS.max_dims + 1), 1])
    elif way == "lie_nbytes":
        row = table[draw(st.sampled_from(sized))]
        row[3] += draw(st.integers(-row[3], 4096).filter(lambda d: d != 0))
    elif way == "nan":
        name = draw(st.sampled_from(floats))
        bad = message.tensors[name].clone().reshape(-1)
        bad[draw(st.integers(0, bad.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        return _encoded(Message(message.kind, message.round, {**message.tensors, name: bad.reshape(message.tensors[name].shape)}, message.meta))
    return [*_pack(header, messages[0][1:]), *rest]


_SCALE_OVER = st.floats(1.4e36, 1e300) | st.just(3.0e38)  # 255 * scale > float32's max
_MIN_OVER = st.floats(3.5e38, 1e300)  # finite as float64, inf as float32


@st.composite
def _hostile_comp(draw, table: list[list]) -> object:
    """A comp field that no receiver may honour for this tensor table."""
    names = [row[0] for row in table]
    uint8 = [row[0] for row in table if row[1] == "uint8"]
    name = draw(st.sampled_from(uint8)) if uint8 and draw(st.booleans()) else draw(st.text(max_size=4).filter(lambda n: n not in names))
    params = draw(
        st.one_of(
            st.tuples(st.floats(-1e3, 1e3), _SCALE_OVER).map(list),
            st.tuples(_MIN_OVER | st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.floats(0.01, 1)).map(list),
            st.tuples(st.floats(-1, 1), st.floats(max_value=0.0) | st.just(5e-324)).map(list),
            st.lists(_ints | st.booleans() | st.none(), max_size=3),
        )
    )
    return draw(
        st.one_of(
            st.just({"scheme": "int8", "tensors": {name: params}}),
            st.just({"scheme": "fp16", "tensors": {name: draw(st.just([]) | st.lists(st.floats(), min_size=1, max_size=2))}}),
            st.just({"scheme": draw(st.text(max_size=5).filter(lambda s: s not in ("fp16", "int8"))), "tensors": {}}),
            _msgpack_values.filter(lambda v: not isinstance(v, dict)),
        )
    )


@st.composite
def random_tables(draw) -> list[list[bytes]]:
    """A well-formed header whose tensor table and payload are drawn at random, in one ZeroMQ message."""
    rows, payload = [], []
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(_DTYPE_NAMES) | st.text(max_size=6))
        shape = draw(_small_shapes | st.lists(st.integers(-2, 2**33), max_size=9))
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size() if dtype in DTYPES else 1
        honest = math.prod(shape) * itemsize
        lies = st.integers(-1, 2**34)
        nbytes = draw(st.just(honest) | lies if -(2**63) <= honest < 2**64 else lies)
        rows.append([draw(st.just(f"t{i}") | st.text(max_size=3)), dtype, shape, nbytes])
        fits = draw(st.booleans()) and 0 <= nbytes <= 256
        payload.append(draw(st.binary(min_size=nbytes, max_size=nbytes) if fits else st.binary(max_size=64)))
    header = {
        "v": PROTOCOL_VERSION,
        "kind": draw(st.sampled_from([k.value for k in MessageKind])),
        "src": ME,
        "round": draw(st.integers(0, 10)),
        "meta": {},
        "tensors": rows,
    }
    joined = b"".join(payload)
    return _pack(header, [joined] if joined or draw(st.booleans()) else [])


# -- the fuzz ----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=1500)
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_random_bytes_frames(live, frames):
    handled(live[1]([frames]))


@settings(FUZZ, max_examples=3500)
@given(messages=corrupted())
def test_each_protocol_violation_gets_an_error_reply(live, messages):
    rejected(live[1](messages))


@settings(FUZZ, max_examples=1500)
@given(messages=random_tables())
def test_valid_header_with_random_tensor_table(live, messages):
    handled(live[1](messages))


@settings(FUZZ, max_examples=1000)
@given(header=_msgpack_values, payload=st.lists(st.binary(max_size=32), max_size=3))
def test_arbitrary_msgpack_headers(live, header, payload):
    handled(live[1](_pack(header, payload)))


@settings(FUZZ, max_examples=500)
@given(message=valid_messages())
def test_valid_messages_arrive_intact(live, message):
    outcome = live[1](_encoded(message))
    assert outcome.errors == [] and len(outcome.accepted) == 1
    got = outcome.accepted[0].message
    assert got.kind is message.kind and got.meta == message.meta and got.tensors.keys() == message.tensors.keys()
    for name, t in message.tensors.items():
        assert got.tensors[name].dtype == t.dtype and torch.equal(got.tensors[name], t)


@settings(FUZZ, max_examples=1000)
@given(message=valid_messages(float32_only=True), scheme=st.sampled_from(["fp16", "int8"]))
def test_compressed_messages_arrive_restored_and_finite(live, message, scheme):
    outcome = live[1](_encoded(message, {"*": scheme}))
    assert outcome.errors == [] and len(outcome.accepted) == 1
    got = outcome.accepted[0].message.tensors
    for name, t in message.tensors.items():
        step = (float(t.max() - t.min()) / 255 if scheme == "int8" else float(t.abs().max()) / 1024) if t.numel() else 0.0
        # float32 rounds |values| <= 1e4 to within 1e-3 on top of the scheme's own step
        assert got[name].dtype == torch.float32 and torch.allclose(got[name], t, rtol=0, atol=step + 1e-3)


@settings(FUZZ, max_examples=200)
@given(header=valid_messages(), extra=st.integers(1, 2 * FLOOD_FRAMES), size=st.integers(0, 8))
def test_frame_floods_are_refused_with_one_error(live, header, extra, size):
    messages = _encoded(header)
    first = messages[0] if len(messages[0]) == 2 else [*messages[0], b""]
    rejected(live[1]([[*first, *[b"\x00" * size] * extra], *messages[1:]]))


_REQ_FORMS = ["same", "other", "absent", "true", "float", "text"]
_REPLY_FORMS = ["absent", True, False, 1, 0]


@settings(FUZZ, max_examples=800)
@given(req_form=st.sampled_from(_REQ_FORMS), reply_form=st.sampled_from(_REPLY_FORMS), same_kind=st.booleans(), other=st.integers(0, 2**64 - 1))
def test_replies_without_the_requests_id_never_answer_it(live, req_form, reply_form, same_kind, other):
    """The node asks the fuzzer; only an answer with the request's req, as an int, of another
    kind or with `reply: true`, completes it. Anything else is refused or is an ordinary
    message, and the request keeps waiting."""
    harness, run_case, run = live
    req = 10**6 + harness.cases  # fresh per example: finished ids are remembered
    forms = {"same": req, "other": other if other != req else req + 1, "true": True, "float": float(req), "text": str(req)}
    meta = {} if req_form == "absent" else {"req": forms[req_form]}
    if reply_form != "absent":
        meta["reply"] = reply_form
    kind = MessageKind.EXPERT_REQUEST if same_kind else MessageKind.EXPERT_RESPONSE
    pending = run(harness.ask(Message(MessageKind.EXPERT_REQUEST, 0, meta={"req": req})))
    outcome = run_case(_pack({"v": PROTOCOL_VERSION, "kind": kind.value, "src": ME, "round": 0, "meta": meta, "tensors": []}, []))
    flagged = reply_form is True  # not `in`: 1 == True in Python, the very confusion under test
    matches = req_form == "same" and (reply_form == "absent" or flagged) and (not same_kind or flagged)
    if matches:
        assert outcome.errors == [] and outcome.accepted == [] and pending.done() and pending.result().meta == meta
    else:
        handled(outcome)
        assert not pending.done(), meta
        pending.cancel()
        run(asyncio.gather(pending, return_exceptions=True))


def test_zz_node_still_serves_after_the_fuzz(live):
    """Runs last in this module: a real request round trip on the same connection."""
    run_case = live[1]
    big = Message(MessageKind.EXPERT_RESPONSE, 1, {"w": torch.randn(2**17)})  # 512 KB, 512 chunks
    outcome = run_case(_encoded(big))
    assert outcome.errors == [] and torch.equal(outcome.accepted[0].message.tensors["w"], big.tensors["w"])
