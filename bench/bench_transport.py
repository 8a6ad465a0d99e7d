"""What the p2pmoe Transport costs over raw pyzmq, measured side by side on one loopback.

    python bench/bench_transport.py

(a) Expert transfer: one EXPERT_RESPONSE holding a float32 tensor of 1, 16 and 64 MiB, from
    `Transport.send` (encode included) to the receiving node's `Transport.recv` returning it
    (validated, reassembled, finite-checked), against one raw DEALER -> ROUTER multipart of
    the same bytes in frames of the same size, sent and received zero-copy, not validated.
    Transfers run one at a time; the two paths alternate repeat by repeat so that load on a
    shared machine hits both alike. MB/s is the median over the repeats (MB = 10^6 bytes).
(b) Small-message round trips: a HELLO-size request answered by the other node through
    `Transport.request` (replies travel DEALER -> ROUTER, as between two nodes that list
    each other as peers), against raw pyzmq echoing the same header bytes on one
    DEALER/ROUTER pair, both with blocking sockets and with zmq.asyncio.

Prints a table and saves bench/results/transport.json and transport.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq
import zmq.asyncio

from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.node.transport import Transport
from p2pmoe.report import format_table
from p2pmoe.wire.codec import DEFAULT_LIMITS, encode, frame_sizes
from p2pmoe.wire.messages import Message, MessageKind

RESULTS = Path(__file__).parent / "results"
MIB = 2**20
REPEATS = {1: 100, 16: 30, 64: 12}  # per size in MiB; bigger transfers vary less
WARMUP = 2  # untimed transfers per size and path: connection set-up, page faults
OP_TIMEOUT = 20.0  # seconds any single transfer or round trip may take before the run fails
LOOPBACK = "tcp://127.0.0.1"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- (a) transfers ---------------------------------------------------------------------------


async def _transport_transfer(sender: Transport, receiver: Transport, message: Message) -> float:
    """Seconds from send() to the receiving node holding the decoded tensor."""
    start = time.perf_counter()
    await sender.send(receiver.node_id, message)
    await asyncio.wait_for(receiver.recv(), OP_TIMEOUT)
    return time.perf_counter() - start


def _raw_transfer(dealer: zmq.Socket, router: zmq.Socket, frames: list[memoryview]) -> float:
    """Seconds for one zero-copy multipart to arrive whole at the ROUTER."""
    start = time.perf_counter()
    dealer.send_multipart(frames, copy=False)
    if not router.poll(int(OP_TIMEOUT * 1000)):
        raise TimeoutError("raw transfer did not arrive")
    router.recv_multipart(copy=False)
    return time.perf_counter() - start


async def _transfers(sizes_mib: list[int], sender: Transport, receiver: Transport) -> list[dict[str, Any]]:
    frame_bytes = DEFAULT_LIMITS.frame_bytes
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(f"{LOOPBACK}:*")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"raw-sender")
    dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes_mib:
            tensor = torch.randn(size * MIB // 4 // 1024, 1024)
            message = Message(MessageKind.EXPERT_RESPONSE, 0, {"expert.0.weight": tensor}, {"req": 1})
            header_bytes, payload_bytes = frame_sizes(encode(sender.node_id, message))
            raw = memoryview(tensor.numpy()).cast("B")
            frames = [raw[i : i + frame_bytes] for i in range(0, len(raw), frame_bytes)]
            await sender.send(receiver.node_id, message)  # first transfer: warm-up and a check
            received = await asyncio.wait_for(receiver.recv(), OP_TIMEOUT)
            if not torch.equal(received.message.tensors["expert.0.weight"], tensor):
                raise AssertionError("the transport delivered different bytes")
            for _ in range(WARMUP - 1):
                await _transport_transfer(sender, receiver, message)
            for _ in range(WARMUP):
                _raw_transfer(dealer, router, frames)
            times: dict[str, list[float]] = {"p2pmoe-transport": [], "raw-pyzmq": []}
            for _ in range(REPEATS[size]):
                times["p2pmoe-transport"].append(await _transport_transfer(sender, receiver, message))
                times["raw-pyzmq"].append(_raw_transfer(dealer, router, frames))
            rates = {m: payload_bytes / 1e6 / statistics.median(t) for m, t in times.items()}
            for method, seconds in times.items():
                header = header_bytes if method == "p2pmoe-transport" else 0
                rows.append({
                    "method": method,
                    "data": "synthetic-bytes",
                    "test": f"transfer {size} MiB",
                    "metrics": {
                        "mb_per_s": rates[method],
                        "ratio_to_raw": rates[method] / rates["raw-pyzmq"],
                        "mb_per_s_min": payload_bytes / 1e6 / max(seconds),
                        "mb_per_s_max": payload_bytes / 1e6 / min(seconds),
                    },
                    "bytes": {
                        "payload_per_message": payload_bytes,
                        "header_per_message": header,
                        "messages": len(seconds),
                        "total": len(seconds) * (payload_bytes + header),
                    },
                    "setting": {"tensor_mib": size, "repeats": len(seconds), "frame_bytes": frame_bytes, "frames": len(frames)},
                })
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()
    return rows


# -- (b) round trips -------------------------------------------------------------------------


async def _answer_requests(node: Transport, count: int) -> None:
    """The responder's side of a request: a HELLO reply that copies meta.req."""
    for _ in range(count):
        envelope = await node.recv()
        reply = {"round": 0, "done": False, "reply": True, "req": envelope.message.meta["req"]}
        await node.send(envelope.src, Message(MessageKind.HELLO, 0, meta=reply))


