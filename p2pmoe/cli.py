"""The `p2pmoe` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from p2pmoe.config import RunConfig, add_config_arguments, config_from_args
from p2pmoe.data.errors import DataFormatError, DataNotFoundError
from p2pmoe.report import format_table, summary_row

if TYPE_CHECKING:
    from p2pmoe.node.config import NodeConfig


def _simulate(args: argparse.Namespace) -> int:
    from p2pmoe.sim.runner import run_simulation

    summary = run_simulation(config_from_args(args), progress=not args.quiet)
    row = summary_row(summary)
    print(format_table([row], list(row)))
    print(f"run folder: {summary['setting']['out']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """FedMoE-DA and FedAvg, each as real daemons on loopback, on Fashion-MNIST."""
    from p2pmoe.node.config import Timing
    from p2pmoe.node.swarm import run_swarm

    base = config_from_args(args)
    rows, codes = [], []
    for method in ("fedmoe-da", "fedavg"):
        cfg = dataclasses.replace(base, method=method, out=f"{base.out}/{method}")
        print(f"running {method}: {cfg.nodes} daemons on loopback, {cfg.rounds} rounds ...", flush=True)
        summary = run_swarm(cfg, Timing(round_deadline=120, startup=60, linger=10))
        codes += list(summary["exit_codes"].values())
        rows.append(summary_row(summary))
    print()
    print(f"{base.data}, {base.nodes} nodes (one daemon process each), partition {base.partition}, {base.rounds} rounds, "
          f"{base.local_epochs} local epoch(s), max {base.max_train_per_node} train examples per node, "
          f"{base.experts} experts, FedMoE-DA P={base.fedmoe_p} with {base.embedding} embedding on a {base.topology} topology, seed {base.seed}")
    print(format_table(rows, list(rows[0])))
    print(f"run folders: {base.out}/fedmoe-da, {base.out}/fedavg (MB/node/round includes heartbeats)")
    return 0 if all(code == 0 for code in codes) else 1


def _check_role(cfg: "NodeConfig", role: str, path: Path) -> None:
    """A coordinator config must be the server of a server-mediated method; a node config
    must not be the server, so a swapped file fails at start, not rounds later."""
    from p2pmoe.experiment import needs_server
    from p2pmoe.naming import SERVER_ID

    if role == "coordinator" and (cfg.node_id != SERVER_ID or not needs_server(cfg.experiment)):
        raise ValueError(
            f"{path}: not a coordinator config: node_id must be {SERVER_ID!r} (got {cfg.node_id!r}) and "
            f"[experiment] method a server-mediated one (got {cfg.experiment.method!r} on {cfg.experiment.data!r}); "
            f"start clients with `p2pmoe node`"
        )
    if role == "node" and cfg.node_id == SERVER_ID:
        raise ValueError(f"{path}: node_id {SERVER_ID!r} is the coordinator; start it with `p2pmoe coordinator --config {path}`")


def _daemon(args: argparse.Namespace) -> int:
    """`p2pmoe node` and `p2pmoe coordinator`: one daemon, the same machinery for both roles."""
    import asyncio

    import torch

    from p2pmoe.node.config import load_node_config
    from p2pmoe.node.daemon import NodeDaemon

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_node_config(args.config)
    _check_role(cfg, args.command, args.config)
    if cfg.experiment.threads:
        torch.set_num_threads(cfg.experiment.threads)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(NodeDaemon(cfg).run())
    return 0


def _swarm(args: argparse.Namespace) -> int:
    from p2pmoe.node.config import Timing
    from p2pmoe.node.swarm import run_swarm

    timing = Timing(round_deadline=args.round_deadline, startup=args.startup, linger=args.linger)
    summary = run_swarm(config_from_args(args), timing)
    row = summary_row(summary)
    print(format_table([row], list(row)))
    print(f"run folder: {summary['setting']['out']}")
    return 0 if all(code == 0 for code in summary["exit_codes"].values()) else 1


def _keys(args: argparse.Namespace) -> int:
    from p2pmoe.node.security import write_keys

    for path in write_keys(args.out, args.names):
        print(path)
    return 0


def _topology(args: argparse.Namespace) -> int:
    from p2pmoe.sim.topology import write_topology

    print(write_topology(args.kind, args.nodes, args.out, args.seed, args.bandwidth, args.latency))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    simulate = sub.add_parser("simulate", help="run every node of an experiment in one process")
    add_config_arguments(simulate)
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(handler=_simulate)

    demo = sub.add_parser("demo", help="FedMoE-DA vs FedAvg on Fashion-MNIST with real daemons on loopback")
    add_config_arguments(demo)
    demo.set_defaults(handler=_demo, nodes="4", rounds="5", max_train_per_node="2000", topology="ring", out="runs/demo")
    for role, text in (
        ("node", "run one client or peer daemon from its config file"),
        ("coordinator", "run the server of a server-mediated method (fedavg, fedsasrec, fmoe-cdsr, ...) from its config file"),
    ):
        daemon = sub.add_parser(role, help=text)
        daemon.add_argument("--config", type=Path, required=True, help="node TOML (see peers/README.md)")
        daemon.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        daemon.set_defaults(handler=_daemon)

    swarm = sub.add_parser("swarm", help="run every node as a real daemon process on loopback")
    add_config_arguments(swarm)
    swarm.add_argument("--round-deadline", type=float, default=120.0, help="seconds a node waits for a round's messages")
    swarm.add_argument("--startup", type=float, default=60.0, help="seconds to wait for peers before round 0")
    swarm.add_argument("--linger", type=float, default=30.0, help="seconds a finished node keeps serving peers")
    swarm.set_defaults(handler=_swarm)

    topology = sub.add_parser("topology", help="generate a topology file (node-link JSON or edge list)")
    topology.add_argument("--kind", required=True, help="full, ring, star, random-regular:D, small-world:K:P, erdos-renyi:P")
    topology.add_argument("--nodes", type=int, required=True)
    topology.add_argument("--bandwidth", type=float, default=100e6, help="bits per second of every link")
    topology.add_argument("--latency", type=float, default=0.0005, help="seconds of every link")
    topology.add_argument("--seed", type=int, default=0)
    topology.add_argument("--out", type=Path, required=True, help=".json for node-link, .edges for an edge list")
    topology.set_defaults(handler=_topology)

    keys = sub.add_parser("keys", help="write CURVE key pairs for node names")
    keys.add_argument("--out", type=Path, required=True)
    keys.add_argument("names", nargs="+")
    keys.set_defaults(handler=_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (DataNotFoundError, DataFormatError, ValueError) as exc:
        print(f"p2pmoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
