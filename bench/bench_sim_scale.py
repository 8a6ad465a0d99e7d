"""Simulator at scale: wall time and peak memory against the number of nodes.

    python bench/bench_sim_scale.py --nodes 100,1000,10000 --rounds 10
    python bench/bench_sim_scale.py --trained --nodes 100 --rounds 20

Accounting-only runs (`--train none`) build every message of FedMoE-DA with its real tensor
sizes and push it through the codec and the ledger, compute gates and plans, and skip
training and evaluation: what does FedMoE-DA cost on N nodes of a random-regular-4 topology.
`--trained` runs the real thing on Fashion-MNIST (all 60,000 training images split over the
nodes by Dirichlet 0.3). Each configuration runs in its own process, so its peak RSS is its
own. Prints a table and writes bench/results/sim_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from p2pmoe.harness import add_flags, bench_parser, markdown, parse_flags, rerun_command, write_results
from p2pmoe.report import format_table


def one_run(nodes: int, rounds: int, trained: bool, out: str, embedding: str) -> dict[str, Any]:
    """Run one configuration in this process and return its figures."""
    import torch

    from p2pmoe.config import default_config, with_options
    from p2pmoe.sim.runner import run_simulation

    torch.set_num_threads(1)
    run: dict[str, Any] = {"method": "fedmoe-da", "nodes": nodes, "rounds": rounds, "topology": "random-regular:4", "seed": 0, "out": out}
    if trained:
        run.update(data="fmnist", partition="dirichlet:0.3", eval_every=rounds)
    else:
        run.update(train="none")
    cfg = with_options(default_config(**run), method_options={"embedding": embedding})
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = run_simulation(cfg, progress=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "nodes": nodes,
        "rounds": rounds,
        "mode": "trained" if trained else "accounting",
        "embedding": embedding,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),  # what the run itself used: wall time on a shared machine also counts others' load
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # 1-minute load before and after
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "messages": summary["bytes"]["messages"],
        "bytes_per_node_per_round": round(summary["bytes"]["per_node_per_round"]["total"]),
        "sim_seconds_per_round": round(summary["sim_seconds"]["comm_per_round"], 4),
        "metrics": summary["metrics"],
        "setting": summary["setting"],
    }


def run_each(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every node count in a process of its own (its peak RSS is its own); a failed one is a row with its error."""
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        command = [sys.executable, __file__, "--one", str(nodes), "--rounds", str(args.rounds), "--embedding", args.embedding, "--name", args.name]
        print(f"running {nodes} nodes ...", flush=True)
        done = subprocess.run(command + (["--trained"] if args.trained else []), capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            rows.append({"nodes": nodes, "error": done.stderr[-500:]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {rows[-1]['wall_seconds']} s ({rows[-1]['cpu_seconds']} s CPU), peak RSS {rows[-1]['peak_rss_mb']} MB", flush=True)
    return rows


def main() -> None:
    cli = bench_parser(__doc__)
    cli.add_argument("--nodes", default="100,1000,10000", help="comma-separated node counts")
    cli.add_argument("--rounds", type=int, default=10)
    cli.add_argument("--embedding", default="frozen", choices=("gossip", "frozen"), help="how FedMoE-DA shares phi")
    cli.add_argument("--trained", action="store_true", help="train on Fashion-MNIST instead of accounting only")
    add_flags(cli, "name", "results", name="sim_scale")
    cli.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one node count and print JSON
    args = parse_flags(cli)
    if args.one is not None:
        print(json.dumps(one_run(args.one, args.rounds, args.trained, f"runs/bench_{args.name}/{args.one}", args.embedding)))
        return
    rows = run_each(args)
    columns = ["nodes", "mode", "embedding", "rounds", "wall_seconds", "cpu_seconds", "load", "peak_rss_mb", "messages"]
    columns += ["bytes_per_node_per_round", "sim_seconds_per_round"]
    table = format_table([{**r, "load": "{} -> {}".format(*r["load_average"])} for r in rows if "error" not in r], columns)
    mode = "trained on Fashion-MNIST (Dirichlet 0.3, all 60,000 images)" if args.trained else "accounting only (--train none)"
    setting = (
        f"FedMoE-DA peer to peer, random-regular-4 topology, {args.rounds} rounds, phi {args.embedding}, "
        f"{mode}, seed 0, one process per row, 1 torch thread, the run's report included; this machine: 2 cores, shared "
        f"(load: the 1-minute load average before -> after each row; wall time under load counts other programs' turns, "
        f"CPU seconds are the run's own)."
    )
    write_results(args.results, args.name, rows, markdown("Simulator at scale", setting, rerun_command(cli, args, skip=("results",)), f"```\n{table}\n```\n"))


if __name__ == "__main__":
    main()
