"""Communication-overhead benchmark: FedMoE-DA against Local, FedAvg and gossip D-PSGD on
Fashion-MNIST, same rounds and local epochs for all, side by side in one run.

    python bench/bench_fedmoe_da.py --rounds 20 --max-train-per-node 2000          # 10 nodes
    python bench/bench_fedmoe_da.py --nodes 100 --participation 0.1 --alphas 0.3 \
        --rounds 40 --eval-every 10 --rings false --name fedmoe_da_100       # all 60,000 images

For each Dirichlet alpha, every method runs on the full topology; for the last alpha the
peer-to-peer methods run again on a ring (simulated time, full vs ring; `--rings false` skips
it). FedMoE-DA runs with each way of sharing φ (issue 16): gossip with all neighbours every
round (the original), with one partner of a seeded random matching, every second round, 8-bit
with error feedback, all of these at once with 8-bit experts, frozen, pretrained on MNIST
digits and frozen (`make phi` writes the file; the variant is skipped without it), and the
server-assisted variant. `--participation` applies to every method alike (server methods
sample clients, peer-to-peer ones sample peers: the same expected number of active nodes).
Prints a table per alpha, saves bench/results/<name>.json and .md, and plots personalised
accuracy against cumulative bytes per client with the report's figure
(bench/results/<name>_*.png; `p2pmoe report` on the run folders draws the rest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from p2pmoe.config import add_experiment_arguments, config_from_args, resolve, with_options
from p2pmoe.harness import add_flags, bench_parser, chosen, markdown, method_defaults, parse_flags, rerun_command, result_row, slug, write_results
from p2pmoe.harness.writer import Figure
from p2pmoe.report import format_table, load_run
from p2pmoe.report.figures import metric_vs_bytes
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.runner import run_simulation
from p2pmoe.tasks.image import ImageOptions

PHI_FILE = "runs/phi/mnist5k-d64.safetensors"  # what `make phi` writes
CHEAP_NOTE = "int8 φ is `--compression embedding=int8` with error feedback, int8 experts `expert_response=int8`"
ALL = {"embedding": "gossip", "embedding_peers": "all", "embedding_every": 1, "embedding_error_feedback": False}  # the original
CHEAP = {"embedding": "gossip", "embedding_peers": "matching", "embedding_every": 2, "embedding_error_feedback": True}
# (label, method, [method] changes, [run] changes); the label is what tables and plots call the run
VARIANTS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("local", "local", {}, {}),
    ("fedavg", "fedavg", {}, {}),
    ("gossip", "gossip", {}, {}),
    ("fedmoe-da (p2p, φ gossip all)", "fedmoe-da", ALL, {}),
    ("fedmoe-da (p2p, φ matching)", "fedmoe-da", {**ALL, "embedding_peers": "matching"}, {}),
    ("fedmoe-da (p2p, φ every 2)", "fedmoe-da", {**ALL, "embedding_every": 2}, {}),
    ("fedmoe-da (p2p, φ int8+EF)", "fedmoe-da", {**ALL, "embedding_error_feedback": True}, {"compression": "embedding=int8"}),
    ("fedmoe-da (p2p, cheap: φ matching/2 int8+EF, int8 experts)", "fedmoe-da", CHEAP, {"compression": "embedding=int8,expert_response=int8"}),
    ("fedmoe-da (p2p, frozen φ)", "fedmoe-da", {"embedding": "frozen"}, {}),
    ("fedmoe-da (p2p, pretrained φ, int8 experts)", "fedmoe-da", {"embedding": "pretrained", "phi_path": PHI_FILE}, {"compression": "expert_response=int8"}),
    ("fedmoe-da (server-assisted)", "fedmoe-da-server", {}, {}),
]
P2P = {"gossip", "fedmoe-da"}
DEFAULTS = method_defaults("fedmoe-da")  # the parser accepts FedMoE-DA's --fedmoe-* flags (P, τ, I)


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


def runnable(label: str, method: str, options: dict[str, Any], topology: str, wanted: list[str]) -> bool:
    """Whether a variant runs on `topology`: chosen, peer to peer on a ring, and with its φ file."""
    if label not in wanted or (topology == "ring" and method not in P2P):
        return False
    if options.get("phi_path") and not Path(options["phi_path"]).is_file():
        print(f"skipping {label}: {options['phi_path']} is missing (make phi writes it)", flush=True)
        return False
    return True


def run_alpha(
    args: argparse.Namespace, base: ExperimentConfig, alpha: str, topologies: tuple[str, ...], wanted: list[str]
) -> tuple[list[dict[str, Any]], str, dict[str, Figure]]:
    """Every chosen variant at one Dirichlet alpha on each topology: its rows, its table and
    its figure of accuracy against bytes (the full topology's runs)."""
    rows, tables, curves, fedavg_bytes = [], [], [], None
    for topology in topologies:
        for label, method, options, run_changes in (v for v in VARIANTS if runnable(v[0], v[1], v[2], topology, wanted)):
            out = Path("runs") / f"bench_{args.name}" / f"alpha{alpha}" / topology / slug(label)
            cfg = variant(base, method, options, partition=f"dirichlet:{alpha}", topology=topology, out=str(out), **run_changes)
            print(f"running {label} on {topology}, alpha {alpha}", flush=True)
            summary = run_simulation(cfg)
            if label == "fedavg":
                fedavg_bytes = summary["bytes"]["per_node_per_round"]["total"]
            rows.append(result_row(summary, label, case=f"alpha {alpha}, {topology}", sim_seconds=summary["sim_seconds"]))
            tables.append(table_row(label, topology, summary, fedavg_bytes))
            if topology == "full":
                curves.append(load_run(out, label))
    png = f"{args.name}_alpha{alpha}.png"
    text = f"## Dirichlet alpha = {alpha}\n\n```\n{format_table(tables, list(tables[0]))}\n```\n\n![accuracy vs bytes]({png})\n"
    print(text)
    return rows, text, {png: lambda folder, file: metric_vs_bytes(curves, folder, file)}


def setting_text(base: ExperimentConfig) -> str:
    run, task, fedmoe = resolve(base).run, base.task, variant(base, "fedmoe-da", {}).method.to_dict()
    assert isinstance(task, ImageOptions)  # checked by main
    return (
        f"{run.data}, {run.nodes} nodes, {run.rounds} rounds, {run.local_epochs} local epoch(s), batch {run.batch_size}, "
        f"SGD lr {run.lr} momentum {task.momentum}, "
        f"{'all training examples' if run.max_train_per_node is None else f'max {run.max_train_per_node} train examples per node'}, "
        f"participation {run.participation} (each round a seeded sample of that fraction of the nodes trains and sends), "
        f"global accuracy on a seeded sample of {task.global_test_size} test images, evaluated every {run.eval_every} round(s), "
        f"MoE: CNN φ (embed {task.embed_dim}), {task.experts} experts (hidden {task.expert_hidden}), {task.gate} gate; "
        f"FedMoE-DA P={fedmoe['p']}, τ={fedmoe['tau']}, I={fedmoe['interval']}, hops {run.hops}; "
        f"links {run.link_bandwidth / 1e6:g} Mbit/s, {run.link_latency * 1e3:g} ms; seed {run.seed}"
        f"; compression: none unless the label says int8 ({CHEAP_NOTE})"
    )


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    add_experiment_arguments(p, sys.argv[1:], DEFAULTS)
    p.add_argument("--alphas", default="0.3,0.5")
    add_flags(p, "only")
    p.add_argument("--rings", default="true", choices=("true", "false"), help="also run the peer-to-peer methods on a ring (last alpha)")
    add_flags(p, "name", "results", name="fedmoe_da")
    return p


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    base = config_from_args(args, DEFAULTS)
    if not isinstance(base.task, ImageOptions):
        cli.error(f"--data {base.run.data}: this benchmark runs image data sets")
    wanted = chosen(cli, args, [v[0] for v in VARIANTS], parts=True)
    rows, sections, figures, alphas = [], [], {}, args.alphas.split(",")
    for alpha in alphas:
        topologies = ("full", "ring") if alpha == alphas[-1] and args.rings == "true" else ("full",)
        done, text, drawn = run_alpha(args, base, alpha, topologies, wanted)
        rows, figures = rows + done, {**figures, **drawn}
        sections.append(text)
    command = rerun_command(cli, args, skip=("results",))
    text = markdown("FedMoE-DA communication benchmark", setting_text(base), command, *sections)
    write_results(args.results, args.name, rows, text, figures, echo=False)


if __name__ == "__main__":
    main()
