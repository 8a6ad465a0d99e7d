"""FMoE-CDSR replication: FMoE-CDSR, its two ablations, Local SASRec and FedSASRec on the same
cross-domain data, same rounds and local epochs, next to the FedDCSR paper's FKCB rows.

    python bench/bench_fmoe_cdsr.py --data fkcb --data-root DIR --rounds 10 --jobs 2 --threads 1

Every method is a full simulation (`p2pmoe simulate`), server included, with FedDCSR's
evaluation (999 negatives drawn once, seed fixed) and the run's metrics taken at the round
with the best mean validation MRR. `--jobs` runs that many methods at once, one process each
(give each `--threads 1` on a 2-core machine). Prints the table, saves
bench/results/<name>.json (one row per method) and .md, and checks the ledger's expert traffic
against the expert's parameter count. `--reuse` takes a method whose run folder already holds
a finished run of exactly this setting from there instead of running it again, so the methods
of one table can be run one at a time (one long job at a time on a shared machine) and the
same command then assembles the table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

from p2pmoe.config import RunConfig, add_config_arguments, config_from_args
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.naming import SERVER_ID
from p2pmoe.report import bench_row, format_table, rerun_command
from p2pmoe.sequential_experiment import SEQUENCE_DATA, SEQUENCE_METHODS, build_sequence_nodes, sequence_domains
from p2pmoe.sim.runner import run_simulation

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
    {"method": "paper: FedDCSR", "MRR %": 15.24, "HR@10 %": 26.07, "NDCG@10 %": 17.23,
     "Food": 28.87, "Kitchen": 11.37, "Clothing": 1.99, "Beauty": 18.73},
]


def expert_parameters(cfg: RunConfig) -> int:
    """Parameters of one FMoE-CDSR expert in this setting, read off a client built as the run builds it."""
    model = build_sequence_nodes(dataclasses.replace(cfg, method="fmoe-cdsr"), {"node-00"})["node-00"].learner.model
    return sum(t.numel() for t in model.expert_state(0).values())


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
        len(traffic.get(r, {})) == clients
        and all(t["up"] == expert_bytes and t["down"] == expert_bytes * (clients - 1) for t in traffic[r].values())
        for r in range(rounds)
    )


CPU_FILE = "bench_cpu_seconds.txt"


def _run(cfg: RunConfig) -> dict[str, Any]:
    """One method in a worker process; its CPU time says what it costs whatever ran beside it.
    The CPU time is also left in the run folder, for `finished_run`."""
    started = time.process_time()
    summary = run_simulation(cfg, progress=False)
    cpu_seconds = round(time.process_time() - started, 1)
    (Path(cfg.out) / CPU_FILE).write_text(f"{cpu_seconds}\n")
    return {**summary, "cpu_seconds": cpu_seconds}


def finished_run(cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of a run of exactly ``cfg`` finished earlier in ``cfg.out``, else None."""
    folder = Path(cfg.out)
    if not (folder / "summary.json").is_file() or not (folder / CPU_FILE).is_file():
        return None
    summary = json.loads((folder / "summary.json").read_text())
    if summary.get("setting") != json.loads(json.dumps(dataclasses.asdict(cfg))):
        return None
    return {**summary, "cpu_seconds": float((folder / CPU_FILE).read_text())}


def run_all(configs: dict[str, RunConfig], jobs: int) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
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
    if "gate_mean/own" in m:  # FMoE-CDSR: mean gate weight on the client's own branch, test split
        row["gate own %"] = 100 * m["gate_mean/own"]
    per_client_round = [t for by_node in traffic.values() for t in by_node.values()]
    count = max(len(domains) * summary["rounds"], 1)
    row["up KB/client/round"] = sum(t["up"] for t in per_client_round) / count / 1e3
    row["down KB/client/round"] = sum(t["down"] for t in per_client_round) / count / 1e3
    row["best round"] = summary["selected_round"] + 1 if "selected_round" in summary else "-"
    row["wall min"] = summary["wall_seconds"] / 60
    row["CPU min"] = summary["cpu_seconds"] / 60
    return row


