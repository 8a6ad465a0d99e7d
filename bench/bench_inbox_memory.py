"""Issue 26 N4: peak memory of a node flooded with well-formed big messages it consumes slowly.

A sender process pushes COUNT valid messages of SIZE MiB each (one float32 tensor) over one
connection as fast as the node lets it; the node's consumer takes one message every DELAY
seconds (a node busy training). Peak RSS of the node's process is what the flood costs it;
`accepted` counts the messages the node took (it refuses a sender's messages while that
sender already has its share of the inbox waiting).

    python bench/bench_inbox_memory.py --count 200 --size 16 --delay 0.05

Prints and saves bench/results/inbox_memory.json and .md.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time

from p2pmoe.harness import add_flags, bench_parser, markdown, parse_flags, rerun_command, write_results
from p2pmoe.node.transport import Transport

SENDER = """
import sys, zmq, torch
from p2pmoe.wire.codec import encode
from p2pmoe.wire.messages import Message, MessageKind
address, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
context = zmq.Context()
sock = context.socket(zmq.DEALER)
sock.routing_id = b"flooder"
sock.sndhwm = 0
sock.connect(address)
frames = encode("flooder", Message(MessageKind.EMBEDDING, 0, {"w": torch.zeros(size * 2**20 // 4)}))
for _ in range(count):
    sock.send_multipart(frames, copy=False)
sock.close(linger=-1)
context.term()
"""


async def flood(count: int, size: int, delay: float) -> dict[str, float]:
    async with Transport("node", "tcp://127.0.0.1:0") as node:
        start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sender = subprocess.Popen([sys.executable, "-c", SENDER, node.address, str(count), str(size)])
        started = time.perf_counter()
        accepted = 0
        while accepted < count:
            try:
                await asyncio.wait_for(node.recv(), 1)
            except TimeoutError:
                if sender.poll() is not None:  # the sender is done and nothing more comes: the rest were refused
                    break
                continue
            accepted += 1
            await asyncio.sleep(delay)
        sender.wait(timeout=60)
        return {
            "accepted": accepted,
            "count": count,
            "size_mib": size,
            "delay_s": delay,
            "rss_mib_before": start_rss,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - started,
        }


def main() -> None:
    cli = bench_parser(__doc__)
    cli.add_argument("--count", type=int, default=200)
    cli.add_argument("--size", type=int, default=16, help="MiB per message")
    cli.add_argument("--delay", type=float, default=0.05, help="seconds the consumer spends on each message")
    add_flags(cli, "name", "results", name="inbox_memory")
    args = parse_flags(cli)
    result = asyncio.run(flood(args.count, args.size, args.delay))
    setting = "One node on loopback, one sender process flooding it; peak RSS of the node's process (MiB)."
    text = markdown("Inbox memory under a flood", setting, rerun_command(cli, args, skip=("results",)), f"```\n{json.dumps(result, indent=1)}\n```\n")
    write_results(args.results, args.name, result, text)


if __name__ == "__main__":
    main()
