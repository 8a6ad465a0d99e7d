"""FMoE-CDSR replication: FMoE-CDSR, its two ablations, Local SASRec and FedSASRec on the same
cross-domain data, same rounds and local epochs, next to the FedDCSR paper's FKCB rows.

    python bench/bench_fmoe_cdsr.py --data fkcb --data-root DIR --rounds 10 --jobs 2 --threads 1

Every method is a full simulation (`p2pmoe simulate`), server included, with FedDCSR's
evaluation (999 negatives drawn once, seed fixed) and the run's metrics taken at the round
with the best mean validation MRR. `--jobs` runs that many methods at once, one process each
(give each `--threads 1` on a 2-core machine). Prints the table, saves
bench/results/<name>.json (one row per method) and .md, and checks the ledger's expert traffic
against the expert's parameter count.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from p2pmoe.config import Values, add_experiment_arguments, config_from_args, empty_values, resolve, with_options
from p2pmoe.experiment import build_experiment
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.methods.fmoe_cdsr import FMoECDSROptions
from p2pmoe.naming import SERVER_ID
from p2pmoe.report import bench_row, format_table, rerun_command
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.runner import run_simulation
from p2pmoe.tasks.sequential import SequenceOptions, sequence_domains

RESULTS = Path(__file__).parent / "results"
LABELS = {
    "local": "Local SASRec",
    "fedsasrec": "FedSASRec",
    "fmoe-cdsr": "FMoE-CDSR",
    "fmoe-cdsr-uniform": "FMoE-CDSR, no gate (uniform)",
    "fmoe-cdsr-unfrozen": "FMoE-CDSR, foreign experts fine-tuned",
}
# FedDCSR paper, FKCB, same data and protocol (%, mean of the 4 domains); hidden 256, 40-60 rounds
PAPER_FKCB = [
    {"method": "paper: FedSASRec", "MRR %": 2.94, "HR@10 %": 5.88, "NDCG@10 %": 3.36},
    {"method": "paper: FedContrastVAE", "MRR %": 11.84, "HR@10 %": 20.18, "NDCG@10 %": 13.19},
    {"method": "paper: LocalContrastVAE", "MRR %": 12.11},
    {"method": "paper: FedDCSR", "MRR %": 15.24, "HR@10 %": 26.07, "NDCG@10 %": 17.23, "Food": 28.87, "Kitchen": 11.37, "Clothing": 1.99, "Beauty": 18.73},
]


METHODS = tuple(LABELS)


def expert_parameters(cfg: ExperimentConfig) -> int:
    """Parameters of one FMoE-CDSR expert in this setting, read off the coordinator's template."""
    server = build_experiment(with_options(cfg, method="fmoe-cdsr"), only=SERVER_ID).nodes[SERVER_ID]
    return sum(t.numel() for t in server.template.values())  # type: ignore[attr-defined]


def client_traffic(run_folder: Path) -> dict[int, dict[str, dict[str, int]]]:
    """Payload bytes each client uploaded to and downloaded from the server, by round."""
    traffic: dict[int, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"up": 0, "down": 0}))
    with open(run_folder / "ledger.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["dst"] == SERVER_ID:
                traffic[int(row["round"])][row["src"]]["up"] += int(row["payload_bytes"])
            elif row["src"] == SERVER_ID:
                traffic[int(row["round"])][row["dst"]]["down"] += int(row["payload_bytes"])
    return {r: {node: dict(t) for node, t in by_node.items()} for r, by_node in traffic.items()}


def expert_traffic_check(traffic: dict[int, dict[str, dict[str, int]]], rounds: int, clients: int, expert_bytes: int) -> bool:
    """Every round, every client uploaded exactly one expert and downloaded exactly K-1."""
    return all(
        len(traffic.get(r, {})) == clients and all(t["up"] == expert_bytes and t["down"] == expert_bytes * (clients - 1) for t in traffic[r].values())
        for r in range(rounds)
    )


def _run(cfg: ExperimentConfig) -> dict[str, Any]:
    """One method in a worker process; its CPU time says what it costs whatever ran beside it."""
    started = time.process_time()
    summary = run_simulation(cfg, progress=False)
    return {**summary, "cpu_seconds": round(time.process_time() - started, 1)}


def run_all(configs: dict[str, ExperimentConfig], jobs: int) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """(method, summary or the error that stopped it) as each finishes: in this process for
    one job, else `jobs` workers. One method's failure does not lose the others' results."""
    if jobs == 1:
        for method, cfg in configs.items():
            try:
                yield method, _run(cfg)
            except Exception as exc:  # reported in the table; the other methods still run
                yield method, exc
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run, cfg): method for method, cfg in configs.items()}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], error if isinstance(error, Exception) else future.result()


def table_row(summary: dict[str, Any], domains: list[str], traffic: dict[int, dict[str, dict[str, int]]]) -> dict[str, Any]:
    m = summary["metrics"]
    row = {
        "method": LABELS[summary["method"]],
        "MRR %": 100 * m["mrr"],
        "HR@10 %": 100 * m["hr@10"],
        "NDCG@10 %": 100 * m["ndcg@10"],
    }
    for k, name in enumerate(domains):
        row[name] = 100 * summary["per_node"][f"node-{k:02d}"]["mrr"]
    per_client_round = [t for by_node in traffic.values() for t in by_node.values()]
    count = max(len(domains) * summary["rounds"], 1)
    row["up KB/client/round"] = sum(t["up"] for t in per_client_round) / count / 1e3
    row["down KB/client/round"] = sum(t["down"] for t in per_client_round) / count / 1e3
    chosen = summary["selection"]["round"]
    row["best round"] = chosen + 1 if chosen is not None else "-"
    row["wall min"] = summary["wall_seconds"] / 60
    row["CPU min"] = summary["cpu_seconds"] / 60
    return row


