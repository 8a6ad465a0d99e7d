"""Swarm memory: the peak RSS of every node process of a short swarm on loopback.

    python bench/bench_swarm_memory.py --nodes 10 --rounds 1

Nodes are configured and started exactly as `p2pmoe swarm` starts them (one process per node,
Fashion-MNIST split by Dirichlet 0.5, FedMoE-DA by default), then each is reaped with
`os.wait4`, whose resource usage is that process's own: `ru_maxrss` is its peak resident
memory over its whole life, with nothing sampled or missed between polls. The run is merged
as `p2pmoe swarm` merges it, so the table also says whether it trained and finished. Writes
bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p2pmoe.config import default_config
from p2pmoe.experiment import resolve_experiment
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.node.config import Timing
from p2pmoe.node.swarm import merge_run, start_node, write_node_configs
from p2pmoe.report import format_table

RESULTS = Path(__file__).parent / "results"


def reap(procs: dict[str, subprocess.Popen[bytes]], timeout: float) -> dict[str, tuple[int, resource.struct_rusage | None]]:
    """Wait for every node (killing those still running after `timeout` seconds); return each
    one's exit code and its own resource usage (None for a node that had to be killed)."""
    deadline = time.monotonic() + timeout
    left = dict(procs)
    done: dict[str, tuple[int, resource.struct_rusage | None]] = {}
    while left and time.monotonic() < deadline:
        for node, proc in list(left.items()):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
                done[node] = (proc.returncode, usage)
                del left[node]
        time.sleep(0.2)
    for node, proc in left.items():
        proc.kill()
        done[node] = (proc.wait(), None)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--method", default="fedmoe-da")
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before still-running nodes are killed")
    parser.add_argument("--name", default="swarm_memory", help="results file stem")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    out = Path("runs") / f"bench_{args.name}"
    experiment = resolve_experiment(
        default_config(method=args.method, data="fmnist", nodes=args.nodes, rounds=args.rounds, partition=args.partition, seed=0, out=str(out))
    )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    configs = write_node_configs(experiment, out, Timing())
    procs = {node: start_node(path, path.parent / "node.log") for node, path in configs.items()}
    reaped = reap(procs, args.timeout)
    wall = time.perf_counter() - started
    summary = merge_run(experiment, out, wall, {node: code for node, (code, _) in reaped.items()})
    rows: list[dict[str, Any]] = []
    for node, (code, usage) in sorted(reaped.items()):
        rows.append({"node": node, "exit_code": code, "peak_rss_mib": None, "peak_rss_mb": None, "cpu_seconds": None})
        if usage is not None:  # ru_maxrss is in KiB: MiB = /1024, MB (10^6 bytes) = *1024/10^6
            rows[-1].update(
                peak_rss_mib=round(usage.ru_maxrss / 1024, 1),
                peak_rss_mb=round(usage.ru_maxrss * 1024 / 1e6, 1),
                cpu_seconds=round(usage.ru_utime + usage.ru_stime, 1),
            )
    peaks = [r["peak_rss_mb"] for r in rows if r["peak_rss_mb"] is not None]
    peaks_mib = [r["peak_rss_mib"] for r in rows if r["peak_rss_mib"] is not None]
    result = {
        "setting": {"method": args.method, "data": "fmnist", "nodes": args.nodes, "rounds": args.rounds, "partition": args.partition, "seed": 0},
        "wall_seconds": round(wall, 1),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "max_peak_rss_mb": max(peaks, default=None),
        "max_peak_rss_mib": max(peaks_mib, default=None),
        "nodes_finished": summary.get("nodes_finished", []),
        "metrics": summary.get("metrics", {}),
        "per_node": rows,
    }
    command = f"python bench/bench_swarm_memory.py --nodes {args.nodes} --rounds {args.rounds} --method {args.method}"
    command += f" --partition {args.partition} --name {args.name}"
    text = (
        f"# Swarm memory per process\n\n{args.method} swarm on loopback, Fashion-MNIST, {args.nodes} nodes, {args.partition}, "
        f"{args.rounds} round(s), seed 0; one process per node, peak RSS from each process's own rusage (os.wait4). "
        f"Largest peak: {result['max_peak_rss_mib']} MiB = {result['max_peak_rss_mb']} MB (10^6 bytes); "
        f"{len(result['nodes_finished'])} of {args.nodes} clients finished; "
        f"wall {result['wall_seconds']} s; load average {result['load_average'][0]} -> {result['load_average'][1]} on 2 shared cores.\n\n"
        f"Command: `{command}`\n\n```\n{format_table(rows, ['node', 'exit_code', 'peak_rss_mib', 'peak_rss_mb', 'cpu_seconds'])}\n```\n"
    )
    print(text)
    atomic_write_json(args.results / f"{args.name}.json", result)
    atomic_write_bytes(args.results / f"{args.name}.md", text.encode())
    sys.exit(0 if all(code == 0 for code, _ in reaped.values()) else 1)


if __name__ == "__main__":
    main()
