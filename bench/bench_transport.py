"""What the p2pmoe Transport costs over raw pyzmq, measured side by side on one loopback.

    python bench/bench_transport.py

(a) Expert transfer: one EXPERT_RESPONSE holding a float32 tensor of 1, 16 and 64 MiB, from
    `Transport.send` (encode included) to the receiving node's `Transport.recv` returning it
    (validated, reassembled, finite-checked), against two raw DEALER -> ROUTER multiparts of
    the same bytes in frames of the same size, sent zero-copy:
    - raw-pyzmq: received zero-copy and left in libzmq's frames (no usable tensor);
    - fair-limit: received zero-copy, then copied once into a new torch tensor: the least
      any receiver must do to hand a method a tensor it owns. This is the target's yardstick.
    Every raw DEALER and ROUTER has a context (an I/O thread) of its own, as two nodes and the
    two transports here have.
    Transfers run one at a time; the paths take turns repeat by repeat so that load on a
    shared machine hits all alike. MB/s is the median over the repeats (MB = 10^6 bytes).
(b) Small-message round trips: a HELLO-size request answered by the other node through
    `Transport.request` (replies travel DEALER -> ROUTER, as between two nodes that list
    each other as peers), against raw pyzmq echoing the same header bytes on one
    DEALER/ROUTER pair, both with blocking
    sockets and with zmq.asyncio; the three take turns of 100 round trips.

Targets (issue 15): transport / fair-limit MB/s >= 0.8 at 16 and 64 MiB, and transport round
trip p50 <= 1.5 x raw zmq.asyncio p50, both from the same run.

Prints a table and saves bench/results/<name>.json and .md (name: transport).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import platform
import statistics
import time
from typing import Any

import msgpack
import numpy as np
import torch
import zmq
import zmq.asyncio

from p2pmoe.harness import add_flags, bench_parser, markdown, parse_flags, rerun_command, write_results
from p2pmoe.node.transport import Transport
from p2pmoe.report import format_table
from p2pmoe.wire.codec import DEFAULT_LIMITS, encode, frame_sizes
from p2pmoe.wire.messages import Message, MessageKind

MIB = 2**20
REPEATS = {1: 100, 16: 30, 64: 12}  # per size in MiB; bigger transfers vary less
WARMUP = 2  # untimed transfers per size and path: connection set-up, page faults
RTT_BLOCK = 100  # round trips per path per turn
OP_TIMEOUT = 20.0  # seconds any single transfer or round trip may take before the run fails
LOOPBACK = "tcp://127.0.0.1"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _raw_pair(router_context: zmq.Context, dealer_context: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    """A bound ROUTER and a DEALER connected to it, each in its own context as on two nodes
    (and as the two transports here: sharing one I/O thread made raw round trips ~15 % faster)."""
    router, dealer = router_context.socket(zmq.ROUTER), dealer_context.socket(zmq.DEALER)
    router.bind(f"{LOOPBACK}:*")
    dealer.setsockopt(zmq.ROUTING_ID, b"raw-dealer")
    dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
    return router, dealer


# -- (a) transfers ---------------------------------------------------------------------------


async def _transport_transfer(sender: Transport, receiver: Transport, message: Message) -> float:
    """Seconds from send() to the receiving node holding the decoded tensor."""
    start = time.perf_counter()
    await sender.send(receiver.node_id, message)
    await asyncio.wait_for(receiver.recv(), OP_TIMEOUT)
    return time.perf_counter() - start


def _raw_transfer(dealer: zmq.Socket, router: zmq.Socket, frames: list[memoryview], own_copy: bool) -> float:
    """Seconds for one zero-copy multipart to arrive whole at the ROUTER, and with `own_copy`
    to be copied into a tensor of its own (the fair limit)."""
    start = time.perf_counter()
    dealer.send_multipart(frames, copy=False)
    if not router.poll(int(OP_TIMEOUT * 1000)):
        raise TimeoutError("raw transfer did not arrive")
    _, *parts = router.recv_multipart(copy=False)
    if own_copy:  # allocated as the transport does (numpy: huge pages), so only the copy is compared
        view, offset = np.empty(sum(len(p) for p in parts), dtype=np.uint8), 0
        for part in parts:
            view[offset : offset + len(part)] = memoryview(part.buffer).cast("B")
            offset += len(part)
        torch.from_numpy(view)
    return time.perf_counter() - start


PATHS = ("p2pmoe-transport", "fair-limit", "raw-pyzmq")


async def _transfers(sizes_mib: list[int], sender: Transport, receiver: Transport) -> list[dict[str, Any]]:
    frame_bytes = DEFAULT_LIMITS.frame_bytes
    contexts = [zmq.Context(), zmq.Context()]
    router, dealer = _raw_pair(*contexts)
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
            for own_copy in (False, True):
                for _ in range(WARMUP):
                    _raw_transfer(dealer, router, frames, own_copy)
            times: dict[str, list[float]] = {path: [] for path in PATHS}
            for _ in range(REPEATS[size]):
                times["p2pmoe-transport"].append(await _transport_transfer(sender, receiver, message))
                times["fair-limit"].append(_raw_transfer(dealer, router, frames, own_copy=True))
                times["raw-pyzmq"].append(_raw_transfer(dealer, router, frames, own_copy=False))
            rates = {m: payload_bytes / 1e6 / statistics.median(t) for m, t in times.items()}
            for method, seconds in times.items():
                header = header_bytes if method == "p2pmoe-transport" else 0
                rows.append(
                    {
                        "method": method,
                        "data": "synthetic-bytes",
                        "test": f"transfer {size} MiB",
                        "metrics": {
                            "mb_per_s": rates[method],
                            "ratio_to_fair": rates[method] / rates["fair-limit"],
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
                    }
                )
    finally:
        for context in contexts:
            context.destroy(linger=0)
    return rows


# -- (b) round trips -------------------------------------------------------------------------


async def _answer_requests(node: Transport) -> None:
    """The responder's side of a request: a HELLO reply that copies meta.req."""
    while True:
        envelope = await node.recv()
        reply = {"round": 0, "done": False, "reply": True, "req": envelope.message.meta["req"]}
        await node.send(envelope.src, Message(MessageKind.HELLO, 0, meta=reply))


