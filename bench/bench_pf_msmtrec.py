"""PF-MSMTrec on MovieLens-1M (age groups as scenarios, click and like), its four ablations and
the MMoE baselines (Local, FedAvg, FedBN-style), all under one protocol, over seeds.

    python bench/bench_pf_msmtrec.py --seeds 0,1,2 --rounds 15 --users-per-scenario 100 --lr 0.01 --batch-size 256 --threads 1 --jobs 2

Every variant is a full simulation (server included), once per seed; a seed changes the users
drawn per scenario, the sampled negatives, the initial weights and the shuffling. Metrics are
each scenario's test AUC per task at the round with the best mean validation AUC, and their
mean over scenarios (random ranking: AUC 0.5). Each row is the mean ± std over seeds; the
paired difference is PF-MSMTrec minus the row, with its standard error over seeds and a
verdict only beyond two standard errors. Bytes are what a client sends plus receives per
round, headers included. Writes bench/results/<name>.json, .md and a PNG of the spread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from p2pmoe.config import add_experiment_arguments, config_from_args, resolve
from p2pmoe.harness import Variant, add_flags, bench_parser, by_label, chosen, method_defaults, parse_flags, result_row, run_seeds, seed_list, write_seed_tables
from p2pmoe.report.seeds import draw_seeds, seed_table
from p2pmoe.settings import ExperimentConfig

REFERENCE = "PF-MSMTrec"
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "local": ("Local MMoE", "local", {}),
    "fedavg": ("FedAvg MMoE", "fedavg", {}),
    "fedbn-mmoe": ("FedBN-style MMoE", "fedbn-mmoe", {}),
    "pf-msmtrec": (REFERENCE, "pf-msmtrec", {}),
    "no-template": ("PF-MSMTrec w/o template", "pf-msmtrec", {"template": False}),
    "no-pfedbn": ("PF-MSMTrec w/o parameter FedBN", "pf-msmtrec", {"fedbn": "none"}),
    "no-conflict": ("PF-MSMTrec w/o conflict coordination", "pf-msmtrec", {"conflict": False}),
    "no-personalised": ("PF-MSMTrec w/o personalised aggregation", "pf-msmtrec", {"personalised": False}),
}
DEFAULTS = method_defaults("pf-msmtrec", data="ml-1m-mtl")  # the parser accepts the --pf-* flags


def variants(base: ExperimentConfig, keys: list[str]) -> list[Variant]:
    """The chosen variants; PF-MSMTrec's keep the command's --pf-* options under their ablation."""
    found = []
    for key in keys:
        label, method, overrides = VARIANTS[key]
        own = base.method.to_dict() if method == "pf-msmtrec" else {}
        found.append(Variant(label, method, {**own, **overrides}))
    return found


def tables(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """One table: mean AUC with each task's AUC beside it, and the paired verdicts."""
    extra = sorted({k for by_seed in runs.values() for s in by_seed.values() for k in s["metrics"] if k.startswith("auc/")})
    bytes_unit = "FedAvg MMoE" if "FedAvg MMoE" in runs else REFERENCE
    return {"Test AUC, mean over scenarios (random ranking: 0.5)": seed_table(runs, "auc", REFERENCE, bytes_unit, extra)}


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    add_experiment_arguments(p, sys.argv[1:], DEFAULTS)
    add_flags(p, "seeds", "only", "jobs", "name", "results", "checkpoint_every", "report_only", name="pf_msmtrec_ml1m_seeds")
    return p


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    if getattr(args, "run.method") or getattr(args, "run.out") or getattr(args, "run.seed") is not None:
        cli.error("--method, --out and --seed are set per run by the benchmark; use --only, --seeds and --name")
    base = resolve(config_from_args(args, DEFAULTS))
    chosen_variants = variants(base, chosen(cli, args, list(VARIANTS)))
    root = Path("runs") / f"bench_{args.name}"
    results = run_seeds(base, chosen_variants, seed_list(args), root, args.checkpoint_every, args.report_only, args.jobs)
    runs, rows = by_label(results), [result_row(r.summary, r.label) for r in results]
    figures = {f"{args.name}.png": _figure(runs)} if REFERENCE in runs else {}
    write_seed_tables(cli, args, f"PF-MSMTrec on {base.run.data}, over seeds", __doc__, tables(runs), figures, rows=rows)


def _figure(runs: dict[str, dict[int, dict[str, Any]]]) -> Any:
    return lambda folder, file_name: draw_seeds(runs, ["auc"], REFERENCE, folder, file_name, "PF-MSMTrec and baselines: test AUC by seed")


if __name__ == "__main__":
    main()
