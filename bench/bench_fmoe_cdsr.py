"""FMoE-CDSR replication: FMoE-CDSR, its two ablations, Local SASRec and FedSASRec on the same
cross-domain data, same rounds and local epochs, next to the FedDCSR paper's FKCB rows.

    python bench/bench_fmoe_cdsr.py --data fkcb --data-root DIR --rounds 10 --jobs 2 --threads 1

Every method is a full simulation (`p2pmoe simulate`), server included, with FedDCSR's
evaluation (999 negatives drawn once, seed fixed) and the run's metrics taken at the round
with the best mean validation MRR. `--jobs` runs that many methods at once, one process each
(give each `--threads 1` on a 2-core machine). Prints the table, saves
bench/results/<name>.json (one row per method) and .md, and checks the ledger's expert traffic
against the expert's parameter count. `--resume` takes a method from its run folder when it
finished there with this setting; `--report-only` runs nothing and tables finished runs and
runs stopped early (from their metrics.jsonl).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from p2pmoe.config import add_experiment_arguments, config_from_args, resolve, with_options
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.harness import (
    add_flags,
    bench_parser,
    chosen,
    client_traffic,
    failed_row,
    finished_summary,
    markdown,
    method_defaults,
    parse_flags,
    partial_summary,
    rerun_command,
    result_row,
    run_parallel,
    write_results,
)
from p2pmoe.harness.folders import Traffic
from p2pmoe.methods.fmoe_cdsr import FMoECDSROptions
from p2pmoe.naming import SERVER_ID
from p2pmoe.report import format_table
from p2pmoe.runs import read_metrics
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import resolve_device
from p2pmoe.tasks.sequential import SequenceOptions, SequentialTask, sequence_domains

LABELS = {
    "local": "Local SASRec",
    "fedsasrec": "FedSASRec",
    "fmoe-cdsr": "FMoE-CDSR",
    "fmoe-cdsr-uniform": "FMoE-CDSR, no gate (uniform)",
    "fmoe-cdsr-unfrozen": "FMoE-CDSR, foreign experts fine-tuned",
    "fmoe-cdsr-local": "Local, FMoE-CDSR branch",
    "fmoe-cdsr-fedavg": "FedSASRec, FMoE-CDSR branch",
}
MIXTURES = ("fmoe-cdsr", "fmoe-cdsr-uniform", "fmoe-cdsr-unfrozen")
"""The methods that move one expert up and K-1 down each round (checked against the ledger)."""
# FedDCSR paper, FKCB, same data and protocol (%, mean of the 4 domains); hidden 256, 40-60 rounds
PAPER_FKCB = [
    {"method": "paper: FedSASRec", "MRR %": 2.94, "HR@10 %": 5.88, "NDCG@10 %": 3.36},
    {"method": "paper: FedContrastVAE", "MRR %": 11.84, "HR@10 %": 20.18, "NDCG@10 %": 13.19},
    {"method": "paper: LocalContrastVAE", "MRR %": 12.11},
    {"method": "paper: FedDCSR", "MRR %": 15.24, "HR@10 %": 26.07, "NDCG@10 %": 17.23, "Food": 28.87, "Kitchen": 11.37, "Clothing": 1.99, "Beauty": 18.73},
]


METHODS = tuple(LABELS)


def device_name(requested: str) -> str:
    """What the runs trained on, as a reader wants it named (the GPU's model, or "CPU"); a
    device this machine lacks (a table made here of runs done elsewhere) is named as asked."""
    if requested == "cuda" and not torch.cuda.is_available():
        return "cuda (runs done elsewhere)"
    device = resolve_device(requested)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()


def expert_parameters(cfg: ExperimentConfig) -> int:
    """Parameters of one FMoE-CDSR expert in this setting, read off the coordinator's template."""
    server = build_experiment(resolve_experiment(with_options(cfg, method="fmoe-cdsr")), only=SERVER_ID).nodes[SERVER_ID]
    return sum(t.numel() for t in server.template.values())  # type: ignore[attr-defined]


def expert_traffic_check(traffic: dict[int, dict[str, dict[str, int]]], rounds: int, clients: int, expert_bytes: int) -> bool:
    """Every round, every client uploaded exactly one expert and downloaded exactly K-1."""
    return all(
        len(traffic.get(r, {})) == clients and all(t["up"] == expert_bytes and t["down"] == expert_bytes * (clients - 1) for t in traffic[r].values())
        for r in range(rounds)
    )


def table_row(summary: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    m = summary["metrics"]
    label = LABELS[summary["method"]]
    if "rounds_done" in summary:
        done, cap = summary["rounds_done"], summary.get("first_rounds")
        first = cap is not None and done == min(cap, summary["rounds"])
        label += f" (first {done} of {summary['rounds']} rounds)" if first else f" (stopped after {done} of {summary['rounds']} rounds)"
    row = {
        "method": label,
        "MRR %": 100 * m["mrr"],
        "HR@10 %": 100 * m["hr@10"],
        "NDCG@10 %": 100 * m["ndcg@10"],
    }
    for k, name in enumerate(domains):
        row[name] = 100 * summary["per_node"][f"node-{k:02d}"]["mrr"]
    if "gate_mean/own" in m:
        row["gate own %"] = 100 * m["gate_mean/own"]
    by_kind = summary["bytes"].get("per_node_per_round", {}).get("by_kind")
    if by_kind is not None:  # a run stopped early has no byte totals
        row["up KB/client/round"] = by_kind.get("model_update", 0) / 1e3
        row["down KB/client/round"] = by_kind.get("model_global", 0) / 1e3
    chosen = summary["selection"]["round"]
    row["best round"] = chosen + 1 if chosen is not None else "-"
    for column, key in (("wall min", "wall_seconds"), ("CPU min", "cpu_seconds")):
        if summary.get(key) is not None:
            row[column] = summary[key] / 60
    return row


def rounds_table(methods: dict[str, Path], domains: list[str]) -> str:
    """Every evaluated round of each mixture run in ``methods`` (finished or not): mean test and
    validation MRR over the clients and the gate's mean weight on each client's own branch,
    so a reader sees when, and how much, the gate turns to the other domains' experts."""
    lines = []
    for method, folder in methods.items():
        path = folder / "metrics.jsonl"
        if not path.is_file():
            continue
        by_round: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
        for row in read_metrics(path):
            if "metrics" in row:
                by_round[row["round"]][row["node"]] = row["metrics"]
        table = []
        for r, nodes in sorted(by_round.items()):
            if len(nodes) < len(domains):
                continue  # the round a stopped run did not finish
            ordered = [nodes[f"node-{k:02d}"] for k in range(len(domains))]
            row: dict[str, Any] = {"round": r + 1}
            row["MRR %"] = 100 * sum(m["mrr"] for m in ordered) / len(ordered)
            row["valid MRR %"] = 100 * sum(m["valid_mrr"] for m in ordered) / len(ordered)
            row["gate own %"] = 100 * sum(m["gate_mean/own"] for m in ordered) / len(ordered)
            for name, m in zip(domains, ordered, strict=True):
                row[f"own {name} %"] = 100 * m["gate_mean/own"]
            table.append(row)
        if table:
            columns = ["round", "MRR %", "valid MRR %", "gate own %", *(f"own {d} %" for d in domains)]
            lines.append(f"## {LABELS[method]}\n\n```\n{format_table(table, columns)}\n```\n")
    return "\n".join(lines)


DEFAULTS = method_defaults("fmoe-cdsr", data="fkcb")  # the parser accepts the --fmoe-* flags
Outcome = dict[str, Any] | Exception


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    add_experiment_arguments(p, sys.argv[1:], DEFAULTS)
    add_flags(p, "only", "jobs", "name", "results", "resume", "checkpoint_every", "report_only", "first_rounds")
    return p


def from_folders(args: argparse.Namespace, configs: dict[str, ExperimentConfig], clients: list[str]) -> dict[str, Outcome]:
    """What `--resume` or `--report-only` takes from the run folders: finished runs of this
    setting and (report only) runs stopped early; a method with nothing is an error row."""
    outcomes: dict[str, Outcome] = {}
    if not (args.resume or args.report_only):
        return outcomes
    for method, cfg in configs.items():
        if args.first_rounds:
            found = partial_summary(cfg, clients, SequentialTask.selection, args.first_rounds)
        else:
            found = finished_summary(Path(cfg.run.out), cfg) or (partial_summary(cfg, clients, SequentialTask.selection) if args.report_only else None)
        if found is not None:
            outcomes[method] = found
        elif args.report_only:
            outcomes[method] = FileNotFoundError(f"nothing to report in {cfg.run.out}")
    if outcomes:
        print(f"taken from their run folders: {', '.join(outcomes)}", flush=True)
    return outcomes


def run_pending(pending: dict[str, ExperimentConfig], args: argparse.Namespace) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for method, outcome in run_parallel(pending, args.jobs, args.checkpoint_every):
        outcomes[method] = outcome
        if isinstance(outcome, Exception):
            print(f"  {method}: FAILED: {outcome}", flush=True)
        else:
            print(f"  {method}: mean test MRR {outcome['metrics']['mrr']:.4f} after {outcome['wall_seconds'] / 60:.1f} min", flush=True)
    return outcomes


def traffic_check(method: str, outcome: dict[str, Any], traffic: Traffic | None, rounds: int, domains: list[str], expert_bytes: int) -> list[str]:
    """The line saying whether a mixture moved one expert up and K-1 down every round."""
    if traffic is None:
        return [f"- {method}: its run folder kept no ledger.csv, so its traffic per client is not checked"]
    if method not in MIXTURES:
        return []
    checked = outcome.get("rounds_done") or rounds  # a run stopped early: the rounds it logged
    ok = expert_traffic_check(traffic, checked, len(domains), expert_bytes)
    return [
        f"- {method}: in each of the {checked} rounds every client uploaded {expert_bytes:,} B and "
        f"downloaded {expert_bytes * (len(domains) - 1):,} B of tensor payload: {'yes' if ok else 'NO'}"
    ]


def rows_and_checks(outcomes: dict[str, Outcome], configs: dict[str, ExperimentConfig], domains: list[str], expert_bytes: int) -> tuple[list, list, list[str]]:
    """(JSON rows, table rows, traffic check lines) in the methods' order."""
    rows, table, checks = [], [], []
    for method, cfg in configs.items():
        outcome = outcomes[method]
        if isinstance(outcome, Exception):
            rows.append(failed_row(LABELS[method], cfg, outcome))
            table.append({"method": f"{LABELS[method]}: FAILED ({outcome})"})
            continue
        ledger = Path(cfg.run.out) / "ledger.csv"
        traffic = client_traffic(ledger.parent) if ledger.is_file() else None
        extra = {"rounds_done": outcome.get("rounds_done", cfg.run.rounds), "payload_bytes_by_round": traffic}
        rows.append(result_row(outcome, LABELS[method], domains=domains, **extra))
        table.append(table_row(outcome, domains))
        checks += traffic_check(method, outcome, traffic, cfg.run.rounds, domains, expert_bytes)
    return rows, table, checks


def setting_text(base: ExperimentConfig, domains: list[str], done: str) -> str:
    run, task, fmoe = base.run, base.task, base.method
    assert isinstance(task, SequenceOptions) and isinstance(fmoe, FMoECDSROptions)
    return (
        f"{run.data} ({', '.join(domains)}), one client per domain; {run.rounds} rounds x {run.local_epochs} local epoch(s), "
        f"batch {run.batch_size}, Adam lr {run.lr} betas (0.9, 0.98), hidden {task.embed_dim}, {task.blocks} blocks, {task.heads} heads, "
        f"dropout {task.dropout}, max length {task.max_len}, {task.negatives} sampled negatives; FMoE-CDSR encoder "
        f"{fmoe.encoder}, gate pooling {fmoe.gate_pooling}, {fmoe.head} head, embedding init {fmoe.init}, KL {'on' if fmoe.encoder == 'vae' else 'off'}, "
        f"graph layer {'on' if fmoe.graph else 'off'}, {'official' if fmoe.input_norm else 'SASRec'} encoder input, "
        f"contrastive weight {fmoe.contrastive_weight}"
        f"{f', foreign experts as after {fmoe.expert_epochs} epoch(s)' if fmoe.expert_epochs else ''}; "
        f"seed {run.seed}; {run.threads or 'all'} torch thread(s) each, on {device_name(run.device)}; {done}"
    )


def report_sections(table: list[dict[str, Any]], checks: list[str], base: ExperimentConfig, domains: list[str], expert_bytes: int) -> str:
    """The table with its reading, the expert size and traffic checks, and every mixture's rounds."""
    task = base.task
    assert isinstance(task, SequenceOptions) and isinstance(base.method, FMoECDSROptions)
    columns = ["method", "MRR %", "HR@10 %", "NDCG@10 %", *domains, "gate own %", "up KB/client/round", "down KB/client/round"]
    columns += ["best round", "wall min", "CPU min"]
    stacks = "μ and log σ² stacks" if base.method.encoder == "vae" else "μ stack only"
    text = (
        f"Metrics in %, test split, at the round with the best mean validation MRR (best round, counted from 1); "
        f"per-domain columns are MRR; gate own % is the gate's mean weight on each client's own branch over its test sequences "
        f"(mean over clients; the rest goes to the other domains' branches). Bytes are a client's uploads (model_update) and downloads "
        f"(model_global) per round, headers included, from the run's summary; "
        f"CPU min is each method's own CPU time, wall min its wall time beside the other jobs.\n\n```\n{format_table(table, columns)}\n```\n\n"
        f"One expert ({stacks}, hidden {task.embed_dim}) has {expert_bytes // 4:,} parameters = {expert_bytes:,} B in float32.\n" + "\n".join(checks) + "\n"
    )
    return text


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    if getattr(args, "run.method") or getattr(args, "run.out"):
        cli.error("--method and --out are set per method by the benchmark; use --only and --name")
    try:  # data that is not sequential is refused here: FMoE-CDSR runs on the sequential family only
        base = resolve(config_from_args(args, DEFAULTS))
    except ValueError as exc:
        cli.error(str(exc))
    if base.run.compression != "none":
        cli.error("the byte check counts float32 experts: run the replication without --compression")
    args.name = args.name or f"fmoe_cdsr_{base.run.data.replace('-', '')}"
    domains = [d.name for d in sequence_domains(base.run.data, base.run.data_root)]
    configs = {m: with_options(base, method=m, out=f"runs/bench_{args.name}/{m}") for m in chosen(cli, args, METHODS)}
    started, outcomes = time.perf_counter(), from_folders(args, configs, [f"node-{k:02d}" for k in range(len(domains))])
    pending = {m: cfg for m, cfg in configs.items() if m not in outcomes}
    if pending:
        where = f"per-round metrics in runs/bench_{args.name}/<method>/metrics.jsonl"
        print(f"running {len(pending)} methods on {base.run.data} ({', '.join(domains)}), {args.jobs} at a time; {where}", flush=True)
    outcomes |= run_pending(pending, args)
    wall, expert_bytes = time.perf_counter() - started, 4 * expert_parameters(base)
    done = f"{args.jobs} method(s) at a time, wall time of the whole benchmark {wall / 60:.1f} min"
    done = done if pending else "every method taken from its run folder (--resume / --report-only), so no wall time of the whole"
    rows, table, checks = rows_and_checks(outcomes, configs, domains, expert_bytes)
    table += PAPER_FKCB if base.run.data == "fkcb" else []
    text = report_sections(table, checks, base, domains, expert_bytes)
    text += rounds_part({m: Path(cfg.run.out) for m, cfg in configs.items() if m in MIXTURES}, domains)
    command = rerun_command(cli, args, skip=("results", "checkpoint_every") + (() if args.first_rounds else ("first_rounds",)))
    write_results(args.results, args.name, rows, markdown(f"FMoE-CDSR replication on {base.run.data}", setting_text(base, domains, done), command, text))


def rounds_part(folders: dict[str, Path], domains: list[str]) -> str:
    rounds = rounds_table(folders, domains)
    if not rounds:
        return ""
    return (
        "\nEvery evaluated round of the mixtures (test and validation MRR, mean over clients; gate own %: the gate's mean "
        "weight on the client's own branch over its test sequences, mean over clients and per client):\n\n" + rounds
    )


if __name__ == "__main__":
    main()
