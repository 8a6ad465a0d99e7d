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

from bench_fmoe_cdsr import client_traffic, run_all

from p2pmoe.config import Values, add_experiment_arguments, config_from_args, empty_values, resolve, with_options
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.report import bench_row, format_table, rerun_command
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.multitask import MultiTaskOptions, scenarios

RESULTS = Path(__file__).parent / "results"
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


def defaults() -> Values:
    """The parser is built for PF-MSMTrec on ML-1M, so its --pf-* flags are accepted."""
    values = empty_values()
    values["run"].update(method="pf-msmtrec", data="ml-1m-mtl")
    return values


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, sys.argv[1:], defaults())
    parser.add_argument("--only", default="", help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once, one process each")
    parser.add_argument("--name", default="pf_msmtrec_ml1m", help="results file stem")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <name>.json and <name>.md")
    args = parser.parse_args()
    if getattr(args, "run.method") or getattr(args, "run.out"):
        parser.error("--method and --out are set per variant by the benchmark; use --only and --name")
    base = resolve(config_from_args(args, defaults()))
    chosen = [v for v in args.only.split(",") if v] or list(VARIANTS)
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    run, task = base.run, base.task
    assert isinstance(task, MultiTaskOptions)
    found = scenarios(base)
    names = [s.name for s in found]
    runs = f"runs/bench_{args.name}"
    configs: dict[str, ExperimentConfig] = {}
    for key in chosen:
        _, method, overrides = VARIANTS[key]
        own = base.method.to_dict() if method == "pf-msmtrec" else {}
        configs[key] = with_options(base, method=method, out=f"{runs}/{key}", method_options={**own, **overrides})
    started = time.perf_counter()
    print(f"running {len(configs)} variants on {run.data} ({', '.join(names)}), {args.jobs} at a time", flush=True)
    outcomes: dict[str, Any] = {}
    for key, outcome in run_all(configs, args.jobs):
        outcomes[key] = outcome
        done = f"FAILED: {outcome}" if isinstance(outcome, Exception) else f"mean test AUC {outcome['metrics']['auc']:.4f}"
        print(f"  {key}: {done}", flush=True)
    wall = time.perf_counter() - started
    rows, table = [], []
    for key in [v for v in VARIANTS if v in chosen]:  # the table in the usual order, whatever ran first
        label, outcome = VARIANTS[key][0], outcomes[key]
        if isinstance(outcome, Exception):
            rows.append({"method": key, "data": run.data, "error": str(outcome), "setting": configs[key].to_dict()})
            table.append({"method": f"{label}: FAILED ({outcome})"})
            continue
        outcome["out"] = configs[key].run.out
        row = table_row(label, outcome, names, found[0].tasks, run.rounds)
        rows.append(
            {
                **bench_row(outcome),
                "variant": key,
                "label": label,
                "cpu_seconds": outcome["cpu_seconds"],
                "selected_round": outcome["selection"]["round"],
                "per_scenario": {n: outcome["per_node"][f"node-{k:02d}"] for k, n in enumerate(names)},
                "payload_kb_per_client_round": row["KB/client/round"],
            }
        )
        table.append(row)
    tasks = found[0].tasks
    columns = ["method", *(f"AUC {t}" for t in tasks), "AUC mean", *names, "KB/client/round", "best round", "CPU min"]
    sizes = ", ".join(f"{s.name} {len(s.train_idx):,}/{len(s.test_idx):,}" for s in found)
    pf = base.method
    setting = (
        f"{run.data}: one client per age group; rows train/test per scenario: {sizes} "
        f"({task.users_per_scenario or 'all'} users per scenario, {task.neg_per_pos} sampled negative per rating, "
        f"{task.valid_fraction:.0%} of training rows for validation); {run.rounds} rounds x {run.local_epochs} local epoch(s), "
        f"batch {run.batch_size}, Adam lr {run.lr}; MMoE: embeddings {task.embed_dim}, {task.experts} experts of "
        f"{task.expert_layers}x{task.expert_hidden}, towers {task.tower_hidden}, expert BatchNorm {task.expert_norm}; "
        f"PF-MSMTrec: {pf.to_dict()}; seed {run.seed}; {args.jobs} variant(s) at a time, "
        f"{run.threads or 'all'} torch thread(s) each; wall time of the whole benchmark {wall / 60:.1f} min"
    )
    command = rerun_command("bench/bench_pf_msmtrec.py", args, skip=("results",), parser=parser)
    rendered = format_table(table, columns)
    text = (
        f"# PF-MSMTrec on {run.data}\n\n{setting}\n\nCommand: `{command}`\n\n"
        f"Test AUC at the round with the best mean validation AUC (best round, counted from 1); task columns and "
        f"AUC mean are means over scenarios; scenario columns are {' / '.join(tasks)} AUC. KB/client/round is tensor "
        f"payload sent plus received. CPU min is each variant's own CPU time.\n\n```\n{rendered}\n```\n"
    )
    print(text)
    atomic_write_json(args.results / f"{args.name}.json", rows)
    atomic_write_bytes(args.results / f"{args.name}.md", text.encode())


if __name__ == "__main__":
    main()
