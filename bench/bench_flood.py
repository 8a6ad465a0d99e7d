"""Issue 26 N4/N9: a node's memory and its answer time to a HELLO while senders flood it.

A node (one Transport, whose consumer takes each message at once, as the daemon's receive loop
does, or sleeps `--slow` seconds after each big one, a node busy training) is flooded by 8
sender processes while a prober on the same machine sends it a HELLO every 20 ms. Scenarios:

- big: each sender sends 96 well-formed 4 MiB messages (protocol version 2: a header and 16
  chunks each), as fast as the node lets it;
- empty: each sender sends empty one-frame messages for `--seconds` (each is refused);
- multipart: each sender sends one multipart of 800,000 empty frames (12.8 MB of ZMTP in
  all), which no honest node sends and libzmq buffers whole before the node sees it.

Peak RSS is the node process's (ru_maxrss) minus its RSS before the flood; the HELLO numbers
are round trips of the prober's HELLOs while the flood lasts. Targets (issue 26): peak within
the node's byte budget (max_held_bytes, 256 MiB) + 100 MB, and every HELLO answered within
100 ms.

    python bench/bench_flood.py                      # all three scenarios
    python bench/bench_flood.py --scenarios big --slow 0.05
    python bench/bench_flood.py --pin                # node and senders on separate CPUs

Without --pin the 8 senders (16 threads with libzmq's) and the node share every CPU, so the
HELLO maxima include the scheduler's delays for a node starved of CPU by its own attackers;
--pin gives the node the first CPU and the senders the rest, as when they run on other
machines. Results: flood.{json,md} (shared CPUs) and flood_pinned.{json,md}.

Prints a table and saves bench/results/<name>.json and .md (name: flood).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time

import zmq
import zmq.asyncio

from p2pmoe.harness import add_flags, bench_parser, markdown, parse_flags, rerun_command, write_results
from p2pmoe.node import transport
from p2pmoe.node.transport import Transport
from p2pmoe.wire.codec import PROTOCOL_VERSION, decode, encode
from p2pmoe.wire.messages import Message, MessageKind

SENDERS = 8
# The sender speaks protocol version 1 too (one multipart a message), so that the same
# script measures a checkout from before chunked transfers: the figures before the change.
SENDER = """
import sys, time, zmq, torch
from p2pmoe.wire import codec
from p2pmoe.wire.messages import Message, MessageKind
address, name, scenario, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
context = zmq.Context()
sock = context.socket(zmq.DEALER)
sock.routing_id = name.encode()
sock.sndhwm = 0 if scenario == "multipart" else 1000
sock.linger = 5000
sock.connect(address)
time.sleep(0.2)
if scenario == "big":
    tensor = torch.zeros(2**20)  # 4 MiB of float32
    for n in range(96):
        message = Message(MessageKind.EMBEDDING, 0, {"w": tensor})
        if codec.PROTOCOL_VERSION == 1:
            sock.send_multipart(codec.encode(name, message))
            continue
        for part in codec.wire_messages(codec.encode(name, message, xfer=n.to_bytes(4, "big"))):
            sock.send_multipart(part)
elif scenario == "empty":
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            try:
                sock.send(b"", flags=zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.001)
                break
else:
    sock.send_multipart([b""] * 800_000)
time.sleep(1.0)
sock.close()
context.term()
"""


def pin_node() -> set[int]:
    """The node (this process, and the libzmq I/O threads it starts later) on the first CPU;
    the other CPUs, for the senders, are returned."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    os.sched_setaffinity(0, cpus[:1])
    return set(cpus[1:])


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def consume(node: Transport, slow: float) -> None:
    """Answer every HELLO at once; drop everything else, after `slow` seconds for a big one."""
    while True:
        envelope = await node.recv()
        if envelope.message.kind is MessageKind.HELLO:
            meta = {"reply": True, **({"req": envelope.message.meta["req"]} if "req" in envelope.message.meta else {})}
            await node.send(envelope.src, Message(MessageKind.HELLO, 0, meta=meta))
        elif slow and envelope.message.tensors:
            await asyncio.sleep(slow)


