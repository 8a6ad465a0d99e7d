"""Issue 30, first measurement: FedAvg's server rules under sign-flip attackers, over seeds.

    python bench/bench_robustness.py --seeds 0,1,2

Fashion-MNIST, 10 clients of at most 500 images, Dirichlet 0.3, 10 rounds x 1 epoch; 2 of
the 10 clients (20 %, a seeded draw) send their weights multiplied by -5 (`sign-flip:5`).
Each row is the honest clients' accuracy (their own test split and the global sample) at the
last round, mean over seeds; the paired difference is the reference row minus the row, by
seed, with its standard error and a verdict only beyond two standard errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pmoe.config import default_config, with_options
from p2pmoe.harness import Variant, add_flags, bench_parser, by_label, honest_view, parse_flags, run_seeds, seed_list, write_seed_tables
from p2pmoe.report.seeds import seed_table

ATTACK = {"attack": "sign-flip:5", "attackers": 0.2}
RULES = ("mean", "median", "trimmed:0.2", "krum:2:6", "clip:5")


def variants() -> list[Variant]:
    rows = [Variant(f"{rule}, no attack", "fedavg", {"aggregation": rule}) for rule in RULES]
    return rows + [Variant(f"{rule}, 20% sign-flip", "fedavg", {"aggregation": rule}, ATTACK) for rule in RULES]


def tables(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """What the attack costs each rule (verdict "better": without attackers is better beyond
    2 SE), then each rule against the mean in the same case ("worse": the mean is worse)."""
    found = {}
    for rule in RULES:
        mine = {k: v for k, v in runs.items() if k.startswith(f"{rule},")}
        found[f"{rule}: with and without attackers"] = seed_table(mine, "accuracy", f"{rule}, no attack", f"{rule}, no attack", ["global_accuracy"])
    for case in ("no attack", "20% sign-flip"):
        mine = {k: v for k, v in runs.items() if k.endswith(case)}
        found[f"every rule against the mean, {case}"] = seed_table(mine, "accuracy", f"mean, {case}", f"mean, {case}", ["global_accuracy"])
    return found


def main() -> None:
    cli = bench_parser(__doc__)
    add_flags(cli, "seeds", "threads", "name", "results", name="robustness_fedavg")
    args = parse_flags(cli)
    base = default_config(data="fmnist", nodes=10, max_train_per_node=500, partition="dirichlet:0.3", rounds=10, eval_every=10, threads=args.threads)
    base = with_options(base, task_options={"global_test_size": 500})
    runs = by_label(run_seeds(base, variants(), seed_list(args), Path("runs") / f"bench_{args.name}"), lambda r: honest_view(r.summary))
    write_seed_tables(cli, args, "FedAvg's aggregation rules under attack", __doc__, tables(runs))


if __name__ == "__main__":
    main()
