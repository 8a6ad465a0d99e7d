"""CURVE: key files, the allow-list, and binding a connection's key to the node id it claims."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from p2pmoe.node.security import CurveSettings, generate_keypair, read_public_key, write_keys
from p2pmoe.node.transport import Transport
from p2pmoe.wire.codec import decode, encode
from p2pmoe.wire.messages import Message, MessageKind

LOOPBACK = "tcp://127.0.0.1:0"
pytestmark = pytest.mark.timeout(60)


def run(scenario, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(scenario(), timeout))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (public file, secret file) for three nodes and an outsider."""
    written = write_keys(tmp_path, ["a", "b", "c", "mallory"])
    return {p.stem: (p, p.with_suffix(".key_secret")) for p in written if p.suffix == ".key"}


def settings(keys: dict[str, tuple[Path, Path]], name: str, allowed: list[str]) -> CurveSettings:
    public, secret = keys[name]
    return CurveSettings(secret, public, {other: read_public_key(keys[other][0]) for other in allowed})


def curve_client(context: zmq.asyncio.Context, keys, name: str, routing_id: bytes, server: Transport) -> zmq.asyncio.Socket:
    """A plain pyzmq DEALER speaking CURVE with `name`'s key pair to node "a"."""
    public, secret = zmq.auth.load_certificate(keys[name][1])
    client = context.socket(zmq.DEALER)
    client.linger = 0
    client.routing_id = routing_id
    client.curve_publickey, client.curve_secretkey = public, secret
    client.curve_serverkey = read_public_key(keys["a"][0])
    client.connect(server.address)
    return client


async def silent(awaitable, seconds: float) -> bool:
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        return True
    return False


def test_key_files_are_loadable_and_secrets_are_private(keys, tmp_path):
    for public, secret in keys.values():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
        pub, sec = zmq.auth.load_certificate(secret)
        assert read_public_key(public) == pub and len(pub) == 40 and sec is not None
        assert b"secret-key" not in public.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path, "a")
    with pytest.raises(ValueError, match="plain file name"):
        generate_keypair(tmp_path, "../escape")
    with pytest.raises(ValueError, match="public half"):
        CurveSettings(keys["a"][1], keys["b"][0]).keypair()


def test_listed_peers_talk_over_curve(keys):
    async def scenario():
        async with Transport("a", LOOPBACK, curve=settings(keys, "a", ["b"])) as a, Transport("b", LOOPBACK, curve=settings(keys, "b", ["a"])) as b:
            a.add_peer("b", b.address)
            b.add_peer("a", a.address)
            await a.send("b", Message(MessageKind.MODEL_UPDATE, 1, {"w": torch.arange(5.0)}))
            got = await b.recv()
            assert got.src == "a" and torch.equal(got.message.tensors["w"], torch.arange(5.0))
            await b.send("a", Message(MessageKind.MODEL_GLOBAL, 1))
            assert (await a.recv()).src == "b"

    run(scenario)


def test_a_key_given_to_add_peer_is_used_and_allowed(keys):
    async def scenario():
        async with Transport("a", LOOPBACK, curve=settings(keys, "a", [])) as a, Transport("b", LOOPBACK, curve=settings(keys, "b", ["a"])) as b:
            a.add_peer("b", b.address, public_key=read_public_key(keys["b"][0]))
            b.add_peer("a", a.address)
            await b.send("a", Message(MessageKind.HELLO, 0))  # b may reach a because a added it with its key
            assert (await a.recv()).src == "b"

    run(scenario)


def test_unlisted_or_plain_clients_get_nothing_and_are_never_heard(keys, caplog):
    async def scenario():
        context = zmq.asyncio.Context()
        async with Transport("a", LOOPBACK, curve=settings(keys, "a", ["b"])) as a:
            try:
                outsider = curve_client(context, keys, "mallory", b"mallory", a)
                plain = context.socket(zmq.DEALER)
                plain.linger = 0
                plain.routing_id = b"plain"
                plain.connect(a.address)
                for client, name in ((outsider, "mallory"), (plain, "plain")):
                    # once the handshake has failed there is no pipe and the send itself waits
                    await silent(client.send_multipart(encode(name, Message(MessageKind.HELLO, 0))), 0.5)
                    assert await silent(client.recv_multipart(), 0.5)
                assert await silent(a.recv(), 0.3)

                listed = curve_client(context, keys, "b", b"b", a)
                await listed.send_multipart(encode("b", Message(MessageKind.HELLO, 0)))
                assert (await asyncio.wait_for(a.recv(), 5)).src == "b"
            finally:
                context.destroy(linger=0)

    with caplog.at_level(logging.WARNING, logger="p2pmoe.security"):
        run(scenario)
    assert any("not on the allow-list" in r.getMessage() for r in caplog.records)


