"""Local vs FedAvg on a real image data set: accuracy and bytes, side by side in one run.

    python bench/bench_baselines.py --nodes 10 --partition dirichlet:0.5 --rounds 20

Prints a table and saves bench/results/baselines_<data>.json and .md.
"""

from __future__ import annotations

import sys

from p2pmoe.config import add_experiment_arguments, config_from_args, resolve, with_options
from p2pmoe.harness import add_flags, bench_parser, markdown, parse_flags, rerun_command, result_row, write_results
from p2pmoe.report import format_table, summary_row
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.runner import run_simulation
from p2pmoe.tasks.image import ImageOptions


def for_method(base: ExperimentConfig, method: str, out: str) -> ExperimentConfig:
    """`base` run with `method`, keeping whichever of base's method options the method also has."""
    cfg = with_options(base, method=method, out=out)
    shared = {k: v for k, v in base.method.to_dict().items() if k in cfg.method.to_dict()}
    return with_options(cfg, method_options=shared)


def setting_text(base: ExperimentConfig) -> str:
    run, task = resolve(base).run, base.task
    assert isinstance(task, ImageOptions)  # checked by main
    return (
        f"{run.data}, {run.nodes} nodes, partition {run.partition}, {run.rounds} rounds, "
        f"{run.local_epochs} local epoch(s), batch {run.batch_size}, SGD lr {run.lr} momentum {task.momentum}, "
        f"{task.experts} experts, embed {task.embed_dim}, expert hidden {task.expert_hidden}, seed {run.seed}"
    )


def main() -> None:
    cli = bench_parser(__doc__)
    add_experiment_arguments(cli, sys.argv[1:])
    cli.add_argument("--methods", default="local,fedavg")
    add_flags(cli, "results")
    args = parse_flags(cli)
    base = config_from_args(args)
    if not isinstance(base.task, ImageOptions):
        cli.error(f"--data {base.run.data}: this benchmark runs image data sets")
    summaries = [run_simulation(for_method(base, method, f"runs/bench_baselines/{method}")) for method in args.methods.split(",")]
    table = format_table([summary_row(s) for s in summaries], list(summary_row(summaries[0])))
    name = f"baselines_{base.run.data}"
    text = markdown(name, setting_text(base), rerun_command(cli, args, skip=("results",)), f"```\n{table}\n```\n")
    write_results(args.results, name, [result_row(s, s["method"]) for s in summaries], text)


if __name__ == "__main__":
    main()
