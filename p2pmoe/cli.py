"""The `p2pmoe` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from p2pmoe.config import RunConfig, add_config_arguments, config_from_args
from p2pmoe.data.errors import DataFormatError, DataNotFoundError
from p2pmoe.report import format_table, summary_row


def _simulate(args: argparse.Namespace) -> int:
    from p2pmoe.sim.runner import run_simulation

    summary = run_simulation(config_from_args(args), progress=not args.quiet)
    row = summary_row(summary)
    print(format_table([row], list(row)))
    print(f"run folder: {summary['setting']['out']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Local vs FedAvg on Fashion-MNIST, a setting small enough for a laptop CPU."""
    from p2pmoe.sim.runner import run_simulation

    base = config_from_args(args)
    rows = []
    for method in ("local", "fedavg"):
        cfg = dataclasses.replace(base, method=method, out=f"{args.out}/{method}")
        rows.append(summary_row(run_simulation(cfg, progress=not args.quiet)))
    print()
    print(f"{base.data}, {base.nodes} nodes, partition {base.partition}, {base.rounds} rounds, "
          f"{base.local_epochs} local epoch(s), {base.experts} experts, embed {base.embed_dim}, seed {base.seed}")
    print(format_table(rows, list(rows[0])))
    print(f"run folders: {args.out}/local, {args.out}/fedavg")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    simulate = sub.add_parser("simulate", help="run every node of an experiment in one process")
    add_config_arguments(simulate)
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(handler=_simulate)

    demo = sub.add_parser("demo", help="Local vs FedAvg on Fashion-MNIST, with a results table")
    add_config_arguments(demo)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_demo, rounds="5", out="runs/demo")
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
