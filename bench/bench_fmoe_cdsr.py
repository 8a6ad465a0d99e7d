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
import dataclasses
import multiprocessing
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

from p2pmoe.config import RunConfig, add_config_arguments, config_from_args
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.models.fmoe_cdsr import Expert
from p2pmoe.naming import SERVER_ID
from p2pmoe.report import bench_row, format_table
from p2pmoe.sequential_experiment import SEQUENCE_METHODS, sequence_domains
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
    """Parameters of one FMoE-CDSR expert (μ and log σ² stacks) in this setting."""
    expert = Expert(cfg.max_len, cfg.embed_dim, heads=4, blocks=2, dropout=cfg.dropout, vae=True)
    return sum(t.numel() for t in expert.state_dict().values())


def client_traffic(run_folder: Path, round_index: int) -> dict[str, dict[str, int]]:
    """Payload bytes each client uploaded to and downloaded from the server in one round."""
    traffic: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
    with open(run_folder / "ledger.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["round"]) != round_index:
                continue
            if row["dst"] == SERVER_ID:
                traffic[row["src"]]["up"] += int(row["payload_bytes"])
            elif row["src"] == SERVER_ID:
                traffic[row["dst"]]["down"] += int(row["payload_bytes"])
    return dict(traffic)


def _run(cfg: RunConfig) -> dict[str, Any]:
    """One method in a worker process; its CPU time says what it costs whatever ran beside it."""
    started = time.process_time()
    summary = run_simulation(cfg, progress=False)
    return {**summary, "cpu_seconds": round(time.process_time() - started, 1)}


def run_all(configs: dict[str, RunConfig], jobs: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(method, summary) as each finishes: in this process for one job, else `jobs` workers."""
    if jobs == 1:
        for method, cfg in configs.items():
            yield method, _run(cfg)
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run, cfg): method for method, cfg in configs.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def table_row(summary: dict[str, Any], domains: list[str], traffic: dict[str, dict[str, int]]) -> dict[str, Any]:
    m = summary["metrics"]
    row = {
        "method": LABELS[summary["method"]],
        "MRR %": 100 * m["mrr"],
        "HR@10 %": 100 * m["hr@10"],
        "NDCG@10 %": 100 * m["ndcg@10"],
    }
    for k, name in enumerate(domains):
        row[name] = 100 * summary["per_node"][f"node-{k:02d}"]["mrr"]
    clients = [t for node, t in traffic.items() if node != SERVER_ID]
    row["up KB/client/round"] = sum(t["up"] for t in clients) / max(len(clients), 1) / 1e3
    row["down KB/client/round"] = sum(t["down"] for t in clients) / max(len(clients), 1) / 1e3
    row["best round"] = summary.get("selected_round", -1) + 1
    row["wall min"] = summary["wall_seconds"] / 60
    row["CPU min"] = summary["cpu_seconds"] / 60
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--only", default="", help="comma-separated methods to run (default: all five)")
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once, one process each")
    parser.add_argument("--name", default="", help="results file stem (default fmoe_cdsr_<data>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <name>.json and <name>.md")
    args = parser.parse_args()
    base: RunConfig = config_from_args(args)
    methods = [m for m in args.only.split(",") if m] or list(SEQUENCE_METHODS)
    unknown = sorted(set(methods) - set(SEQUENCE_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(SEQUENCE_METHODS)}")
    name = args.name or f"fmoe_cdsr_{base.data.replace('-', '')}"
    domains = [d.name for d in sequence_domains(base)]
    runs = f"runs/bench_{name}"
    configs = {m: dataclasses.replace(base, method=m, out=f"{runs}/{m}") for m in methods}

    started = time.perf_counter()
    print(f"running {len(configs)} methods on {base.data} ({', '.join(domains)}), {args.jobs} at a time; "
          f"per-round metrics in {runs}/<method>/metrics.jsonl", flush=True)
    summaries: dict[str, dict[str, Any]] = {}
    for method, summary in run_all(configs, args.jobs):
        summaries[method] = summary
        print(f"  {method}: mean test MRR {summary['metrics']['mrr']:.4f} after {summary['wall_seconds'] / 60:.1f} min", flush=True)
    wall = time.perf_counter() - started

    last_round = base.rounds - 1
    rows, table = [], []
    for method in methods:
        summary = summaries[method]
        traffic = client_traffic(Path(configs[method].out), last_round)
        rows.append({**bench_row(summary), "label": LABELS[method], "cpu_seconds": summary["cpu_seconds"], "selected_round": summary.get("selected_round"),
                     "per_domain": {d: summary["per_node"][f"node-{k:02d}"] for k, d in enumerate(domains)},
                     "last_round_payload_bytes": traffic})
        table.append(table_row(summary, domains, traffic))
    if base.data == "fkcb":
        table += PAPER_FKCB
    columns = ["method", "MRR %", "HR@10 %", "NDCG@10 %", *domains, "up KB/client/round", "down KB/client/round", "best round", "wall min", "CPU min"]
    rendered = format_table(table, columns)

    expert = expert_parameters(base)
    checks = []
    for method in methods:
        if method.startswith("fmoe-cdsr"):
            traffic = client_traffic(Path(configs[method].out), last_round)
            ok = all(t["up"] == 4 * expert and t["down"] == 4 * expert * (len(domains) - 1) for t in traffic.values())
            checks.append(f"- {method}, round {last_round + 1}: every client uploaded {4 * expert:,} B and downloaded "
                          f"{4 * expert * (len(domains) - 1):,} B of tensor payload: {'yes' if ok else 'NO'}")
    setting = (f"{base.data} ({', '.join(domains)}), one client per domain; {base.rounds} rounds x {base.local_epochs} local epoch(s), "
               f"batch {base.batch_size}, Adam lr {base.lr or 1e-3} betas (0.9, 0.98), hidden {base.embed_dim}, 2 blocks, 4 heads, "
               f"dropout {base.dropout}, max length {base.max_len}, {base.negatives} sampled negatives, contrastive weight "
               f"{base.contrastive_weight}, seed {base.seed}; {args.jobs} method(s) at a time, {base.threads or 'all'} torch thread(s) each; "
               f"wall time of the whole benchmark {wall / 60:.1f} min")
    command = "python bench/bench_fmoe_cdsr.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, "") and k not in ("config", "out", "results"))
    text = (f"# FMoE-CDSR replication on {base.data}\n\n{setting}\n\nCommand: `{command}`\n\n"
            f"Metrics in %, test split, at the round with the best mean validation MRR; per-domain columns are MRR. "
            f"Bytes are tensor payload in the last round (headers excluded).\n\n```\n{rendered}\n```\n\n"
            f"One expert (μ and log σ² stacks, hidden {base.embed_dim}) has {expert:,} parameters = {4 * expert:,} B in float32.\n"
            + "\n".join(checks) + "\n")
    print(text)
    atomic_write_json(args.results / f"{name}.json", rows)
    atomic_write_bytes(args.results / f"{name}.md", text.encode())


if __name__ == "__main__":
    main()
