"""What wire compression costs and saves: FedAvg on Fashion-MNIST with compression off, fp16
and 8-bit, side by side in one run, plus the error each scheme puts on the trained weights.

    python bench/bench_compression.py --nodes 5 --rounds 5 --max-train-per-node 2000

Prints a table and saves bench/results/compression.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from p2pmoe.config import add_experiment_arguments, config_from_args, with_options
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.methods.base import LearnerMethod
from p2pmoe.models.params import float_state
from p2pmoe.report import bench_row, format_table, rerun_command
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.runner import run_simulation
from p2pmoe.wire.compression import compression_error

RESULTS = Path(__file__).parent / "results"
SCHEMES = ("none", "fp16", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, sys.argv[1:])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for compression.json and .md")
    args = parser.parse_args()
    base = with_options(config_from_args(args), method="fedavg")
    rows, table = [], []
    for scheme in SCHEMES:
        cfg = with_options(base, compression=scheme, out=f"runs/bench_compression/{scheme}")
        summary = run_simulation(cfg)
        rows.append(bench_row(summary))
        table.append({"compression": scheme, **summary["metrics"], "MB/node/round": summary["bytes"]["per_node_per_round"]["total"] / 1e6})
    reference = trained_weights(base)
    for row, line in zip(rows, table, strict=True):
        error = compression_error(reference, line["compression"])
        row["metrics"].update({"weight_rel_l2": error["rel_l2"], "weight_max_abs": error["max_abs"]})
        line.update({"rel L2 err": error["rel_l2"], "max abs err": error["max_abs"]})
    run = base.run
    setting = (
        f"FedAvg on {run.data}, {run.nodes} nodes, partition {run.partition}, {run.rounds} rounds, "
        f"max {run.max_train_per_node} train examples per node, seed {run.seed}; weight errors measured on "
        f"node-00's model after {run.rounds} epochs of local training"
    )
    text = format_table(table, list(table[0]))
    print(setting)
    print(text)
    atomic_write_json(args.results / "compression.json", rows)
    command = rerun_command("bench/bench_compression.py", args, skip=("results",), parser=parser)
    atomic_write_bytes(args.results / "compression.md", f"# compression\n\n{setting}\n\n```\n{text}\n```\n\nCommand: `{command}`\n".encode())


def trained_weights(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """Realistic weights to measure compression error on: node-00 trained alone for `rounds` epochs."""
    node = build_experiment(resolve_experiment(with_options(cfg, method="local")), only="node-00").nodes["node-00"]
    assert isinstance(node, LearnerMethod)
    for r in range(cfg.run.rounds):
        node.train_local(r)
    return float_state(node.learner.model)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
