"""`p2pmoe status`: ask running nodes how they are, over the protocol's `status` kind.

A plain DEALER (like any client, section 1 of docs/PROTOCOL.md) sends `status` with a request
id and prints the reply. Without CURVE keys only; a node with CURVE answers only listed keys.
"""

from __future__ import annotations

import uuid
from typing import Any

import zmq

from p2pmoe.wire.codec import ProtocolError, decode, encode
from p2pmoe.wire.messages import Message, MessageKind


def ask_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """The `status` map of the node at `address`; ValueError when it does not answer."""
    me = f"status-{uuid.uuid4().hex[:8]}"
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, me.encode())
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(encode(me, Message(MessageKind.STATUS, 0, meta={"req": 1})))
        while sock.poll(int(timeout * 1000)):
            try:
                reply = decode(sock.recv_multipart())
            except ProtocolError:
                continue
            if reply.message.kind == MessageKind.STATUS and reply.message.meta.get("req") == 1:
                status = reply.message.meta.get("status")
                if isinstance(status, dict):
                    return status
            if reply.message.kind == MessageKind.ERROR:
                raise ValueError(f"{address} refused: {reply.message.meta.get('reason')}")
        raise ValueError(f"no status from {address} within {timeout} s (is a node listening there, without CURVE?)")
    finally:
        sock.close()
        context.term()


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
