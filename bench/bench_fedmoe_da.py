"""Communication-overhead benchmark: FedMoE-DA against Local, FedAvg and gossip D-PSGD on
Fashion-MNIST, same rounds and local epochs for all, side by side in one run.

    python bench/bench_fedmoe_da.py --rounds 20 --max-train-per-node 2000

For each Dirichlet alpha, every method runs on the full topology; for the last alpha the
peer-to-peer methods run again on a ring (simulated time, full vs ring). Prints a table per alpha, saves bench/results/fedmoe_da.json and .md, and
plots personalised accuracy against cumulative bytes per client with the report's figure
(bench/results/fedmoe_da_*.png; `p2pmoe report` on the run folders draws the rest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from p2pmoe.config import Values, add_experiment_arguments, config_from_args, empty_values, resolve, with_options
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.report import bench_row, format_table, load_run, rerun_command
from p2pmoe.report.figures import metric_vs_bytes
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.runner import run_simulation
from p2pmoe.tasks.image import ImageOptions

RESULTS = Path(__file__).parent / "results"
# (label, method, [method] changes); the label is what tables and plots call the run
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("local", "local", {}),
    ("fedavg", "fedavg", {}),
    ("gossip", "gossip", {}),
    ("fedmoe-da (p2p, gossip φ)", "fedmoe-da", {"embedding": "gossip"}),
    ("fedmoe-da (p2p, frozen φ)", "fedmoe-da", {"embedding": "frozen"}),
    ("fedmoe-da (server-assisted)", "fedmoe-da-server", {}),
]
P2P = {"gossip", "fedmoe-da"}


def defaults() -> Values:
    """The parser is built for FedMoE-DA, so its --fedmoe-* flags (P, τ, I) are accepted."""
    values = empty_values()
    values["run"]["method"] = "fedmoe-da"
    return values


def variant(base: ExperimentConfig, method: str, options: dict[str, Any], **run: Any) -> ExperimentConfig:
    """`base` with another method: it keeps whichever of base's method options the method
    also declares (FedMoE-DA's P, τ, I for the server-assisted variant), then takes `options`."""
    return with_options(base, method_options=options, method=method, **run)


def table_row(label: str, topology: str, summary: dict[str, Any], fedavg_bytes: float | None) -> dict[str, Any]:
    m, spread = summary["metrics"], summary["metrics_spread"]
    per_round = summary["bytes"]["per_node_per_round"]["total"]
    return {
        "method": label,
        "topology": topology,
        "pers. acc": m["accuracy"],
        "± std": spread["accuracy"]["std"],
        "global acc": m["global_accuracy"],
        "KB/node/round": per_round / 1e3,
        "x fedavg bytes": per_round / fedavg_bytes if fedavg_bytes else float("nan"),
        "sim comm s/round": summary["sim_seconds"]["comm_per_round"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, sys.argv[1:], defaults())
    parser.add_argument("--alphas", default="0.3,0.5")
    parser.add_argument("--only", default="", help="comma-separated texts: run only the variants whose label contains one")
    parser.add_argument("--name", default="fedmoe_da", help="results file stem under the results folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <name>.json, .md and the plots")
    args = parser.parse_args()
    base = config_from_args(args, defaults())
    if not isinstance(base.task, ImageOptions):
        parser.error(f"--data {base.run.data}: this benchmark runs image data sets")
    wanted = [text for text in args.only.split(",") if text]
    rows, text = [], []
    alphas = args.alphas.split(",")
    for alpha in alphas:
        tables, curves, fedavg_bytes = [], [], None
        for topology in ("full", "ring") if alpha == alphas[-1] else ("full",):
            for label, method, options in VARIANTS:
                if (topology == "ring" and method not in P2P) or (wanted and not any(text in label for text in wanted)):
                    continue
                out = Path("runs/bench_fedmoe_da") / f"alpha{alpha}" / topology / label.replace(" ", "_")
                cfg = variant(base, method, options, partition=f"dirichlet:{alpha}", topology=topology, out=str(out))
                summary = run_simulation(cfg)
                if label == "fedavg":
                    fedavg_bytes = summary["bytes"]["per_node_per_round"]["total"]
                rows.append({**bench_row(summary), "label": label, "sim_seconds": summary["sim_seconds"]})
                tables.append(table_row(label, topology, summary, fedavg_bytes))
                if topology == "full":
                    curves.append(load_run(out, label))
        metric_vs_bytes(curves, args.results, f"{args.name}_alpha{alpha}.png")
        text.append(
            f"## Dirichlet alpha = {alpha}\n\n```\n{format_table(tables, list(tables[0]))}\n```\n\n![accuracy vs bytes]({args.name}_alpha{alpha}.png)\n"
        )
        print(text[-1])
    run, task, fedmoe = resolve(base).run, base.task, variant(base, "fedmoe-da", {}).method.to_dict()
    assert isinstance(task, ImageOptions)  # checked above
    setting = (
        f"{run.data}, {run.nodes} nodes, {run.rounds} rounds, {run.local_epochs} local epoch(s), batch {run.batch_size}, "
        f"SGD lr {run.lr} momentum {task.momentum}, max {run.max_train_per_node} train examples per node, "
        f"MoE: CNN φ (embed {task.embed_dim}), {task.experts} experts (hidden {task.expert_hidden}), {task.gate} gate; "
        f"FedMoE-DA P={fedmoe['p']}, τ={fedmoe['tau']}, I={fedmoe['interval']}, hops {run.hops}; "
        f"links {run.link_bandwidth / 1e6:g} Mbit/s, {run.link_latency * 1e3:g} ms; seed {run.seed}"
    )
    command = rerun_command("bench/bench_fedmoe_da.py", args, skip=("results",), parser=parser)
    atomic_write_json(args.results / f"{args.name}.json", rows)
    report = f"# FedMoE-DA communication benchmark\n\n{setting}\n\nCommand: `{command}`\n\n" + "\n".join(text)
    atomic_write_bytes(args.results / f"{args.name}.md", report.encode())


if __name__ == "__main__":
    main()
