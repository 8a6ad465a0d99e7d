"""A raw pyzmq client's side of protocol version 2, for tests that speak to a live node
without the Transport: send `encode`'s frames as the ZeroMQ messages they travel in, and read
one whole message back (a header, then its transfer's chunks)."""

from __future__ import annotations

import asyncio
from typing import Any

import zmq.asyncio

from p2pmoe.wire.codec import MessageReader, wire_messages


async def send_frames(sock: zmq.asyncio.Socket, frames: list) -> None:
    """`encode`'s frames as (head, payload) ZeroMQ messages."""
    for message in wire_messages(frames):
        await sock.send_multipart(message)


async def recv_frames(sock: zmq.asyncio.Socket) -> list[bytes]:
    """The frames of one message as `decode` takes them: a header and, if it announces a
    transfer, every chunk until the payload the header declares has come."""
    frames = await sock.recv_multipart()
    reader = MessageReader(frames[0])
    received = sum(len(f) for f in frames[1:])
    while reader.transfer is not None and received < reader.size:
        more = await sock.recv_multipart()
        frames.extend(more)
        received += sum(len(f) for f in more[1:])
    return frames


async def replies_once_refused(node: Any, sock: zmq.asyncio.Socket, refused: int, quiet: float = 0.3) -> int:
    """Wait (at most 5 s) until the node has refused `refused` messages in all, then read what
    comes back on `sock` until it has been quiet for `quiet` seconds: how many replies came."""
    for _ in range(500):
        if node.refused >= refused:
            break
        await asyncio.sleep(0.01)
    replies = 0
    while await sock.poll(int(quiet * 1000)):
        await sock.recv_multipart()
        replies += 1
    return replies
