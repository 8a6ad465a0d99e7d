"""Issue 30, first measurement: FedAvg's server rules under sign-flip attackers, over seeds.

    python bench/bench_robustness.py --seeds 0,1,2

Fashion-MNIST, 10 clients of at most 500 images, Dirichlet 0.3, 10 rounds x 1 epoch; 2 of
the 10 clients (20 %, a seeded draw) send their weights multiplied by -5 (`sign-flip:5`).
Each row is the honest clients' accuracy (their own test split and the global sample) at the
last round, mean over seeds; the paired difference is the reference row minus the row, by
seed, with its standard error and a verdict only beyond two standard errors. Writes bench/results/robustness_fedavg.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from p2pmoe.config import default_config, with_options
from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.harness import Variant, run_seeds
from p2pmoe.report import format_table
from p2pmoe.report.seeds import seed_table
from p2pmoe.report.tables import columns_of

RESULTS = Path(__file__).parent / "results"
ATTACK = {"attack": "sign-flip:5", "attackers": 0.2}
RULES = ("mean", "median", "trimmed:0.2", "krum:2:6", "clip:5")


def variants() -> list[Variant]:
    rows = [Variant(f"{rule}, no attack", "fedavg", {"aggregation": rule}) for rule in RULES]
    return rows + [Variant(f"{rule}, 20% sign-flip", "fedavg", {"aggregation": rule}, ATTACK) for rule in RULES]


def honest(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as the honest clients see it (all clients when nobody attacks)."""
    liars = set(summary.get("attackers", []))
    per_node = {n: v for n, v in summary["per_node"].items() if n not in liars}
    return {**summary, "metrics": summary.get("honest_metrics", summary["metrics"]), "per_node": per_node}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="robustness_fedavg")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = default_config(data="fmnist", nodes=10, max_train_per_node=500, partition="dirichlet:0.3", rounds=10, eval_every=10, threads=args.threads)
    base = with_options(base, task_options={"global_test_size": 500})
    results = run_seeds(base, variants(), seeds, Path("runs") / f"bench_{args.name}")
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        runs.setdefault(r.label, {})[r.seed] = honest(r.summary)
    tables = {}
    for rule in RULES:  # what the attack costs each rule (verdict "better": without attackers is better beyond 2 SE)
        mine = {k: v for k, v in runs.items() if k.startswith(f"{rule},")}
        tables[f"{rule}: with and without attackers"] = seed_table(mine, "accuracy", f"{rule}, no attack", f"{rule}, no attack", ["global_accuracy"])
    for case in ("no attack", "20% sign-flip"):  # each rule against the mean in the same case ("worse": the mean is worse than the rule)
        mine = {k: v for k, v in runs.items() if k.endswith(case)}
        tables[f"every rule against the mean, {case}"] = seed_table(mine, "accuracy", f"mean, {case}", f"mean, {case}", ["global_accuracy"])
    text = [f"# FedAvg's aggregation rules under attack\n\n{__doc__.split(chr(10) + chr(10), 1)[1].split('Writes')[0].strip()}\n"]
    text.append(f"Command: `python bench/bench_robustness.py --seeds {args.seeds}`\n")
    for heading, rows in tables.items():
        text.append(f"## {heading}\n\n```\n{format_table(rows, columns_of(rows))}\n```\n")
    print("\n".join(text))
    atomic_write_json(RESULTS / f"{args.name}.json", {"seeds": seeds, "tables": tables})
    atomic_write_bytes(RESULTS / f"{args.name}.md", "\n".join(text).encode())


if __name__ == "__main__":
    main()