def test_a_listed_key_cannot_speak_for_another_node(keys):
    async def scenario():
        context = zmq.asyncio.Context()
        async with Transport("a", LOOPBACK, curve=settings(keys, "a", ["b", "c"])) as a:
            try:
                impostor = curve_client(context, keys, "c", b"b", a)  # c's key, b's name
                await impostor.send_multipart(encode("b", Message(MessageKind.HELLO, 0)))
                reply = decode(await asyncio.wait_for(impostor.recv_multipart(), 5))
                assert reply.message.kind is MessageKind.ERROR
                assert "CURVE key belongs to 'c'" in reply.message.meta["reason"]
                assert await silent(a.recv(), 0.3)
            finally:
                context.destroy(linger=0)

    run(scenario)


def test_without_curve_a_loud_warning_is_logged(caplog):
    async def scenario():
        async with Transport("a", LOOPBACK):
            pass

    with caplog.at_level(logging.WARNING, logger="p2pmoe.transport"):
        run(scenario)
    assert sum("NOT encrypted" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("squatter_first", [True, False])
def test_a_listed_client_squatting_a_peers_routing_id_blocks_nobody(keys, squatter_first):
    """Issue 10: mallory (listed) connects with ROUTING_ID b"b" before or after the real b;
    b's messages keep arriving, mallory's are refused, and nothing lingers after it leaves."""

    async def scenario():
        context = zmq.asyncio.Context()
        async with Transport("a", LOOPBACK, curve=settings(keys, "a", ["b", "mallory"])) as a, Transport("b", LOOPBACK, curve=settings(keys, "b", ["a"])) as b:
            try:

                async def heard_from_b(count: int) -> int:
                    heard = 0
                    for i in range(count):
                        await b.send("a", Message(MessageKind.HELLO, 0, meta={"i": i}))
                        try:
                            heard += (await asyncio.wait_for(a.recv(), 1.0)).src == "b"
                        except TimeoutError:
                            pass
                    return heard

                squatter = None
                if squatter_first:
                    squatter = curve_client(context, keys, "mallory", b"b", a)
                    await asyncio.sleep(0.3)
                b.add_peer("a", a.address)
                assert await heard_from_b(2) == 2
                if squatter is None:
                    squatter = curve_client(context, keys, "mallory", b"b", a)
                    await asyncio.sleep(0.3)
                await squatter.send_multipart(encode("b", Message(MessageKind.HELLO, 0)))
                reply = decode(await asyncio.wait_for(squatter.recv_multipart(), 5))
                assert "CURVE key belongs to 'mallory'" in reply.message.meta["reason"]
                assert await heard_from_b(10) == 10  # the old transport heard 0 of 10
                squatter.close(linger=0)
                assert await heard_from_b(5) == 5
                await a.send("b", Message(MessageKind.HELLO, 0))  # a's replies reach b, not the squatter
                assert (await asyncio.wait_for(b.recv(), 5)).src == "a"
            finally:
                context.destroy(linger=0)

    run(scenario)


def test_each_link_says_once_whether_it_is_encrypted(keys, caplog):
    """Issue 29: no log line said whether a link was encrypted."""

    async def scenario():
        async with Transport("a", LOOPBACK, curve=settings(keys, "a", ["b"])) as a, Transport("p", LOOPBACK) as plain:
            a.add_peer("b", "tcp://127.0.0.1:1")
            plain.add_peer("q", "tcp://127.0.0.1:2")

    with caplog.at_level(logging.INFO, logger="p2pmoe.transport"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records if "link to" in r.getMessage()]
    assert lines == [
        "a: link to 'b' at tcp://127.0.0.1:1 is CURVE-encrypted, the peer's key checked against the allow-list",
        "p: link to 'q' at tcp://127.0.0.1:2 is plaintext: NOT encrypted or authenticated",
    ]
