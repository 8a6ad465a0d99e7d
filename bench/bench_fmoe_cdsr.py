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
import json
import multiprocessing
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from p2pmoe.config import Values, add_experiment_arguments, config_from_args, empty_values, resolve, with_options
from p2pmoe.driver.summary import select_round, summarise_metrics
from p2pmoe.experiment import build_experiment, resolve_experiment
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.methods.fmoe_cdsr import FMoECDSROptions
from p2pmoe.naming import SERVER_ID
from p2pmoe.report import bench_row, format_table, rerun_command
from p2pmoe.runs import read_metrics
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.runner import run_simulation
from p2pmoe.tasks.base import resolve_device
from p2pmoe.tasks.sequential import SequenceOptions, SequentialTask, sequence_domains

RESULTS = Path(__file__).parent / "results"
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


def finished_run(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The summary a run folder holds when it was written for exactly this setting (`--reuse`)."""
    path = Path(cfg.run.out) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("setting") != json.loads(json.dumps(cfg.to_dict())):
        return None
    return {**summary, "cpu_seconds": summary.get("cpu_seconds")}


def unfinished_run(cfg: ExperimentConfig, clients: list[str], first_rounds: int | None = None) -> dict[str, Any] | None:
    """What a run stopped before its last round left (`--report-only`): its metrics.jsonl read
    as the simulator reads a finished run's, over the rounds every client evaluated, with
    ``rounds_done`` saying how many. Its setting is taken to be the command's (an unfinished
    folder has no summary to check it against). ``first_rounds`` reads only rounds
    ``0 .. first_rounds - 1`` (`--first-rounds`), finished run or not."""
    path = Path(cfg.run.out) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = read_metrics(path)
    evaluated: dict[int, set[str]] = defaultdict(set)
    for row in rows:
        if "metrics" in row:
            evaluated[row["round"]].add(row["node"])
    complete = {r for r, nodes in evaluated.items() if nodes >= set(clients) and (first_rounds is None or r < first_rounds)}
    chosen, per_node = select_round([r for r in rows if r["round"] in complete], clients, SequentialTask.selection)
    if chosen is None:
        return None
    metrics, spread = summarise_metrics(per_node)
    return {
        "method": cfg.run.method,
        "data": cfg.run.data,
        "rounds": cfg.run.rounds,
        "rounds_done": len(complete),
        "first_rounds": first_rounds,
        "selection": {"key": SequentialTask.selection.key, "round": chosen},
        "metrics": metrics,
        "metrics_spread": spread,
        "per_node": per_node,
        "bytes": {},
        "wall_seconds": None,
        "cpu_seconds": None,
        "setting": cfg.to_dict(),
    }


def expert_traffic_check(traffic: dict[int, dict[str, dict[str, int]]], rounds: int, clients: int, expert_bytes: int) -> bool:
    """Every round, every client uploaded exactly one expert and downloaded exactly K-1."""
    return all(
        len(traffic.get(r, {})) == clients and all(t["up"] == expert_bytes and t["down"] == expert_bytes * (clients - 1) for t in traffic[r].values())
        for r in range(rounds)
    )


def _run(cfg: ExperimentConfig, checkpoint_every: int = 0) -> dict[str, Any]:
    """One method in a worker process; its CPU time says what it costs whatever ran beside it
    (this process's part only, for a run resumed from a checkpoint). With `checkpoint_every`,
    the run checkpoints and goes on from its folder's checkpoint of the same setting."""
    started = time.process_time()
    summary = run_simulation(cfg, progress=False, checkpoint_every=checkpoint_every, resume=checkpoint_every > 0)
    return {**summary, "cpu_seconds": round(time.process_time() - started, 1)}


def run_all(configs: dict[str, ExperimentConfig], jobs: int, checkpoint_every: int = 0) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """(method, summary or the error that stopped it) as each finishes: in this process for
    one job, else `jobs` workers. One method's failure does not lose the others' results."""
    if jobs == 1:
        for method, cfg in configs.items():
            try:
                yield method, _run(cfg, checkpoint_every)
            except Exception as exc:  # reported in the table; the other methods still run
                yield method, exc
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run, cfg, checkpoint_every): method for method, cfg in configs.items()}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], error if isinstance(error, Exception) else future.result()


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


