"""Swarm memory: the peak RSS of every node process of a short swarm on loopback.

    python bench/bench_swarm_memory.py --nodes 10 --rounds 1

Nodes are configured and started exactly as `p2pmoe swarm` starts them (one process per node,
Fashion-MNIST split by Dirichlet 0.5, FedMoE-DA by default), then each is reaped with
`os.wait4`, whose resource usage is that process's own: `ru_maxrss` is its peak resident
memory over its whole life, with nothing sampled or missed between polls. RSS counts the
pages a process shares with the others (torch's libraries: about 218 MiB of `import torch`)
in full in every process, so the sum of RSS overstates what a swarm costs; every half second
the bench also sums each live node's PSS (shared pages divided among the processes sharing
them, /proc/PID/smaps_rollup) and its USS (private pages), and reads how much of the machine's
memory is in use: their peaks are what N daemons really take. The run is merged as `p2pmoe
swarm` merges it, so the table also says whether it trained and finished. Writes
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
from p2pmoe.harness import add_flags, bench_parser, markdown, parse_flags, rerun_command, write_results
from p2pmoe.node.config import Timing
from p2pmoe.node.swarm import merge_run, start_node, write_node_configs
from p2pmoe.report import format_table


def _smaps(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, USS) of a live process in KiB; zeros once it is gone."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0, 0
    return fields.get("Rss", 0), fields.get("Pss", 0), fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def _used_kib() -> int:
    """MemTotal - MemAvailable: the machine's memory in use, in KiB."""
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.split()[1:]}
    return info["MemTotal"] - info["MemAvailable"]


class Peaks:
    """Sampled peaks of the live nodes' summed RSS, PSS and USS, and of the machine's use."""

    def __init__(self) -> None:
        self.baseline = _used_kib()
        self.rss = self.pss = self.uss = self.used = 0
        self.live_at_peak = 0

    def sample(self, pids: list[int]) -> None:
        rss, pss, uss = (sum(values) for values in zip(*(_smaps(pid) for pid in pids), strict=True)) if pids else (0, 0, 0)
        self.rss, self.uss, self.used = max(self.rss, rss), max(self.uss, uss), max(self.used, _used_kib() - self.baseline)
        if pss > self.pss:
            self.pss, self.live_at_peak = pss, len(pids)


def reap(procs: dict[str, subprocess.Popen[bytes]], timeout: float, peaks: Peaks) -> dict[str, tuple[int, resource.struct_rusage | None]]:
    """Wait for every node (killing those still running after `timeout` seconds); return each
    one's exit code and its own resource usage (None for a node that had to be killed)."""
    deadline = time.monotonic() + timeout
    left = dict(procs)
    done: dict[str, tuple[int, resource.struct_rusage | None]] = {}
    next_sample = 0.0
    while left and time.monotonic() < deadline:
        if time.monotonic() >= next_sample:
            peaks.sample([proc.pid for proc in left.values()])
            next_sample = time.monotonic() + 0.5
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


Reaped = dict[str, tuple[int, resource.struct_rusage | None]]


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--method", default="fedmoe-da")
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--topology", default="full", help="e.g. random-regular:4 for 100 nodes (full: every node heartbeats every other)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before still-running nodes are killed")
    add_flags(p, "name", "results", name="swarm_memory")
    return p


def swarm(args: argparse.Namespace, sampled: Peaks) -> tuple[Reaped, dict[str, Any], float]:
    """Start every node as `p2pmoe swarm` does, reap each, merge the run: (reaped, summary, wall)."""
    out = Path("runs") / f"bench_{args.name}"
    run = {"method": args.method, "nodes": args.nodes, "rounds": args.rounds, "partition": args.partition, "topology": args.topology}
    experiment = resolve_experiment(default_config(data="fmnist", seed=0, out=str(out), **run))
    started = time.perf_counter()
    # N processes start on two cores one torch import at a time: wait for the last as long as that takes
    timing = Timing(startup=max(60.0, 6.0 * args.nodes), round_deadline=max(120.0, 6.0 * args.nodes))
    configs = write_node_configs(experiment, out, timing)
    procs = {node: start_node(path, path.parent / "node.log") for node, path in configs.items()}
    reaped = reap(procs, args.timeout, sampled)
    wall = time.perf_counter() - started
    return reaped, merge_run(experiment, out, wall, {node: code for node, (code, _) in reaped.items()}), wall


