"""The transport on loopback: routing, large tensors, requests, unreachable peers, spoofing,
and the bound on bytes in flight."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import torch
import zmq
import zmq.asyncio
from raw_wire import recv_frames

from p2pmoe.ledger import ByteLedger
from p2pmoe.node.transport import ZERO_COPY_BYTES, PeerUnreachable, RequestTimeout, SendTimeout, Transport, TransportClosed, _zmq_parts
from p2pmoe.wire.codec import decode, encode, frame_sizes, wire_messages
from p2pmoe.wire.messages import Message, MessageKind

LOOPBACK = "tcp://127.0.0.1:0"
pytestmark = pytest.mark.timeout(60)


def run(scenario, timeout: float = 30.0):
    """Run one async scenario with a hard bound on its time."""
    return asyncio.run(asyncio.wait_for(scenario(), timeout))


async def nothing_within(awaitable, seconds: float) -> bool:
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        return True
    return False


def raw_client(context: zmq.asyncio.Context, address: str, routing_id: bytes | None) -> zmq.asyncio.Socket:
    """A plain pyzmq DEALER, as a script that is not a configured peer would use."""
    client = context.socket(zmq.DEALER)
    client.linger = 0
    if routing_id is not None:
        client.routing_id = routing_id
    client.connect(address)
    return client


def test_big_frames_are_shared_and_the_last_frame_tracked_when_asked():
    head, big, small = b"h" * 10, memoryview(bytes(ZERO_COPY_BYTES)), memoryview(bytes(100))
    parts, tracker = _zmq_parts([head, big], track=True)
    assert [type(p) for p in parts] == [bytes, zmq.Frame] and tracker is parts[-1].tracker is not None
    parts, tracker = _zmq_parts([head, big], track=False)  # a chunk before a transfer's last: shared, untracked
    assert [type(p) for p in parts] == [bytes, zmq.Frame] and tracker is None and parts[1].tracker is None
    # the last chunk of a big message may be small: libzmq releases a connection's frames in
    # order, so its tracker stands for the whole message, and it must be tracked
    parts, tracker = _zmq_parts([head, small], track=True)
    assert isinstance(parts[-1], zmq.Frame) and tracker is parts[-1].tracker is not None
    parts, tracker = _zmq_parts([head, small], track=False)
    assert parts == [head, small] and tracker is None  # a small message is bounded by the HWM


def test_a_busy_port_raises_without_leaking():
    async def scenario():
        async with Transport("a", LOOPBACK) as a:
            with pytest.raises(zmq.ZMQError):
                Transport("b", a.address)

    run(scenario)


def test_two_transports_exchange_messages_and_count_bytes():
    async def scenario():
        ledger = ByteLedger()
        async with Transport("a", LOOPBACK, ledger=ledger) as a, Transport("b", "tcp://127.0.0.1:*") as b:
            assert a.address.startswith("tcp://127.0.0.1:") and not a.address.endswith((":0", ":*"))
            a.add_peer("b", b.address)
            b.add_peer("a", a.address)
            hello = Message(MessageKind.HELLO, 2, {"x": torch.arange(4.0)}, {"n": 1})
            await a.send("b", hello)
            got = await b.recv()
            assert got.src == "a" and got.message.meta == {"n": 1} and torch.equal(got.message.tensors["x"], hello.tensors["x"])
            await b.send("a", Message(MessageKind.ERROR, 2, meta={"reason": "just testing"}))
            back = await a.recv()
            assert back.src == "b" and back.message.kind is MessageKind.ERROR  # errors from others are delivered
            header, payload = frame_sizes(encode("a", hello))
            [row] = ledger.entries
            assert (row.round, row.src, row.dst, row.kind, row.header_bytes, row.payload_bytes) == (2, "a", "b", "hello", header, payload)
            assert b.bytes_received["a"] == header + payload

    run(scenario)


def test_three_transports_all_reach_each_other():
    async def scenario():
        names = ["a", "b", "c"]
        nodes = {name: Transport(name, LOOPBACK) for name in names}
        try:
            for name, node in nodes.items():
                for other in names:
                    if other != name:
                        node.add_peer(other, nodes[other].address)
            for name, node in nodes.items():
                for other in names:
                    if other != name:
                        await node.send(other, Message(MessageKind.GATE_PUBLISH, 1, meta={"to": other}))
            for name, node in nodes.items():
                got = [await node.recv() for _ in range(2)]
                assert sorted(e.src for e in got) == sorted(set(names) - {name})
                assert all(e.message.meta == {"to": name} for e in got)
        finally:
            for node in nodes.values():
                await node.close()

    run(scenario)


def test_16mb_tensor_round_trip_is_intact_and_travels_in_frames():
    async def scenario():
        big = torch.randn(4 * 2**20)  # 16 MB of float32
        async with Transport("a", LOOPBACK) as a, Transport("b", LOOPBACK) as b:
            a.add_peer("b", b.address)
            b.add_peer("a", a.address)
            await a.send("b", Message(MessageKind.EXPERT_RESPONSE, 0, {"w": big}))
            got = await b.recv()
            assert torch.equal(got.message.tensors["w"], big)
            await b.send("a", got.message)
            assert torch.equal((await a.recv()).message.tensors["w"], big)

            context = zmq.asyncio.Context()
            client = raw_client(context, a.address, b"client")
            try:
                await client.send_multipart(encode("client", Message(MessageKind.EXPERT_REQUEST, 0)))
                assert (await a.recv()).src == "client"
                await a.send("client", Message(MessageKind.EXPERT_RESPONSE, 0, {"w": big}))
                frames = await recv_frames(client)
                assert len(frames) == 2 * 64  # 256 KiB chunks by default, a head frame each
                assert torch.equal(decode(frames).message.tensors["w"], big)
            finally:
                context.destroy(linger=0)

    run(scenario)


def test_replies_reach_a_plain_dealer_client_that_is_not_a_peer():
    async def scenario():
        context = zmq.asyncio.Context()
        async with Transport("server", LOOPBACK) as server:
            client = raw_client(context, server.address, b"script")
            try:
                with pytest.raises(PeerUnreachable):
                    await server.send("script", Message(MessageKind.HELLO, 0))  # has not spoken yet
                await client.send_multipart(encode("script", Message(MessageKind.EXPERT_REQUEST, 4, meta={"req": 7})))
                request = await server.recv()
                assert request.src == "script"
                await server.send("script", Message(MessageKind.EXPERT_RESPONSE, 4, meta={"req": 7}))
                reply = decode(await asyncio.wait_for(client.recv_multipart(), 5))
                assert reply.src == "server" and reply.message.meta == {"req": 7}
            finally:
                context.destroy(linger=0)

    run(scenario)


async def _serve(node: Transport, answers: list[int], skip_first: int = 0, copies: int = 1) -> None:
    """Answer requests (after ignoring the first `skip_first`), `copies` times each."""
    seen = 0
    while True:
        env = await node.recv()
        seen += 1
        answers.append(env.message.meta["req"])
        if seen > skip_first:
            for _ in range(copies):
                await node.send(env.src, Message(MessageKind.EXPERT_RESPONSE, env.message.round, {"w": torch.ones(3)}, {"req": env.message.meta["req"]}))


def test_request_retries_after_a_lost_request_and_gives_up_after_the_last_try():
    async def scenario():
        async with Transport("a", LOOPBACK) as a, Transport("b", LOOPBACK) as b:
            a.add_peer("b", b.address)
            b.add_peer("a", a.address)
            seen: list[int] = []
            server = asyncio.create_task(_serve(b, seen, skip_first=1))
            reply = await a.request("b", Message(MessageKind.EXPERT_REQUEST, 3, meta={"expert": 1}), timeout=0.3, retries=2)
            assert reply.kind is MessageKind.EXPERT_RESPONSE and torch.equal(reply.tensors["w"], torch.ones(3))
            assert len(seen) == 2 and seen[0] == seen[1] == reply.meta["req"]
            server.cancel()

            seen.clear()
            server = asyncio.create_task(_serve(b, seen, skip_first=10))
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(RequestTimeout):
                await a.request("b", Message(MessageKind.EXPERT_REQUEST, 3), timeout=0.2, retries=2)
            # three waits of 0.2 s; asyncio may fire a timer up to its clock resolution early
            assert loop.time() - start >= 0.6 - 0.01 and len(seen) == 3
            server.cancel()

    run(scenario)


def test_duplicate_replies_do_not_leak_into_recv():
    async def scenario():
        async with Transport("a", LOOPBACK) as a, Transport("b", LOOPBACK) as b:
            a.add_peer("b", b.address)
            b.add_peer("a", a.address)
            server = asyncio.create_task(_serve(b, [], copies=3))
            await a.request("b", Message(MessageKind.EXPERT_REQUEST, 0), timeout=2.0)
            assert await nothing_within(a.recv(), 0.3)
            server.cancel()

    run(scenario)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_destinations_raise_peer_unreachable():
    async def scenario():
        context = zmq.asyncio.Context()
        async with Transport("a", LOOPBACK, send_timeout=0.3) as a:
            with pytest.raises(PeerUnreachable, match="nobody"):
                await a.send("nobody", Message(MessageKind.HELLO, 0))
            a.add_peer("ghost", f"tcp://127.0.0.1:{_free_loopback_port()}")
            with pytest.raises(PeerUnreachable, match="ghost"):
                await a.send("ghost", Message(MessageKind.HELLO, 0))

            client = raw_client(context, a.address, b"leaver")
            await client.send_multipart(encode("leaver", Message(MessageKind.HELLO, 0)))
            await a.recv()
            await a.send("leaver", Message(MessageKind.HELLO, 0))
            client.close(linger=0)
            with pytest.raises(PeerUnreachable, match="leaver"):
                for _ in range(100):  # until the ROUTER notices the disconnect
                    await a.send("leaver", Message(MessageKind.HELLO, 0))
                    await asyncio.sleep(0.02)
        context.destroy(linger=0)

    run(scenario)


def test_sends_that_wait_for_a_peer_go_in_order_once_it_is_up():
    """Sends to a peer not yet listening cannot go at once (IMMEDIATE): they wait on the
    socket's FD signal, in turn, and leave in the order they were made once it connects."""

    async def scenario():
        port = _free_loopback_port()
        async with Transport("a", LOOPBACK, send_timeout=10.0) as a:
            a.add_peer("late", f"tcp://127.0.0.1:{port}")
            sends = [asyncio.create_task(a.send("late", Message(MessageKind.HELLO, 0, meta={"n": n}))) for n in range(5)]
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in sends)  # nobody to take them yet
            async with Transport("late", f"tcp://127.0.0.1:{port}") as late:
                await asyncio.wait_for(asyncio.gather(*sends), 10)
                got = [(await asyncio.wait_for(late.recv(), 10)).message.meta["n"] for _ in sends]
            assert got == list(range(5))

    run(scenario)