def defaults() -> Values:
    """The parser is built for FMoE-CDSR on FKCB, so its --fmoe-* flags are accepted."""
    values = empty_values()
    values["run"].update(method="fmoe-cdsr", data="fkcb")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, sys.argv[1:], defaults())
    parser.add_argument("--only", default="", help="comma-separated methods to run (default: all five)")
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once, one process each")
    parser.add_argument("--name", default="", help="results file stem (default fmoe_cdsr_<data>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <name>.json and <name>.md")
    args = parser.parse_args()
    if getattr(args, "run.method") or getattr(args, "run.out"):
        parser.error("--method and --out are set per method by the benchmark; use --only and --name")
    try:  # data that is not sequential is refused here: FMoE-CDSR runs on the sequential family only
        base = resolve(config_from_args(args, defaults()))
    except ValueError as exc:
        parser.error(str(exc))
    methods = [m for m in args.only.split(",") if m] or list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if base.run.compression != "none":
        parser.error("the byte check counts float32 experts: run the replication without --compression")
    run, task, fmoe = base.run, base.task, base.method
    assert isinstance(task, SequenceOptions) and isinstance(fmoe, FMoECDSROptions)
    name = args.name or f"fmoe_cdsr_{run.data.replace('-', '')}"
    domains = [d.name for d in sequence_domains(run.data, run.data_root)]
    runs = f"runs/bench_{name}"
    configs = {m: with_options(base, method=m, out=f"{runs}/{m}") for m in methods}

    started = time.perf_counter()
    print(
        f"running {len(configs)} methods on {run.data} ({', '.join(domains)}), {args.jobs} at a time; per-round metrics in {runs}/<method>/metrics.jsonl",
        flush=True,
    )
    outcomes: dict[str, dict[str, Any] | Exception] = {}
    for method, outcome in run_all(configs, args.jobs):
        outcomes[method] = outcome
        if isinstance(outcome, Exception):
            print(f"  {method}: FAILED: {outcome}", flush=True)
        else:
            print(f"  {method}: mean test MRR {outcome['metrics']['mrr']:.4f} after {outcome['wall_seconds'] / 60:.1f} min", flush=True)
    wall = time.perf_counter() - started

    expert_bytes = 4 * expert_parameters(base)
    rows, table, checks = [], [], []
    for method in methods:
        outcome = outcomes[method]
        if isinstance(outcome, Exception):
            rows.append({"method": method, "data": run.data, "error": str(outcome), "setting": configs[method].to_dict()})
            table.append({"method": f"{LABELS[method]}: FAILED ({outcome})"})
            continue
        traffic = client_traffic(Path(configs[method].run.out))
        rows.append(
            {
                **bench_row(outcome),
                "label": LABELS[method],
                "cpu_seconds": outcome["cpu_seconds"],
                "selected_round": outcome["selection"]["round"],
                "per_domain": {d: outcome["per_node"][f"node-{k:02d}"] for k, d in enumerate(domains)},
                "payload_bytes_by_round": traffic,
            }
        )
        table.append(table_row(outcome, domains, traffic))
        if method.startswith("fmoe-cdsr"):
            ok = expert_traffic_check(traffic, run.rounds, len(domains), expert_bytes)
            checks.append(
                f"- {method}: in each of the {run.rounds} rounds every client uploaded {expert_bytes:,} B and "
                f"downloaded {expert_bytes * (len(domains) - 1):,} B of tensor payload: {'yes' if ok else 'NO'}"
            )
    if run.data == "fkcb":
        table += PAPER_FKCB
    columns = ["method", "MRR %", "HR@10 %", "NDCG@10 %", *domains, "up KB/client/round", "down KB/client/round", "best round", "wall min", "CPU min"]
    rendered = format_table(table, columns)
    stacks = "μ and log σ² stacks" if fmoe.encoder == "vae" else "μ stack only"
    setting = (
        f"{run.data} ({', '.join(domains)}), one client per domain; {run.rounds} rounds x {run.local_epochs} local epoch(s), "
        f"batch {run.batch_size}, Adam lr {run.lr} betas (0.9, 0.98), hidden {task.embed_dim}, {task.blocks} blocks, {task.heads} heads, "
        f"dropout {task.dropout}, max length {task.max_len}, {task.negatives} sampled negatives; FMoE-CDSR encoder "
        f"{fmoe.encoder}, gate pooling {fmoe.gate_pooling}, {fmoe.head} head, contrastive weight {fmoe.contrastive_weight}; "
        f"seed {run.seed}; {args.jobs} method(s) at a time, {run.threads or 'all'} torch thread(s) each; "
        f"wall time of the whole benchmark {wall / 60:.1f} min"
    )
    command = rerun_command("bench/bench_fmoe_cdsr.py", args, skip=("results",), parser=parser)
    text = (
        f"# FMoE-CDSR replication on {run.data}\n\n{setting}\n\nCommand: `{command}`\n\n"
        f"Metrics in %, test split, at the round with the best mean validation MRR (best round, counted from 1); "
        f"per-domain columns are MRR. Bytes are tensor payload (headers excluded), mean per client per round; "
        f"CPU min is each method's own CPU time, wall min its wall time beside the other jobs.\n\n```\n{rendered}\n```\n\n"
        f"One expert ({stacks}, hidden {task.embed_dim}) has {expert_bytes // 4:,} parameters = {expert_bytes:,} B in float32.\n" + "\n".join(checks) + "\n"
    )
    print(text)
    atomic_write_json(args.results / f"{name}.json", rows)
    atomic_write_bytes(args.results / f"{name}.md", text.encode())


if __name__ == "__main__":
    main()