def rounds_table(configs: dict[str, RunConfig], domains: list[str]) -> list[dict[str, Any]]:
    """Per method and evaluated round, read from its run folder's metrics.jsonl, finished or
    not: mean test MRR over the clients (only rounds every client reported) and, for
    FMoE-CDSR, the gate's mean weight on the own branch; per-domain MRR."""
    rows = []
    for method, cfg in configs.items():
        path = Path(cfg.out) / "metrics.jsonl"
        if not path.is_file():
            continue
        by_round: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "mrr" in record:
                by_round[record["round"]][record["node"]] = record
        for r, nodes in sorted(by_round.items()):
            if len(nodes) < len(domains):
                continue
            row = {"method": LABELS[method], "round": r + 1,
                   "MRR %": 100 * sum(n["mrr"] for n in nodes.values()) / len(nodes),
                   "valid MRR %": 100 * sum(n["valid_mrr"] for n in nodes.values()) / len(nodes)}
            row.update({d: 100 * nodes[f"node-{k:02d}"]["mrr"] for k, d in enumerate(domains)})
            if all("gate_mean/own" in n for n in nodes.values()):
                row["gate own %"] = 100 * sum(n["gate_mean/own"] for n in nodes.values()) / len(nodes)
                row.update({f"gate own {d} %": 100 * nodes[f"node-{k:02d}"]["gate_mean/own"] for k, d in enumerate(domains)})
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--only", default="", help="comma-separated methods to run (default: all five)")
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once, one process each")
    parser.add_argument("--name", default="", help="results file stem (default fmoe_cdsr_<data>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <name>.json and <name>.md")
    parser.add_argument("--reuse", action="store_true", help="take methods already run with this exact setting from their run folders")
    parser.add_argument("--rounds-table", action="store_true",
                        help="run nothing: write <name>_rounds.md, every evaluated round of each method's run folder, finished or not")
    args = parser.parse_args()
    base: RunConfig = config_from_args(args)
    methods = [m for m in args.only.split(",") if m] or list(SEQUENCE_METHODS)
    unknown = sorted(set(methods) - set(SEQUENCE_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(SEQUENCE_METHODS)}")
    if base.data not in SEQUENCE_DATA:
        parser.error(f"--data must be one of {list(SEQUENCE_DATA)}, got {base.data!r}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.method or args.out:
        parser.error("--method and --out are set per method by the benchmark; use --only and --name")
    if base.compression != "none":
        parser.error("the byte check counts float32 experts: run the replication without --compression")
    name = args.name or f"fmoe_cdsr_{base.data.replace('-', '')}"
    domains = [d.name for d in sequence_domains(base)]
    runs = f"runs/bench_{name}"
    configs = {m: dataclasses.replace(base, method=m, out=f"{runs}/{m}") for m in methods}
    if args.rounds_table:
        rows = rounds_table(configs, domains)
        columns = list(dict.fromkeys(c for row in rows for c in row))
        command = rerun_command("bench/bench_fmoe_cdsr.py", args, skip=("results", "reuse", "rounds_table"))
        text = (f"# FMoE-CDSR replication on {base.data}, round by round\n\nTest metrics in % after each round, read from "
                f"{runs}/<method>/metrics.jsonl, including runs still going (their setting is that of the command below; "
                f"unlike the summary table, this one does not check it). MRR is the mean over the clients; gate own % the gate's mean weight on the "
                f"client's own branch over its test sequences.\n\nRuns started with: `{command}`\n\n"
                f"```\n{format_table(rows, columns) if rows else '(no round evaluated yet)'}\n```\n")
        print(text)
        atomic_write_bytes(args.results / f"{name}_rounds.md", text.encode())
        return

    started = time.perf_counter()
    print(f"running {len(configs)} methods on {base.data} ({', '.join(domains)}), {args.jobs} at a time; "
          f"per-round metrics in {runs}/<method>/metrics.jsonl", flush=True)
    outcomes: dict[str, dict[str, Any] | Exception] = {}
    reused: list[str] = []
    if args.reuse:
        for method, cfg in configs.items():
            if (done := finished_run(cfg)) is not None:
                outcomes[method] = done
                reused.append(method)
                print(f"  {method}: reused the finished run in {cfg.out}", flush=True)
    for method, outcome in run_all({m: c for m, c in configs.items() if m not in outcomes}, args.jobs):
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
            rows.append({"method": method, "data": base.data, "error": str(outcome), "setting": dataclasses.asdict(configs[method])})
            table.append({"method": f"{LABELS[method]}: FAILED ({outcome})"})
            continue
        traffic = client_traffic(Path(configs[method].out))
        rows.append({**bench_row(outcome), "label": LABELS[method], "cpu_seconds": outcome["cpu_seconds"],
                     "selected_round": outcome.get("selected_round"),
                     "per_domain": {d: outcome["per_node"][f"node-{k:02d}"] for k, d in enumerate(domains)},
                     "payload_bytes_by_round": traffic})
        table.append(table_row(outcome, domains, traffic))
        if method.startswith("fmoe-cdsr"):
            ok = expert_traffic_check(traffic, base.rounds, len(domains), expert_bytes)
            checks.append(f"- {method}: in each of the {base.rounds} rounds every client uploaded {expert_bytes:,} B and "
                          f"downloaded {expert_bytes * (len(domains) - 1):,} B of tensor payload: {'yes' if ok else 'NO'}")
    if base.data == "fkcb":
        table += PAPER_FKCB
    columns = ["method", "MRR %", "HR@10 %", "NDCG@10 %", *domains, "gate own %", "up KB/client/round", "down KB/client/round", "best round", "wall min", "CPU min"]
    rendered = format_table(table, columns)
    stacks = "μ and log σ² stacks" if base.fmoe_encoder == "vae" else "μ stack only"
    setting = (f"{base.data} ({', '.join(domains)}), one client per domain; {base.rounds} rounds x {base.local_epochs} local epoch(s), "
               f"batch {base.batch_size}, Adam lr {base.lr or 1e-3} betas (0.9, 0.98), hidden {base.embed_dim}, 2 blocks, 4 heads, "
               f"dropout {base.dropout}, max length {base.max_len}, {base.negatives} sampled negatives; FMoE-CDSR encoder "
               f"{base.fmoe_encoder}, gate pooling {base.fmoe_gate_pooling}, {base.fmoe_head} head, contrastive weight {base.contrastive_weight}; "
               f"seed {base.seed}; {args.jobs} method(s) at a time, {base.threads or 'all'} torch thread(s) each; "
               f"wall time of the whole benchmark {wall / 60:.1f} min"
               + (f" ({', '.join(reused)} taken from earlier runs of this setting, run one method at a time)" if reused else ""))
    command = rerun_command("bench/bench_fmoe_cdsr.py", args, skip=("results", "reuse"))
    text = (f"# FMoE-CDSR replication on {base.data}\n\n{setting}\n\nCommand: `{command}`\n\n"
            f"Metrics in %, test split, at the round with the best mean validation MRR (best round, counted from 1); "
            f"per-domain columns are MRR; gate own % is the gate's mean weight on each client's own branch over its "
            f"test sequences (mean over clients; the rest goes to the other domains' branches). Bytes are tensor payload (headers excluded), mean per client per round; "
            f"CPU min is each method's own CPU time, wall min its wall time beside the other jobs.\n\n```\n{rendered}\n```\n\n"
            f"One expert ({stacks}, hidden {base.embed_dim}) has {expert_bytes // 4:,} parameters = {expert_bytes:,} B in float32.\n"
            + "\n".join(checks) + "\n")
    print(text)
    atomic_write_json(args.results / f"{name}.json", rows)
    atomic_write_bytes(args.results / f"{name}.md", text.encode())


if __name__ == "__main__":
    main()
