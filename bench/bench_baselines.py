"""Local vs FedAvg on a real image data set: accuracy and bytes, side by side in one run.

    python bench/bench_baselines.py --nodes 10 --partition dirichlet:0.5 --rounds 20

Prints a table and saves bench/results/baselines_<data>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from p2pmoe.config import add_config_arguments, config_from_args
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.report import bench_row, format_table, rerun_command, summary_row
from p2pmoe.sim.runner import run_simulation

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--methods", default="local,fedavg")
    args = parser.parse_args()
    base = config_from_args(args)
    summaries = []
    for method in args.methods.split(","):
        cfg = dataclasses.replace(base, method=method, out=f"runs/bench_baselines/{method}")
        summaries.append(run_simulation(cfg))
    setting = (f"{base.data}, {base.nodes} nodes, partition {base.partition}, {base.rounds} rounds, "
               f"{base.local_epochs} local epoch(s), batch {base.batch_size}, SGD lr {base.lr} momentum {base.momentum}, "
               f"{base.experts} experts, embed {base.embed_dim}, expert hidden {base.expert_hidden}, seed {base.seed}")
    table = format_table([summary_row(s) for s in summaries], list(summary_row(summaries[0])))
    print(setting)
    print(table)
    name = f"baselines_{base.data}"
    atomic_write_json(RESULTS / f"{name}.json", [bench_row(s) for s in summaries])
    command = rerun_command("bench/bench_baselines.py", args)
    atomic_write_bytes(RESULTS / f"{name}.md", f"# {name}\n\n{setting}\n\n```\n{table}\n```\n\nCommand: `{command}`\n".encode())


if __name__ == "__main__":
    main()
