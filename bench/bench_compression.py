"""What wire compression costs and saves: FedAvg on Fashion-MNIST with compression off, fp16
and 8-bit, side by side in one run, plus the error each scheme puts on the trained weights.

    python bench/bench_compression.py --nodes 5 --rounds 5 --max-train-per-node 2000

Prints a table and saves bench/results/compression.json and .md.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from p2pmoe.config import add_experiment_arguments, config_from_args, with_options
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.harness import add_flags, bench_parser, markdown, parse_flags, rerun_command, result_row, write_results
from p2pmoe.methods.base import LearnerMethod
from p2pmoe.models.params import float_state
from p2pmoe.report import format_table
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.runner import run_simulation
from p2pmoe.wire.compression import compression_error

SCHEMES = ("none", "fp16", "int8")


def measured(base: ExperimentConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(JSON rows, table rows): each scheme's run, with the error it puts on trained weights."""
    rows, table = [], []
    reference = trained_weights(base)
    for scheme in SCHEMES:
        summary = run_simulation(with_options(base, compression=scheme, out=f"runs/bench_compression/{scheme}"))
        error = compression_error(reference, scheme)
        rows.append(result_row(summary, scheme))
        rows[-1]["metrics"] = {**summary["metrics"], "weight_rel_l2": error["rel_l2"], "weight_max_abs": error["max_abs"]}
        mb = summary["bytes"]["per_node_per_round"]["total"] / 1e6
        table.append({"compression": scheme, **summary["metrics"], "MB/node/round": mb, "rel L2 err": error["rel_l2"], "max abs err": error["max_abs"]})
    return rows, table


def trained_weights(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """Realistic weights to measure compression error on: node-00 trained alone for `rounds` epochs."""
    node = build_experiment(resolve_experiment(with_options(cfg, method="local")), only="node-00").nodes["node-00"]
    assert isinstance(node, LearnerMethod)
    for r in range(cfg.run.rounds):
        node.train_local(r)
    return float_state(node.learner.model)  # type: ignore[attr-defined]


def main() -> None:
    cli = bench_parser(__doc__)
    add_experiment_arguments(cli, sys.argv[1:])
    add_flags(cli, "results")
    args = parse_flags(cli)
    base = with_options(config_from_args(args), method="fedavg")
    rows, table = measured(base)
    run = base.run
    setting = (
        f"FedAvg on {run.data}, {run.nodes} nodes, partition {run.partition}, {run.rounds} rounds, "
        f"max {run.max_train_per_node} train examples per node, seed {run.seed}; weight errors measured on "
        f"node-00's model after {run.rounds} epochs of local training"
    )
    text = markdown("compression", setting, rerun_command(cli, args, skip=("results",)), f"```\n{format_table(table, list(table[0]))}\n```\n")
    write_results(args.results, "compression", rows, text)


if __name__ == "__main__":
    main()