async def _transport_rtts(client: Transport, server: Transport, count: int) -> tuple[list[float], int]:
    hello = Message(MessageKind.HELLO, 0, meta={"round": 0, "done": False})
    responder = asyncio.create_task(_answer_requests(server, count + WARMUP))
    rtts: list[float] = []
    try:
        for i in range(count + WARMUP):
            start = time.perf_counter()
            await client.request(server.node_id, hello, timeout=OP_TIMEOUT, retries=0)
            if i >= WARMUP:
                rtts.append(time.perf_counter() - start)
        await asyncio.wait_for(responder, OP_TIMEOUT)
    finally:
        responder.cancel()
    request = {**hello.meta, "req": 2**61}  # a typical 62-bit request id
    return rtts, len(encode(client.node_id, Message(MessageKind.HELLO, 0, meta=request))[0])


def _raw_rtts_sync(payload: bytes, count: int) -> list[float]:
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        router.bind(f"{LOOPBACK}:*")
        dealer.setsockopt(zmq.ROUTING_ID, b"raw-client")
        dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        rtts: list[float] = []
        for i in range(count + WARMUP):
            start = time.perf_counter()
            dealer.send(payload)
            if not router.poll(int(OP_TIMEOUT * 1000)):
                raise TimeoutError("raw request did not arrive")
            router.send_multipart(router.recv_multipart())
            if not dealer.poll(int(OP_TIMEOUT * 1000)):
                raise TimeoutError("raw reply did not arrive")
            dealer.recv()
            if i >= WARMUP:
                rtts.append(time.perf_counter() - start)
        return rtts
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()


async def _raw_rtts_asyncio(payload: bytes, count: int) -> list[float]:
    context = zmq.asyncio.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        router.bind(f"{LOOPBACK}:*")
        dealer.setsockopt(zmq.ROUTING_ID, b"raw-client")
        dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())

        async def echo() -> None:
            for _ in range(count + WARMUP):
                await router.send_multipart(await router.recv_multipart())

        responder = asyncio.create_task(echo())
        rtts: list[float] = []
        try:
            for i in range(count + WARMUP):
                start = time.perf_counter()
                await dealer.send(payload)
                await asyncio.wait_for(dealer.recv(), OP_TIMEOUT)
                if i >= WARMUP:
                    rtts.append(time.perf_counter() - start)
        finally:
            responder.cancel()
        return rtts
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()


def _rtt_row(method: str, api: str, rtts: list[float], message_bytes: int, baseline_p50: float | None) -> dict[str, Any]:
    p50 = _percentile(rtts, 0.5) * 1e6
    return {
        "method": method,
        "data": "synthetic-bytes",
        "test": f"round trip ({api})",
        "metrics": {
            "p50_us": p50,
            "p99_us": _percentile(rtts, 0.99) * 1e6,
            "ratio_to_raw": p50 / baseline_p50 if baseline_p50 else 1.0,
        },
        "bytes": {"payload_per_message": message_bytes, "messages": 2 * len(rtts), "total": 2 * len(rtts) * message_bytes},
        "setting": {"round_trips": len(rtts), "api": api},
    }