def _raw_sync_block(router: zmq.Socket, dealer: zmq.Socket, payload: bytes, count: int) -> list[float]:
    rtts: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        dealer.send(payload)
        if not router.poll(int(OP_TIMEOUT * 1000)):
            raise TimeoutError("raw request did not arrive")
        router.send_multipart(router.recv_multipart())
        if not dealer.poll(int(OP_TIMEOUT * 1000)):
            raise TimeoutError("raw reply did not arrive")
        dealer.recv()
        rtts.append(time.perf_counter() - start)
    return rtts


async def _raw_async_echo(router: zmq.asyncio.Socket) -> None:
    while True:
        await router.send_multipart(await router.recv_multipart())


async def _raw_async_block(dealer: zmq.asyncio.Socket, payload: bytes, count: int) -> list[float]:
    rtts: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        await dealer.send(payload)
        await asyncio.wait_for(dealer.recv(), OP_TIMEOUT)
        rtts.append(time.perf_counter() - start)
    return rtts


async def _transport_block(client: Transport, server_id: str, count: int) -> list[float]:
    hello = Message(MessageKind.HELLO, 0, meta={"round": 0, "done": False})
    rtts: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        await client.request(server_id, hello, timeout=OP_TIMEOUT, retries=0)
        rtts.append(time.perf_counter() - start)
    return rtts


