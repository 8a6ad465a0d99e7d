"""PF-MSMTrec on MovieLens-1M (age groups as scenarios, click and like), its four ablations and
the MMoE baselines (Local, FedAvg, FedBN-style), all under one protocol.

    python bench/bench_pf_msmtrec.py --rounds 15 --users-per-scenario 40 --lr 0.01 --batch-size 256 --jobs 1 --threads 1

Every variant is a full simulation (`p2pmoe simulate`), server included. Metrics are each
scenario's test AUC per task at the round with the best mean validation AUC, and their mean
over scenarios. Bytes are tensor payload (headers excluded) each client sent plus received, per
round. Prints the table and writes bench/results/<name>.json (one row per variant) and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from p2pmoe.config import add_experiment_arguments, config_from_args, resolve, with_options
from p2pmoe.harness import (
    add_flags,
    bench_parser,
    chosen,
    client_traffic,
    failed_row,
    markdown,
    method_defaults,
    parse_flags,
    rerun_command,
    result_row,
    run_parallel,
    write_results,
)
from p2pmoe.report import format_table
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.multitask import MultiTaskOptions, ScenarioData, scenarios

VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "local": ("Local MMoE", "local", {}),
    "fedavg": ("FedAvg MMoE", "fedavg", {}),
    "fedbn-mmoe": ("FedBN-style MMoE", "fedbn-mmoe", {}),
    "pf-msmtrec": ("PF-MSMTrec", "pf-msmtrec", {}),
    "no-template": ("PF-MSMTrec w/o template", "pf-msmtrec", {"template": False}),
    "no-pfedbn": ("PF-MSMTrec w/o parameter FedBN", "pf-msmtrec", {"fedbn": "none"}),
    "no-conflict": ("PF-MSMTrec w/o conflict coordination", "pf-msmtrec", {"conflict": False}),
    "no-personalised": ("PF-MSMTrec w/o personalised aggregation", "pf-msmtrec", {"personalised": False}),
}


DEFAULTS = method_defaults("pf-msmtrec", data="ml-1m-mtl")  # the parser accepts the --pf-* flags


def table_row(label: str, summary: dict[str, Any], names: list[str], tasks: tuple[str, ...], rounds: int) -> dict[str, Any]:
    m = summary["metrics"]
    row: dict[str, Any] = {"method": label, **{f"AUC {t}": m[f"auc/{t}"] for t in tasks}, "AUC mean": m["auc"]}
    for k, name in enumerate(names):
        node = summary["per_node"][f"node-{k:02d}"]
        row[name] = " / ".join(f"{node[f'auc/{t}']:.3f}" for t in tasks)
    traffic = client_traffic(Path(summary["out"])) if summary["bytes"]["total"] else {}
    moved = sum(t["up"] + t["down"] for by_node in traffic.values() for t in by_node.values())
    row["KB/client/round"] = moved / max(len(names) * rounds, 1) / 1e3
    chosen = summary["selection"]["round"]
    row["best round"] = chosen + 1 if chosen is not None else "-"
    row["CPU min"] = summary["cpu_seconds"] / 60
    return row


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    add_experiment_arguments(p, sys.argv[1:], DEFAULTS)
    add_flags(p, "only", "jobs", "name", "results", name="pf_msmtrec_ml1m")
    return p


def setting_text(base: ExperimentConfig, found: tuple[ScenarioData, ...], jobs: int, wall: float) -> str:
    run, task = base.run, base.task
    assert isinstance(task, MultiTaskOptions)
    sizes = ", ".join(f"{s.name} {len(s.train_idx):,}/{len(s.test_idx):,}" for s in found)
    return (
        f"{run.data}: one client per age group; rows train/test per scenario: {sizes} "
        f"({task.users_per_scenario or 'all'} users per scenario, {task.neg_per_pos} sampled negative per rating, "
        f"{task.valid_fraction:.0%} of training rows for validation); {run.rounds} rounds x {run.local_epochs} local epoch(s), "
        f"batch {run.batch_size}, Adam lr {run.lr}; MMoE: embeddings {task.embed_dim}, {task.experts} experts of "
        f"{task.expert_layers}x{task.expert_hidden}, towers {task.tower_hidden}, expert BatchNorm {task.expert_norm}; "
        f"PF-MSMTrec: {base.method.to_dict()}; seed {run.seed}; {jobs} variant(s) at a time, "
        f"{run.threads or 'all'} torch thread(s) each; wall time of the whole benchmark {wall / 60:.1f} min"
    )


def configs_of(base: ExperimentConfig, keys: list[str], name: str) -> dict[str, ExperimentConfig]:
    """Each chosen variant's run: PF-MSMTrec's variants keep the command's --pf-* options."""
    configs = {}
    for key in keys:
        _, method, overrides = VARIANTS[key]
        own = base.method.to_dict() if method == "pf-msmtrec" else {}
        configs[key] = with_options(base, method=method, out=f"runs/bench_{name}/{key}", method_options={**own, **overrides})
    return configs


def rows_of(outcomes: dict[str, Any], configs: dict[str, ExperimentConfig], found: tuple[ScenarioData, ...]) -> tuple[list, list]:
    """(JSON rows, table rows) in the variants' order, whatever ran first."""
    names, tasks, rounds = [s.name for s in found], found[0].tasks, next(iter(configs.values())).run.rounds
    rows, table = [], []
    for key, cfg in configs.items():
        label, outcome = VARIANTS[key][0], outcomes[key]
        if isinstance(outcome, Exception):
            rows.append(failed_row(label, cfg, outcome))
            table.append({"method": f"{label}: FAILED ({outcome})"})
            continue
        row = table_row(label, {**outcome, "out": cfg.run.out}, names, tasks, rounds)
        rows.append(result_row(outcome, label, domains=names, payload_kb_per_client_round=row["KB/client/round"]))
        table.append(row)
    return rows, table


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    if getattr(args, "run.method") or getattr(args, "run.out"):
        cli.error("--method and --out are set per variant by the benchmark; use --only and --name")
    base = resolve(config_from_args(args, DEFAULTS))
    configs, found = configs_of(base, chosen(cli, args, list(VARIANTS)), args.name), scenarios(base)
    print(f"running {len(configs)} variants on {base.run.data} ({', '.join(s.name for s in found)}), {args.jobs} at a time", flush=True)
    started, outcomes = time.perf_counter(), {}
    for key, outcome in run_parallel(configs, args.jobs):
        outcomes[key] = outcome
        print(f"  {key}: " + (f"FAILED: {outcome}" if isinstance(outcome, Exception) else f"mean test AUC {outcome['metrics']['auc']:.4f}"), flush=True)
    rows, table = rows_of(outcomes, configs, found)
    tasks, names = found[0].tasks, [s.name for s in found]
    columns = ["method", *(f"AUC {t}" for t in tasks), "AUC mean", *names, "KB/client/round", "best round", "CPU min"]
    reading = (
        f"Test AUC at the round with the best mean validation AUC (best round, counted from 1); task columns and "
        f"AUC mean are means over scenarios; scenario columns are {' / '.join(tasks)} AUC. KB/client/round is tensor "
        f"payload sent plus received. CPU min is each variant's own CPU time.\n\n```\n{format_table(table, columns)}\n```\n"
    )
    setting = setting_text(base, found, args.jobs, time.perf_counter() - started)
    text = markdown(f"PF-MSMTrec on {base.run.data}", setting, rerun_command(cli, args, skip=("results",)), reading)
    write_results(args.results, args.name, rows, text)


if __name__ == "__main__":
    main()