def defaults() -> Values:
    """The parser is built for FMoE-CDSR on FKCB, so its --fmoe-* flags are accepted."""
    values = empty_values()
    values["run"].update(method="fmoe-cdsr", data="fkcb")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, sys.argv[1:], defaults())
    parser.add_argument("--only", default="", help="comma-separated methods to run (default: all of them)")
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once, one process each")
    parser.add_argument("--name", default="", help="results file stem (default fmoe_cdsr_<data>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <name>.json and <name>.md")
    parser.add_argument("--reuse", action="store_true", help="take a method from its run folder when it finished there with this exact setting")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="each run checkpoints every N rounds and, run again, goes on from its folder's checkpoint (p2pmoe simulate --resume); 0: never",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: finished runs as --reuse, runs stopped early from their metrics.jsonl up to their last round every client evaluated",
    )
    parser.add_argument(
        "--first-rounds",
        type=int,
        default=0,
        metavar="N",
        help="with --report-only: read every method's first N rounds only, finished or not, so runs stopped at different rounds compare at one budget",
    )
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
    if args.checkpoint_every < 0:
        parser.error("--checkpoint-every must be 0 (never) or a number of rounds")
    if args.first_rounds < 0 or (args.first_rounds and not args.report_only):
        parser.error("--first-rounds N (N >= 1) reads run folders: use it with --report-only")
    if base.run.compression != "none":
        parser.error("the byte check counts float32 experts: run the replication without --compression")
    run, task, fmoe = base.run, base.task, base.method
    assert isinstance(task, SequenceOptions) and isinstance(fmoe, FMoECDSROptions)
    name = args.name or f"fmoe_cdsr_{run.data.replace('-', '')}"
    domains = [d.name for d in sequence_domains(run.data, run.data_root)]
    runs = f"runs/bench_{name}"
    configs = {m: with_options(base, method=m, out=f"{runs}/{m}") for m in methods}

    started = time.perf_counter()
    clients = [f"node-{k:02d}" for k in range(len(domains))]
    outcomes: dict[str, dict[str, Any] | Exception] = {}
    if args.reuse or args.report_only:
        for method, cfg in configs.items():
            if args.first_rounds:
                found = unfinished_run(cfg, clients, args.first_rounds)
            else:
                found = finished_run(cfg) or (unfinished_run(cfg, clients) if args.report_only else None)
            if found is not None:
                outcomes[method] = found
            elif args.report_only:
                outcomes[method] = FileNotFoundError(f"nothing to report in {cfg.run.out}")
        if outcomes:
            print(f"taken from their run folders: {', '.join(outcomes)}", flush=True)
    pending = {m: cfg for m, cfg in configs.items() if m not in outcomes}
    if pending:
        print(
            f"running {len(pending)} methods on {run.data} ({', '.join(domains)}), {args.jobs} at a time; per-round metrics in {runs}/<method>/metrics.jsonl",
            flush=True,
        )
    for method, outcome in run_all(pending, args.jobs, args.checkpoint_every):
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
        ledger = Path(configs[method].run.out) / "ledger.csv"
        traffic = client_traffic(ledger.parent) if ledger.is_file() else None
        rows.append(
            {
                **bench_row(outcome),
                "label": LABELS[method],
                "cpu_seconds": outcome["cpu_seconds"],
                "selected_round": outcome["selection"]["round"],
                "rounds_done": outcome.get("rounds_done", run.rounds),
                "per_domain": {d: outcome["per_node"][f"node-{k:02d}"] for k, d in enumerate(domains)},
                "payload_bytes_by_round": traffic,
            }
        )
        table.append(table_row(outcome, domains))
        if traffic is None:
            checks.append(f"- {method}: its run folder kept no ledger.csv, so its traffic per client is not checked")
        elif method in MIXTURES:
            checked = outcome.get("rounds_done") or run.rounds  # a run stopped early: the rounds it logged
            ok = expert_traffic_check(traffic, checked, len(domains), expert_bytes)
            checks.append(
                f"- {method}: in each of the {checked} rounds every client uploaded {expert_bytes:,} B and "
                f"downloaded {expert_bytes * (len(domains) - 1):,} B of tensor payload: {'yes' if ok else 'NO'}"
            )
    if run.data == "fkcb":
        table += PAPER_FKCB
    columns = [
        "method",
        "MRR %",
        "HR@10 %",
        "NDCG@10 %",
        *domains,
        "gate own %",
        "up KB/client/round",
        "down KB/client/round",
        "best round",
        "wall min",
        "CPU min",
    ]
    rendered = format_table(table, columns)
    stacks = "μ and log σ² stacks" if fmoe.encoder == "vae" else "μ stack only"
    setting = (
        f"{run.data} ({', '.join(domains)}), one client per domain; {run.rounds} rounds x {run.local_epochs} local epoch(s), "
        f"batch {run.batch_size}, Adam lr {run.lr} betas (0.9, 0.98), hidden {task.embed_dim}, {task.blocks} blocks, {task.heads} heads, "
        f"dropout {task.dropout}, max length {task.max_len}, {task.negatives} sampled negatives; FMoE-CDSR encoder "
        f"{fmoe.encoder}, gate pooling {fmoe.gate_pooling}, {fmoe.head} head, embedding init {fmoe.init}, KL {'on' if fmoe.encoder == 'vae' else 'off'}, "
        f"graph layer {'on' if fmoe.graph else 'off'}, {'official' if fmoe.input_norm else 'SASRec'} encoder input, "
        f"contrastive weight {fmoe.contrastive_weight}"
        f"{f', foreign experts as after {fmoe.expert_epochs} epoch(s)' if fmoe.expert_epochs else ''}; "
        f"seed {run.seed}; {run.threads or 'all'} torch thread(s) each, on {device_name(run.device)}; "
        + (
            f"{args.jobs} method(s) at a time, wall time of the whole benchmark {wall / 60:.1f} min"
            if pending
            else "every method taken from its run folder (--reuse / --report-only), so no wall time of the whole"
        )
    )
    skip = ("results", "checkpoint_every") + (() if args.first_rounds else ("first_rounds",))
    command = rerun_command("bench/bench_fmoe_cdsr.py", args, skip=skip, parser=parser)
    text = (
        f"# FMoE-CDSR replication on {run.data}\n\n{setting}\n\nCommand: `{command}`\n\n"
        f"Metrics in %, test split, at the round with the best mean validation MRR (best round, counted from 1); "
        f"per-domain columns are MRR; gate own % is the gate's mean weight on each client's own branch over its test sequences "
        f"(mean over clients; the rest goes to the other domains' branches). Bytes are a client's uploads (model_update) and downloads "
        f"(model_global) per round, headers included, from the run's summary; "
        f"CPU min is each method's own CPU time, wall min its wall time beside the other jobs.\n\n```\n{rendered}\n```\n\n"
        f"One expert ({stacks}, hidden {task.embed_dim}) has {expert_bytes // 4:,} parameters = {expert_bytes:,} B in float32.\n" + "\n".join(checks) + "\n"
    )
    rounds = rounds_table({m: Path(configs[m].run.out) for m in methods if m in MIXTURES}, domains)
    if rounds:
        text += (
            "\nEvery evaluated round of the mixtures (test and validation MRR, mean over clients; gate own %: the gate's mean "
            "weight on the client's own branch over its test sequences, mean over clients and per client):\n\n" + rounds
        )
    print(text)
    atomic_write_json(args.results / f"{name}.json", rows)
    atomic_write_bytes(args.results / f"{name}.md", text.encode())


if __name__ == "__main__":
    main()