async def _round_trips(client: Transport, server: Transport, payload: bytes, count: int) -> dict[str, list[float]]:
    """Round trips of the three paths, taken in turns of RTT_BLOCK so that load hits all alike."""
    contexts = [zmq.Context(), zmq.Context(), zmq.asyncio.Context(), zmq.asyncio.Context()]
    sync_router, sync_dealer = _raw_pair(*contexts[:2])
    async_router, async_dealer = _raw_pair(*contexts[2:])
    tasks = [asyncio.create_task(_answer_requests(server)), asyncio.create_task(_raw_async_echo(async_router))]
    rtts: dict[str, list[float]] = {"transport": [], "raw-async": [], "raw-sync": []}
    try:
        for first in (True, *[False] * -(-count // RTT_BLOCK)):
            n = WARMUP if first else min(RTT_BLOCK, count - len(rtts["transport"]))
            if n <= 0:
                break
            turn = {
                "transport": await _transport_block(client, server.node_id, n),
                "raw-async": await _raw_async_block(async_dealer, payload, n),
                "raw-sync": _raw_sync_block(sync_router, sync_dealer, payload, n),
            }
            if not first:
                for path, values in turn.items():
                    rtts[path].extend(values)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for context in contexts:
            context.destroy(linger=0)
    return rtts


def _rtt_row(method: str, api: str, rtts: list[float], message_bytes: int, raw_async_p50: float) -> dict[str, Any]:
    p50 = _percentile(rtts, 0.5) * 1e6
    return {
        "method": method,
        "data": "synthetic-bytes",
        "test": f"round trip ({api})",
        "metrics": {
            "p50_us": p50,
            "p99_us": _percentile(rtts, 0.99) * 1e6,
            "ratio_to_raw_asyncio": p50 / raw_async_p50,
        },
        "bytes": {"payload_per_message": message_bytes, "messages": 2 * len(rtts), "total": 2 * len(rtts) * message_bytes},
        "setting": {"round_trips": len(rtts), "api": api},
    }


# -- the run ---------------------------------------------------------------------------------


async def _run(sizes_mib: list[int], round_trips: int) -> list[dict[str, Any]]:
    logging.getLogger("p2pmoe.transport").setLevel(logging.ERROR)  # the no-CURVE warning
    a = Transport("bench-a", f"{LOOPBACK}:*")
    b = Transport("bench-b", f"{LOOPBACK}:*")
    request = {"round": 0, "done": False, "req": 2**61}  # a typical 62-bit request id
    payload = encode(a.node_id, Message(MessageKind.HELLO, 0, meta=request))[0]
    try:
        a.add_peer(b.node_id, b.address)
        b.add_peer(a.node_id, a.address)
        rows = await _transfers(sizes_mib, a, b)
        rtts = await _round_trips(a, b, payload, round_trips)
    finally:
        await a.close()
        await b.close()
    baseline = _percentile(rtts["raw-async"], 0.5) * 1e6
    rows.append(_rtt_row("p2pmoe-transport", "zmq.asyncio", rtts["transport"], len(payload), baseline))
    rows.append(_rtt_row("raw-pyzmq", "zmq.asyncio", rtts["raw-async"], len(payload), baseline))
    rows.append(_rtt_row("raw-pyzmq", "blocking", rtts["raw-sync"], len(payload), baseline))
    return rows


TARGET_FAIR = 0.8  # transport / fair-limit MB/s at 16 and 64 MiB, at least
TARGET_RTT = 1.5  # transport / raw zmq.asyncio round-trip p50, at most


def _verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target: the measured ratio and whether it is met."""
    lines = []
    for row in rows:
        m = row["metrics"]
        if row["method"] != "p2pmoe-transport":
            continue
        if row["setting"].get("tensor_mib") in (16, 64):
            met = m["ratio_to_fair"] >= TARGET_FAIR
            lines.append(f"{row['test']}: transport / fair-limit = {m['ratio_to_fair']:.2f} (target >= {TARGET_FAIR}): {'met' if met else 'MISSED'}")
        elif "p50_us" in m:
            met = m["ratio_to_raw_asyncio"] <= TARGET_RTT
            lines.append(
                f"{row['test']}: transport p50 / raw zmq.asyncio p50 = {m['ratio_to_raw_asyncio']:.2f} (target <= {TARGET_RTT}): {'met' if met else 'MISSED'}"
            )
    return lines


def _table(rows: list[dict[str, Any]]) -> str:
    columns = ["test", "method", "MB/s", "x fair", "x raw", "p50 µs", "p99 µs", "x raw asyncio"]
    lines = []
    for row in rows:
        m = row["metrics"]
        lines.append(
            {
                "test": row["test"],
                "method": row["method"],
                "MB/s": f"{m['mb_per_s']:,.0f}" if "mb_per_s" in m else "",
                "x fair": f"{m['ratio_to_fair']:.2f}" if "ratio_to_fair" in m else "",
                "x raw": f"{m['ratio_to_raw']:.2f}" if "ratio_to_raw" in m else "",
                "p50 µs": f"{m['p50_us']:.0f}" if "p50_us" in m else "",
                "p99 µs": f"{m['p99_us']:.0f}" if "p99_us" in m else "",
                "x raw asyncio": f"{m['ratio_to_raw_asyncio']:.2f}" if "ratio_to_raw_asyncio" in m else "",
            }
        )
    return format_table(lines, columns)


def machine(load: float, started: float) -> dict[str, Any]:
    """What every row's numbers depend on besides the code: versions, threads, CPUs, load, date."""
    return {
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "event_loop": "asyncio default",
        "transport": "tcp loopback 127.0.0.1, no CURVE, sender and receiver in one process, one context each",
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": load,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - started,
    }


def setting_text(common: dict[str, Any], sizes: list[int], round_trips: int) -> str:
    return (
        f"Python {common['python']}, pyzmq {common['pyzmq']}, libzmq {common['libzmq']}, torch {common['torch']} "
        f"({common['torch_threads']} intra-op thread(s)); "
        f"{common['cpus']} CPUs, 1-min load {common['load_avg_1m_at_start']:.2f} at start; {common['transport']}; "
        f"transfers: float32 tensors of {', '.join(f'{s} MiB' for s in sizes)} in "
        f"{DEFAULT_LIMITS.frame_bytes // MIB} MiB frames, repeats {', '.join(str(REPEATS[s]) for s in sizes)} "
        f"(median MB/s, MB = 10^6 bytes, after {WARMUP} warm-up transfers); "
        f"round trips: {round_trips} after {WARMUP} warm-up; x fair and x raw = MB/s over the fair-limit and "
        f"raw-pyzmq paths; x raw asyncio = round-trip p50 over raw zmq.asyncio's; {common['date']}"
    )


def main() -> None:
    cli = bench_parser(__doc__)
    cli.add_argument("--sizes", default="1,16,64", help=f"tensor sizes in MiB, from {sorted(REPEATS)}")
    cli.add_argument("--round-trips", type=int, default=2000)
    cli.add_argument(
        "--torch-threads", type=int, default=1, help="torch intra-op threads for decode's finite check (a node in a swarm runs with 1; 0 = torch default)"
    )
    add_flags(cli, "name", "results", name="transport")
    args = parse_flags(cli)
    sizes = [int(s) for s in args.sizes.split(",")]
    if not set(sizes) <= set(REPEATS) or not 1 <= args.round_trips <= 100_000:
        cli.error(f"sizes must come from {sorted(REPEATS)} and round trips lie in 1..100000")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load, started = os.getloadavg()[0], time.perf_counter()
    rows = asyncio.run(_run(sizes, args.round_trips))
    common = machine(load, started)
    for row in rows:
        row["setting"] = {**row["setting"], **common}
    verdicts = "\n".join(f"- {line}" for line in _verdicts(rows))
    setting = f"{(__doc__ or '').strip()}\n\n{setting_text(common, sizes, args.round_trips)}"
    text = markdown("transport", setting, rerun_command(cli, args, skip=("results",)), f"```\n{_table(rows)}\n```\n\n{verdicts}\n")
    write_results(args.results, args.name, rows, text)


if __name__ == "__main__":
    main()