def test_a_send_waiting_when_the_transport_closes_fails_at_once():
    async def scenario():
        a = Transport("a", LOOPBACK, send_timeout=30.0)
        a.add_peer("ghost", f"tcp://127.0.0.1:{_free_loopback_port()}")
        waiting = asyncio.create_task(a.send("ghost", Message(MessageKind.HELLO, 0)))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await a.close()
        with pytest.raises(TransportClosed):  # not PeerUnreachable: the peer did nothing wrong
            await asyncio.wait_for(waiting, 5)  # not after send_timeout

    run(scenario)


def test_spoofed_src_is_rejected_with_an_error_reply_and_a_log_line(caplog):
    async def scenario():
        context = zmq.asyncio.Context()
        async with Transport("a", LOOPBACK) as a:
            try:
                for routing_id in (b"mallory", None):  # lying, and not set at all
                    client = raw_client(context, a.address, routing_id)
                    await client.send_multipart(encode("trusted", Message(MessageKind.MODEL_UPDATE, 0, {"w": torch.zeros(2)})))
                    reply = decode(await asyncio.wait_for(client.recv_multipart(), 5))
                    assert reply.src == "a" and reply.message.kind is MessageKind.ERROR
                    assert "routing id" in reply.message.meta["reason"] and "ROUTING_ID" in reply.message.meta["reason"]
                assert await nothing_within(a.recv(), 0.3)
            finally:
                context.destroy(linger=0)

    with caplog.at_level(logging.WARNING, logger="p2pmoe.transport"):
        run(scenario)
    assert any("mallory" in r.getMessage() and "trusted" in r.getMessage() for r in caplog.records)