async def probe(address: str, stop: asyncio.Event, rtts: list[float]) -> None:
    """A HELLO every 20 ms until `stop`; an unanswered one counts its whole wait (at most 30 s)."""
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.DEALER)
    sock.routing_id, sock.linger = b"prober", 0
    sock.connect(address)
    req = 0
    try:
        while not stop.is_set():
            req += 1
            start = time.perf_counter()
            await sock.send_multipart(encode("prober", Message(MessageKind.HELLO, 0, meta={"req": req})))
            while True:
                if not await sock.poll(30_000):
                    rtts.append(30.0)
                    break
                reply = decode(await sock.recv_multipart())
                if reply.message.meta.get("req") == req:
                    rtts.append(time.perf_counter() - start)
                    break
            await asyncio.sleep(0.02)
    finally:
        context.destroy(linger=0)


async def flood(scenario: str, slow: float, seconds: float, sender_cpus: set[int]) -> dict[str, object]:
    """One scenario; `sender_cpus` (with --pin) are the CPUs the sender processes may use."""
    async with Transport("node", "tcp://127.0.0.1:0") as node:
        consumer = asyncio.create_task(consume(node, slow))
        before = rss_mib()
        stop, rtts = asyncio.Event(), []
        prober = asyncio.create_task(probe(node.address, stop, rtts))
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        pin = (lambda: os.sched_setaffinity(0, sender_cpus)) if sender_cpus else None
        command = [sys.executable, "-c", SENDER, node.address]
        senders = [subprocess.Popen([*command, f"flooder-{i}", scenario, str(seconds)], preexec_fn=pin) for i in range(SENDERS)]
        while any(s.poll() is None for s in senders) and time.perf_counter() - started < 120:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()
        await prober
        consumer.cancel()
        for sender in senders:
            sender.kill()
        flood_seconds = time.perf_counter() - started
        rtts_ms = sorted(1000 * r for r in rtts)
        return {
            "scenario": scenario,
            "senders": SENDERS,
            "consumer_delay_s": slow,
            "rss_before_mib": round(before, 1),
            "peak_rss_increase_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before, 1),
            "protocol": PROTOCOL_VERSION,
            "budget_mib": getattr(transport, "HELD_BYTES", getattr(transport, "INBOX_BYTES", 0)) / 2**20,
            "received_mib": round(sum(node.bytes_received.values()) / 2**20, 1),
            "refused": node.refused,
            "stray_chunks": getattr(node, "stray_chunks", None),
            "hellos": len(rtts_ms),
            "pinned": bool(sender_cpus),
            "hello_p50_ms": round(rtts_ms[len(rtts_ms) // 2], 2) if rtts_ms else None,
            "hello_p99_ms": round(rtts_ms[int(len(rtts_ms) * 0.99)], 2) if rtts_ms else None,
            "hello_max_ms": round(rtts_ms[-1], 2) if rtts_ms else None,
            "seconds": round(flood_seconds, 1),
        }


def table(rows: list[dict[str, object]]) -> str:
    keys = [
        "protocol",
        "scenario",
        "consumer_delay_s",
        "peak_rss_increase_mib",
        "budget_mib",
        "received_mib",
        "refused",
        "stray_chunks",
        "hellos",
        "pinned",
        "hello_p50_ms",
        "hello_p99_ms",
        "hello_max_ms",
        "seconds",
    ]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    cli = bench_parser(__doc__)
    cli.add_argument("--scenarios", default="big,empty,multipart")
    cli.add_argument("--slow", type=float, default=0.0, help="seconds the consumer spends on each message with tensors")
    cli.add_argument("--seconds", type=float, default=10.0, help="how long each sender of empty messages keeps on")
    cli.add_argument("--pin", action="store_true", help="the node on the first CPU, the senders on the others (senders on other machines)")
    add_flags(cli, "name", "results", name="flood")
    args = parse_flags(cli)
    sender_cpus = pin_node() if args.pin else set()
    rows = []
    for scenario in args.scenarios.split(","):
        rows.append(asyncio.run(flood(scenario, args.slow, args.seconds, sender_cpus)))
        print(json.dumps(rows[-1]), flush=True)
    versions = f"Python {platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"
    shared = "the node on CPU 0, the senders on the others (--pin)" if args.pin else "every CPU shared by the node and the senders"
    setting = f"{versions}; {SENDERS} sender processes on loopback, {os.cpu_count()} CPUs, {shared}"
    intro = (__doc__ or "").split("\n\n", 1)[1]
    command = rerun_command(cli, args, skip=("name", "results"))
    write_results(
        args.results, args.name, {"setting": setting, "command": command, "rows": rows}, markdown("flood", f"{intro}\n{setting}", command, table(rows) + "\n")
    )


if __name__ == "__main__":
    main()
