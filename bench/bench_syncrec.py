"""SyNCRec on MovieLens-1M genre domains (merged timelines, SyNCRec's protocol), over seeds.

    python bench/bench_syncrec.py --part model --users 2000 --rounds 12 --seeds 0,1,2
    python bench/bench_syncrec.py --part model --users 2000 --rounds 12 --seeds 0,1,2 --negatives-from all
    python bench/bench_syncrec.py --part p2p --users 800 --nodes 4 --rounds 12 --seeds 0,1,2

`model`: SyNCRec, SASRec per domain, SASRec on the merged timeline and SyNCRec without LC-NTG,
without SC-MIM and without the asymmetric stop-gradients, and SyNCRec scoring a target with
its cross-domain task's representation instead of the single-domain one (`score_with cross`,
a read-out the paper does not use), each trained on one node holding every sampled user
(`--method local`). `p2p`: the users split over `--nodes` nodes, SyNCRec
trained alone per node (Local), averaged whole by a server (FedAvg), and with its ACMoE
experts shared by FedMoE-DA peer to peer (P = 1, φ, the item and position embeddings, kept
local: FedMoE-DA's `frozen` embedding mode; towers are local in every mode). A seed changes
the users drawn (of 6,040), their negatives, the initial weights and the shuffling; every
variant of a seed has the same users and candidates. Metrics: test split (leave-one-out,
1 positive + 100 negatives from the target's domain or from all items, `--negatives-from`) at
the evaluated round with the best mean validation MRR; MRR, HR@10 and NDCG@10 are unweighted
means over the five domains, `<domain>/mrr` by the target's domain. Each row is the mean over
seeds (MRR ± std); the paired difference is the reference (SyNCRec, or FedMoE-DA in `p2p`)
minus the row with its standard error over seeds, and a verdict only beyond two standard
errors; the last row is what ranking at random scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from p2pmoe.config import default_config, with_options
from p2pmoe.harness import Variant, add_flags, bench_parser, by_label, chosen, parse_flags, result_row, run_seeds, seed_list, write_seed_tables
from p2pmoe.report.seeds import draw_seeds, metric_by_seed, seed_table
from p2pmoe.report.stats import spread
from p2pmoe.report.tables import random_ranking_rows
from p2pmoe.settings import ExperimentConfig

DOMAINS = ("kids", "dark", "action", "comedy", "drama")
SINGLE, CROSS = "SASRec per domain (single)", "SASRec merged (cross)"
PARTS: dict[str, dict[str, Variant]] = {
    "model": {
        v.label: v
        for v in (
            Variant("SyNCRec", "local"),
            Variant(SINGLE, "local", task={"model": "sasrec-single"}),
            Variant(CROSS, "local", task={"model": "sasrec-cross"}),
            Variant("SyNCRec w/o LC-NTG", "local", task={"lc_ntg": False}),
            Variant("SyNCRec w/o SC-MIM", "local", task={"mim_weight": 0.0}),
            Variant("SyNCRec w/o stop-gradients", "local", task={"stop_gradient": False}),
            Variant("SyNCRec read out by its cross-domain task", "local", task={"score_with": "cross"}),
        )
    },
    "p2p": {
        v.label: v
        for v in (
            Variant("Local SyNCRec", "local"),
            Variant("FedAvg SyNCRec", "fedavg"),
            Variant("FedMoE-DA over SyNCRec experts", "fedmoe-da", {"embedding": "frozen", "p": 1}),
        )
    },
}
REFERENCE = {"model": "SyNCRec", "p2p": "FedMoE-DA over SyNCRec experts"}
BYTES_UNIT = {"model": "SyNCRec", "p2p": "FedAvg SyNCRec"}


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--part", choices=tuple(PARTS), required=True)
    p.add_argument("--data", default="ml-1m-timelines")
    p.add_argument("--users", type=int, default=800)
    p.add_argument("--nodes", type=int, default=None, help="default: 1 for model, 4 for p2p")
    for flag, kind, default in (("rounds", int, 12), ("eval-every", int, 3), ("batch-size", int, 128), ("lr", float, 2e-3), ("embed-dim", int, 32)):
        p.add_argument(f"--{flag}", type=kind, default=default)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--cross-expert-ratio", type=float, default=0.8, help="SyNCRec's share of cross-domain experts among the 5")
    p.add_argument("--negatives-from", choices=("domain", "all"), default="domain", help="draw negatives from the target's domain or all items")
    add_flags(p, "seeds", "only", "jobs", "name", "results", "checkpoint_every", "report_only")
    return p


def base_config(args: argparse.Namespace) -> ExperimentConfig:
    task = {"users": args.users, "embed_dim": args.embed_dim, "max_len": args.max_len, "negatives_from": args.negatives_from}
    run = {"nodes": args.nodes, "rounds": args.rounds, "eval_every": args.eval_every, "batch_size": args.batch_size, "lr": args.lr}
    cfg = default_config(data=args.data, method="local", threads=1, **run)
    return with_options(cfg, task_options={**task, "cross_expert_ratio": args.cross_expert_ratio})


def tables(runs: dict[str, dict[int, dict[str, Any]]], part: str) -> dict[str, list[dict[str, Any]]]:
    extra = ["hr@10", "ndcg@10", *(f"{d}/mrr" for d in DOMAINS)]
    rows = seed_table(runs, "mrr", REFERENCE[part], BYTES_UNIT[part], extra)
    rows += random_ranking_rows([s for by_seed in runs.values() for s in by_seed.values()], ["mrr", "hr@10", "ndcg@10"], "method")
    return {"Test MRR, mean over the five domains": rows}


def negative_transfer(runs: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Where the merged SASRec falls furthest below the per-domain one (mean over the seeds all
    three models have), and the share of that gap SyNCRec closes, per seed: the paper's
    negative-transfer claim."""
    if not {"SyNCRec", SINGLE, CROSS} <= set(runs):
        return ""
    seeds = sorted(set(runs["SyNCRec"]) & set(runs[SINGLE]) & set(runs[CROSS]))
    if not seeds:
        return ""
    mrr = {label: {d: metric_by_seed(runs[label], f"{d}/mrr") for d in DOMAINS} for label in ("SyNCRec", SINGLE, CROSS)}
    gap = {d: spread([mrr[SINGLE][d][s] - mrr[CROSS][d][s] for s in seeds]).mean for d in DOMAINS}
    worst = max(gap, key=lambda d: gap[d])
    if gap[worst] <= 0:
        return f"No negative transfer over seeds {seeds}: the merged SASRec is at or above the per-domain one in every domain on the mean (closest: {worst})."
    single, cross, syn = mrr[SINGLE][worst], mrr[CROSS][worst], mrr["SyNCRec"][worst]
    shares = ", ".join(f"seed {s} {100 * (syn[s] - cross[s]) / (single[s] - cross[s]):.0f} %" if single[s] != cross[s] else f"seed {s} -" for s in seeds)
    return (
        f"Negative transfer: {worst}, where the merged SASRec is furthest below the per-domain one ({100 * gap[worst]:.2f} MRR points, mean over seeds "
        f"{seeds}); SyNCRec closes {shares} of that seed's gap (the paper's target: at least 50 %)."
    )


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    args.nodes = args.nodes or (1 if args.part == "model" else 4)
    args.name = args.name or f"syncrec{'_p2p' if args.part == 'p2p' else ''}_ml1m{'_allneg' if args.negatives_from == 'all' else ''}_seeds"
    variants = [PARTS[args.part][label] for label in chosen(cli, args, list(PARTS[args.part]))]
    results = run_seeds(base_config(args), variants, seed_list(args), Path("runs") / f"bench_{args.name}", args.checkpoint_every, args.report_only, args.jobs)
    runs, rows = by_label(results), [result_row(r.summary, r.label) for r in results]
    reference = REFERENCE[args.part]
    title = f"{args.name}: test MRR by seed"
    figures = {f"{args.name}.png": lambda folder, name: draw_seeds(runs, ["mrr"], reference, folder, name, title)} if reference in runs else {}
    findings = [line for line in [negative_transfer(runs)] if line]
    write_seed_tables(cli, args, f"SyNCRec on {args.data}, over seeds", __doc__, tables(runs, args.part), figures, findings, rows=rows)


if __name__ == "__main__":
    main()