def test_a_peer_speaking_for_someone_else_is_dropped():
    async def scenario():
        context = zmq.asyncio.Context()
        fake = context.socket(zmq.ROUTER)
        fake.linger = 0
        fake.bind(LOOPBACK)
        async with Transport("a", LOOPBACK) as a:
            try:
                a.add_peer("b", fake.getsockopt(zmq.LAST_ENDPOINT).decode())
                await a.send("b", Message(MessageKind.HELLO, 0))
                routing_id, *_ = await fake.recv_multipart()
                assert routing_id == b"a"
                await fake.send_multipart([routing_id, *encode("c", Message(MessageKind.HELLO, 0))])
                await fake.send_multipart([routing_id, *encode("b", Message(MessageKind.ERROR, 0, meta={"reason": "x"}))])
                got = await a.recv()
                assert got.src == "b" and got.message.kind is MessageKind.ERROR  # the lie was dropped
            finally:
                context.destroy(linger=0)

    run(scenario)


def test_bytes_in_flight_stay_under_the_bound_and_sends_wait_then_time_out():
    async def scenario():
        context = zmq.asyncio.Context()
        sink = context.socket(zmq.ROUTER)  # a peer that stops reading
        sink.linger = 0
        sink.rcvhwm = 1
        sink.rcvbuf = 2**16
        sink.bind(LOOPBACK)
        bound = 10 * 2**20
        message = Message(MessageKind.EXPERT_RESPONSE, 0, {"w": torch.zeros(2**20)})  # 4 MB
        async with Transport("a", LOOPBACK, max_inflight_bytes=bound, send_timeout=0.5) as a:
            try:
                a.add_peer("sink", sink.getsockopt(zmq.LAST_ENDPOINT).decode())
                sent, peak = 0, 0
                with pytest.raises(SendTimeout, match="in flight"):
                    for _ in range(64):
                        await a.send("sink", message)
                        sent += 1
                        peak = max(peak, a.in_flight("sink"))
                assert 0 < sent < 64 and 0 < peak <= bound
                assert a.in_flight("sink") > 0  # libzmq really still holds them
                for _ in range(sent * len(wire_messages(encode("a", message)))):  # each message travels as 16 chunks
                    await asyncio.wait_for(sink.recv_multipart(), 5)
                for _ in range(200):
                    if a.in_flight("sink") == 0:
                        break
                    await asyncio.sleep(0.01)
                assert a.in_flight("sink") == 0
                await a.send("sink", message)  # room again
            finally:
                context.destroy(linger=0)

    run(scenario)


