"""FMoE-CDSR's branch, chosen over seeds: the specified branch against the tied head without the
graph layer, next to Local SASRec and FedSASRec (issue 31).

    python bench/bench_fmoe_cdsr_seeds.py --data ml-1m --seeds 0,1,2 --jobs 2
    python bench/bench_fmoe_cdsr_seeds.py --data fkcb --data-root DIR --seeds 0,1,2 --jobs 2

One client per domain, the same setting as bench_fmoe_cdsr.py's committed ML-1M table: 20
rounds x 1 local epoch, batch 64, hidden 64, the lean encoder, 99 sampled negatives on ML-1M
(999 on FKCB, FedDCSR's protocol). The specified branch is FMoE-CDSR as the paper writes it
(linear head, graph layer); the other drops the graph layer and scores with the item
embeddings (tied head), the branch that beat it on FKCB and lost to it on ML-1M with one seed
each. A seed changes the initial weights, the shuffling and the sampled negatives. Metrics:
test split at the round with the best mean validation MRR, unweighted means over the domains
(one client each), and each client's own MRR as `<domain>/mrr`. Rows are means over seeds; the paired
difference is the specified branch minus the row with its standard error over seeds, and a
verdict only beyond two standard errors; the last row is what ranking at random scores.
Each (variant, seed) is a run folder under runs/bench_<name>/; a killed benchmark goes on
where it stopped (per run with --checkpoint-every).
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
from p2pmoe.tasks.sequential import sequence_domains

SPECIFIED = "FMoE-CDSR, specified branch"
VARIANTS = {
    v.label: v
    for v in (
        Variant(SPECIFIED, "fmoe-cdsr"),
        Variant("FMoE-CDSR, tied head, no graph layer", "fmoe-cdsr", {"head": "tied", "graph": False}),
        Variant("Local SASRec", "local"),
        Variant("FedSASRec", "fedsasrec"),
    )
}
NEGATIVES = {"ml-1m": 99, "fkcb": 999}


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--data", choices=tuple(NEGATIVES), default="ml-1m")
    p.add_argument("--data-root", default=None, help="the data folder (FKCB: FedDCSR's <Domain>/ files; ML-1M: found in the installed wheel)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--negatives", type=int, default=None, help="sampled negatives per evaluated sequence (default: 99 on ML-1M, 999 on FKCB)")
    p.add_argument("--train-negatives", type=int, default=0, help="0: full-softmax training (the paper's); N: sampled softmax against N items a step")
    p.add_argument("--device", default="cpu")
    add_flags(p, "seeds", "only", "jobs", "name", "results", "checkpoint_every", "report_only")
    return p


def base_config(args: argparse.Namespace) -> ExperimentConfig:
    task = {
        "embed_dim": args.embed_dim,
        "negatives": NEGATIVES[args.data] if args.negatives is None else args.negatives,
        "train_negatives": args.train_negatives,
    }
    run = {"rounds": args.rounds, "batch_size": 64, "device": args.device, "threads": 1}
    where = {"data_root": args.data_root} if args.data_root else {}
    return with_options(default_config(data=args.data, method="fmoe-cdsr", **where, **run), task_options=task, method_options={"encoder": "lean"})


def tables(runs: dict[str, dict[int, dict[str, Any]]], domains: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The seed table, each client's MRR column named by its domain (client k holds domain k)."""
    per_domain = {f"node-{k:02d}/mrr": f"{d}/mrr" for k, d in enumerate(domains)}
    rows = seed_table(runs, "mrr", SPECIFIED, "FedSASRec", ["hr@10", "ndcg@10", *per_domain])
    rows = [{per_domain.get(k, k): v for k, v in row.items()} for row in rows]
    rows += random_ranking_rows([s for by_seed in runs.values() for s in by_seed.values()], ["mrr", "hr@10", "ndcg@10"], "method")
    return {"Test MRR, mean over the domains": rows}


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    sampled = f"_sampled{args.train_negatives}" if args.train_negatives else ""
    args.name = args.name or f"fmoe_cdsr_{args.data.replace('-', '')}{sampled}_branch_seeds"
    variants = [VARIANTS[label] for label in chosen(cli, args, list(VARIANTS))]
    results = run_seeds(base_config(args), variants, seed_list(args), Path("runs") / f"bench_{args.name}", args.checkpoint_every, args.report_only, args.jobs)
    domains = [d.name for d in sequence_domains(args.data, args.data_root)]
    runs, rows = by_label(results), [result_row(r.summary, r.label, domains=domains) for r in results]
    title = f"{args.name}: test MRR by seed"
    figures = {f"{args.name}.png": lambda folder, name: draw_seeds(runs, ["mrr"], SPECIFIED, folder, name, title)} if SPECIFIED in runs else {}
    write_seed_tables(cli, args, f"FMoE-CDSR's branch on {args.data}, over seeds", __doc__, tables(runs, domains), figures, rows=rows)


if __name__ == "__main__":
    main()