def setting_text(args: argparse.Namespace, result: dict[str, Any]) -> str:
    peaks = result["sampled_peak_total_mib"]
    return (
        f"{args.method} swarm on loopback, Fashion-MNIST, {args.nodes} nodes, {args.partition}, "
        f"{args.rounds} round(s), seed 0; one process per node ({result['setting']['start']}ed), peak RSS from each process's own rusage (os.wait4). "
        f"Largest peak: {result['max_peak_rss_mib']} MiB = {result['max_peak_rss_mb']} MB (10^6 bytes); "
        f"{len(result['nodes_finished'])} of {args.nodes} clients finished; "
        f"wall {result['wall_seconds']} s; load average {result['load_average'][0]} -> {result['load_average'][1]} on 2 shared cores.\n\n"
        f"Sampled every 0.5 s over the live nodes: peak summed RSS {peaks['rss_sum']} MiB (shared pages counted "
        f"in every process), peak summed PSS {peaks['pss_sum']} MiB with "
        f"{peaks['live_nodes_at_pss_peak']} nodes alive ({result['pss_per_node_at_peak_mib']} MiB per node), "
        f"peak summed USS {peaks['uss_sum']} MiB; the machine's memory in use rose by at most "
        f"{peaks['machine_used_over_baseline']} MiB (other work on the machine included)."
    )


def node_rows(reaped: Reaped) -> list[dict[str, Any]]:
    """Each node's exit code, peak RSS (ru_maxrss is in KiB: MiB = /1024, MB = *1024/10^6) and CPU seconds."""
    rows: list[dict[str, Any]] = []
    for node, (code, usage) in sorted(reaped.items()):
        rows.append({"node": node, "exit_code": code, "peak_rss_mib": None, "peak_rss_mb": None, "cpu_seconds": None})
        if usage is not None:
            rows[-1].update(
                peak_rss_mib=round(usage.ru_maxrss / 1024, 1),
                peak_rss_mb=round(usage.ru_maxrss * 1024 / 1e6, 1),
                cpu_seconds=round(usage.ru_utime + usage.ru_stime, 1),
            )
    return rows


def result_of(args: argparse.Namespace, rows: list[dict[str, Any]], sampled: Peaks, summary: dict[str, Any], wall: float, load: float) -> dict[str, Any]:
    setting = {"method": args.method, "data": "fmnist", "nodes": args.nodes, "rounds": args.rounds, "partition": args.partition}
    setting |= {"topology": args.topology, "seed": 0, "start": "spawn" if os.environ.get("P2PMOE_SPAWN") == "1" else "fork"}
    return {
        "setting": setting,
        "wall_seconds": round(wall, 1),
        "load_average": [round(load, 1), round(os.getloadavg()[0], 1)],
        "max_peak_rss_mb": max((r["peak_rss_mb"] for r in rows if r["peak_rss_mb"] is not None), default=None),
        "max_peak_rss_mib": max((r["peak_rss_mib"] for r in rows if r["peak_rss_mib"] is not None), default=None),
        "sampled_peak_total_mib": {
            "rss_sum": round(sampled.rss / 1024, 1),
            "pss_sum": round(sampled.pss / 1024, 1),
            "uss_sum": round(sampled.uss / 1024, 1),
            "machine_used_over_baseline": round(sampled.used / 1024, 1),
            "live_nodes_at_pss_peak": sampled.live_at_peak,
        },
        "pss_per_node_at_peak_mib": round(sampled.pss / 1024 / max(sampled.live_at_peak, 1), 1),
        "nodes_finished": summary.get("nodes_finished", []),
        "metrics": summary.get("metrics", {}),
        "per_node": rows,
    }


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    load_before, sampled = os.getloadavg()[0], Peaks()
    reaped, summary, wall = swarm(args, sampled)
    rows = node_rows(reaped)
    result = result_of(args, rows, sampled, summary, wall, load_before)
    command = ("P2PMOE_SPAWN=1 " if result["setting"]["start"] == "spawn" else "") + rerun_command(cli, args, skip=("timeout", "results"))
    table = format_table(rows, ["node", "exit_code", "peak_rss_mib", "peak_rss_mb", "cpu_seconds"])
    write_results(args.results, args.name, result, markdown("Swarm memory per process", setting_text(args, result), command, f"```\n{table}\n```\n"))
    sys.exit(0 if all(code == 0 for code, _ in reaped.values()) else 1)


if __name__ == "__main__":
    main()