def test_reading_events_wakes_the_waiters_they_satisfy_though_the_fd_never_signals():
    """The FD signals once per state change and any call may consume it: a receive loop that
    reads ZMQ_EVENTS must itself wake a sender waiting for "writable" (this once stalled the
    first send to a new peer for the whole 10 s send timeout), and only that sender."""
    from p2pmoe.node.transport import _POLLIN, _POLLOUT, _Readiness

    async def scenario():
        context = zmq.Context()
        router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
        try:
            port = router.bind_to_random_port("tcp://127.0.0.1")
            dealer.connect(f"tcp://127.0.0.1:{port}")
            for _ in range(200):  # until the connection is up and the dealer can send
                if dealer.get(zmq.EVENTS) & zmq.POLLOUT:
                    break
                await asyncio.sleep(0.01)
            ready = _Readiness(dealer)
            asyncio.get_running_loop().remove_reader(ready._fd)  # as if someone else consumed every signal
            sender = asyncio.ensure_future(ready.next_signal(_POLLOUT))
            receiver = asyncio.ensure_future(ready.next_signal(_POLLIN))
            await asyncio.sleep(0.05)
            assert not sender.done() and not receiver.done()
            assert ready.events() & _POLLOUT  # the receive loop's check ...
            await asyncio.sleep(0)
            assert sender.done() and not receiver.done()  # ... wakes the sender, not itself
            ready.settle()  # nothing pending for the receiver: it stays asleep
            await asyncio.sleep(0)
            assert not receiver.done()
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        finally:
            dealer.close(0)
            router.close(0)
            context.term()

    run(scenario, timeout=10)
