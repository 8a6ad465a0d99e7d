"""`p2pmoe status`: ask running nodes how they are, over the protocol's `status` kind.

A plain DEALER (like any client, section 1 of docs/PROTOCOL.md) sends `status` with a request
id and prints the reply. Without CURVE keys only; a node with CURVE answers only listed keys.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from p2pmoe.wire.codec import Envelope, ProtocolError, decode, encode
from p2pmoe.wire.messages import Message, MessageKind


def ask(address: str, message: Message, sender: str, timeout: float, curve: tuple[bytes, bytes, bytes] | None = None) -> Envelope:
    """Send `message` (its meta carrying `req`) from a one-off DEALER named `sender` to the node
    at `address` and return its reply: what `p2pmoe status` and a joining node (`--join`)
    need before they know the node's id. `curve` is (our public key, our secret key, the
    node's public key). The reply comes with the answering node's id (`src`). ValueError
    when nothing answers within `timeout` or the node refuses."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is None:
        sock.setsockopt(zmq.ROUTING_ID, sender.encode())
    else:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    req = message.meta.get("req")
    try:
        sock.connect(address)
        sock.send_multipart(encode(sender, message))
        deadline = time.monotonic() + timeout
        while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):  # one deadline: chatter cannot extend it
            try:
                reply = decode(sock.recv_multipart())
            except ProtocolError:
                continue
            if reply.message.kind == MessageKind.ERROR:
                raise ValueError(f"{address} refused: {reply.message.meta.get('reason')}")
            if reply.message.kind == message.kind and reply.message.meta.get("req") == req and reply.message.meta.get("reply") is True:
                return reply
        raise ValueError(f"no answer from {address} within {timeout} s")
    finally:
        sock.close()
        context.term()


def ask_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """The `status` map of the node at `address`; ValueError when it does not answer."""
    try:
        reply = ask(address, Message(MessageKind.STATUS, 0, meta={"req": 1}), f"status-{uuid.uuid4().hex[:8]}", timeout)
    except ValueError as exc:
        raise ValueError(f"{exc} (is a node listening there, without CURVE?)") from None
    status = reply.message.meta.get("status")
    if not isinstance(status, dict):
        raise ValueError(f"{address} answered status without a status table")
    return status


def status_lines(status: dict[str, Any]) -> list[str]:
    """One node's status for a terminal."""
    peers = status.get("peers", {})
    states = ", ".join(f"{peer} {row['state']} ({row['silence_s']} s)" for peer, row in sorted(peers.items())) or "none"
    sent = ", ".join(f"{kind} {total:,} B" for kind, total in status.get("sent_bytes", {}).items()) or "nothing"
    metrics = ", ".join(f"{name} {value:.4f}" for name, value in sorted(status.get("metrics", {}).items())) or "none yet"
    return [
        f"{status.get('node')} ({status.get('method')}): round {status.get('round')} of 0-{int(status.get('rounds', 0)) - 1}, "
        f"{status.get('rounds_done')} done{', finished' if status.get('done') else ''}",
        f"  peers: {states}",
        f"  sent: {sent}; received {status.get('received_bytes', 0):,} B",
        f"  refused: {', '.join(status.get('refused', [])) or 'nobody'}",
        f"  last metrics: {metrics}",
    ]


def swarm_line(node: str, address: str, timeout: float) -> str:
    """One line per node of a roster, or why it did not answer."""
    try:
        status = ask_status(address, timeout)
    except ValueError as exc:
        return f"{node:<10} {address:<28} no answer: {exc}"
    alive = sum(row["state"] == "alive" for row in status.get("peers", {}).values())
    return (
        f"{node:<10} {address:<28} round {status.get('round')}, {status.get('rounds_done')} done, "
        f"{alive}/{len(status.get('peers', {}))} peers alive{', finished' if status.get('done') else ''}"
    )