# -- the run ---------------------------------------------------------------------------------


async def _run(sizes_mib: list[int], round_trips: int) -> list[dict[str, Any]]:
    logging.getLogger("p2pmoe.transport").setLevel(logging.ERROR)  # the no-CURVE warning
    a = Transport("bench-a", f"{LOOPBACK}:*")
    b = Transport("bench-b", f"{LOOPBACK}:*")
    try:
        a.add_peer(b.node_id, b.address)
        b.add_peer(a.node_id, a.address)
        rows = await _transfers(sizes_mib, a, b)
        rtts, header_bytes = await _transport_rtts(a, b, round_trips)
    finally:
        await a.close()
        await b.close()
    payload = msgpack.packb({"v": 1, "kind": "hello", "src": "bench-a", "round": 0,
                             "meta": {"round": 0, "done": False, "req": 2**61}, "tensors": []}, use_bin_type=True)
    raw_sync = _raw_rtts_sync(payload, round_trips)
    raw_async = await _raw_rtts_asyncio(payload, round_trips)
    baseline = _percentile(raw_sync, 0.5) * 1e6
    rows.append(_rtt_row("p2pmoe-transport", "zmq.asyncio", rtts, header_bytes, baseline))
    rows.append(_rtt_row("raw-pyzmq", "zmq.asyncio", raw_async, len(payload), baseline))
    rows.append(_rtt_row("raw-pyzmq", "blocking", raw_sync, len(payload), None))
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    columns = ["test", "method", "MB/s", "x raw", "p50 µs", "p99 µs"]
    lines = []
    for row in rows:
        m = row["metrics"]
        lines.append({
            "test": row["test"],
            "method": row["method"],
            "MB/s": f"{m['mb_per_s']:,.0f}" if "mb_per_s" in m else "",
            "x raw": f"{m['ratio_to_raw']:.2f}",
            "p50 µs": f"{m['p50_us']:.0f}" if "p50_us" in m else "",
            "p99 µs": f"{m['p99_us']:.0f}" if "p99_us" in m else "",
        })
    return format_table(lines, columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,16,64", help=f"tensor sizes in MiB, from {sorted(REPEATS)}")
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for decode's finite check (a node in a swarm runs with 1; 0 = torch default)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not set(sizes) <= set(REPEATS) or not 1 <= args.round_trips <= 100_000:
        parser.error(f"sizes must come from {sorted(REPEATS)} and round trips lie in 1..100000")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load = os.getloadavg()
    started = time.perf_counter()
    rows = asyncio.run(_run(sizes, args.round_trips))
    common = {
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "event_loop": "asyncio default",
        "transport": "tcp loopback 127.0.0.1, no CURVE, sender and receiver in one process, one context each",
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": load[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - started,
    }
    for row in rows:
        row["setting"] = {**row["setting"], **common}
    table = _table(rows)
    setting = (f"Python {common['python']}, pyzmq {common['pyzmq']}, libzmq {common['libzmq']}, torch {common['torch']} "
               f"({common['torch_threads']} intra-op thread(s)); "
               f"{common['cpus']} CPUs, 1-min load {load[0]:.2f} at start; {common['transport']}; "
               f"transfers: float32 tensors of {', '.join(f'{s} MiB' for s in sizes)} in "
               f"{DEFAULT_LIMITS.frame_bytes // MIB} MiB frames, repeats {', '.join(str(REPEATS[s]) for s in sizes)} "
               f"(median MB/s, MB = 10^6 bytes, after {WARMUP} warm-up transfers); "
               f"round trips: {args.round_trips} after {WARMUP} warm-up; x raw = transport / raw-pyzmq "
               f"(MB/s for transfers, p50 over blocking raw-pyzmq for round trips); {common['date']}")
    print(setting)
    print(table)
    atomic_write_json(RESULTS / "transport.json", rows)
    command = "python bench/bench_transport.py " + " ".join(sys.argv[1:])
    atomic_write_bytes(RESULTS / "transport.md", (
        f"# transport\n\n{__doc__.strip()}\n\n{setting}\n\n```\n{table}\n```\n\nCommand: `{command.strip()}`\n"
    ).encode())


if __name__ == "__main__":
    main()
