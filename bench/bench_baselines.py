"""Local vs FedAvg on a real image data set: accuracy and bytes, side by side in one run.

    python bench/bench_baselines.py --nodes 10 --partition dirichlet:0.5 --rounds 20

Prints a table and saves bench/results/baselines_<data>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from p2pmoe.config import add_experiment_arguments, config_from_args, resolve, with_options
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.report import bench_row, format_table, rerun_command, summary_row
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.runner import run_simulation
from p2pmoe.tasks.image import ImageOptions

RESULTS = Path(__file__).parent / "results"


def for_method(base: ExperimentConfig, method: str, out: str) -> ExperimentConfig:
    """`base` run with `method`, keeping whichever of base's method options the method also has."""
    cfg = with_options(base, method=method, out=out)
    shared = {k: v for k, v in base.method.to_dict().items() if k in cfg.method.to_dict()}
    return with_options(cfg, method_options=shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, sys.argv[1:])
    parser.add_argument("--methods", default="local,fedavg")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for baselines_<data>.json and .md")
    args = parser.parse_args()
    base = config_from_args(args)
    if not isinstance(base.task, ImageOptions):
        parser.error(f"--data {base.run.data}: this benchmark runs image data sets")
    summaries = []
    for method in args.methods.split(","):
        summaries.append(run_simulation(for_method(base, method, f"runs/bench_baselines/{method}")))
    run, task = resolve(base).run, base.task
    assert isinstance(task, ImageOptions)  # checked above
    setting = (
        f"{run.data}, {run.nodes} nodes, partition {run.partition}, {run.rounds} rounds, "
        f"{run.local_epochs} local epoch(s), batch {run.batch_size}, SGD lr {run.lr} momentum {task.momentum}, "
        f"{task.experts} experts, embed {task.embed_dim}, expert hidden {task.expert_hidden}, seed {run.seed}"
    )
    table = format_table([summary_row(s) for s in summaries], list(summary_row(summaries[0])))
    print(setting)
    print(table)
    name = f"baselines_{run.data}"
    atomic_write_json(args.results / f"{name}.json", [bench_row(s) for s in summaries])
    command = rerun_command("bench/bench_baselines.py", args, skip=("results",), parser=parser)
    atomic_write_bytes(args.results / f"{name}.md", f"# {name}\n\n{setting}\n\n```\n{table}\n```\n\nCommand: `{command}`\n".encode())


if __name__ == "__main__":
    main()
