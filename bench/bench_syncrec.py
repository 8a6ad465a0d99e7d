"""SyNCRec on MovieLens-1M genre domains (merged timelines, SyNCRec's protocol).

    python bench/bench_syncrec.py --part model --users 800 --rounds 12    # syncrec_ml1m
    python bench/bench_syncrec.py --part p2p --users 800 --nodes 4 --rounds 12  # syncrec_p2p_ml1m

`model`: SyNCRec, SASRec per domain, SASRec on the merged timeline and SyNCRec without LC-NTG,
without SC-MIM and without the asymmetric stop-gradients, each trained on one node holding
every sampled user (`--method local`). `p2p`: the users split over `--nodes` nodes, SyNCRec
trained alone per node (Local), averaged whole by a server (FedAvg), and with its ACMoE
experts shared by FedMoE-DA peer to peer (P = 1: each own expert aggregates itself and its
most correlated visible expert; phi, the item and position embeddings, kept local: FedMoE-DA's
`frozen` embedding mode, never sent; towers are local in every mode).
Every variant is a full simulation with the same users, seed and candidate sets; metrics are
the test split's at the round with the best mean validation MRR. Results are written after
each variant to bench/results/<name>.json and .md; `--report-only` rewrites the .md from the .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from p2pmoe.config import default_config, with_options
from p2pmoe.harness import add_flags, bench_parser, chosen, markdown, parse_flags, rerun_command, result_row, timed_run, upgraded, write_results
from p2pmoe.report import format_table

DOMAINS = ("kids", "dark", "action", "comedy", "drama")
METHOD_KEYS = ("embedding", "p")
MODEL_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "SyNCRec": ("local", {}),
    "SASRec per domain (single)": ("local", {"model": "sasrec-single"}),
    "SASRec merged (cross)": ("local", {"model": "sasrec-cross"}),
    "SyNCRec w/o LC-NTG": ("local", {"lc_ntg": False}),
    "SyNCRec w/o SC-MIM": ("local", {"mim_weight": 0.0}),
    "SyNCRec w/o stop-gradients": ("local", {"stop_gradient": False}),
}
P2P_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "Local SyNCRec": ("local", {}),
    "FedAvg SyNCRec": ("fedavg", {}),
    "FedMoE-DA over SyNCRec experts": ("fedmoe-da", {"embedding": "frozen", "p": 1}),
}


def run_variant(args: argparse.Namespace, label: str, method: str, changes: dict[str, Any], out: Path) -> dict[str, Any]:
    method_options = {k: v for k, v in changes.items() if k in METHOD_KEYS}
    task_options = {k: v for k, v in changes.items() if k not in METHOD_KEYS}
    task_options.update(
        users=args.users, embed_dim=args.embed_dim, max_len=args.max_len, negatives_from=args.negatives_from, cross_expert_ratio=args.cross_expert_ratio
    )
    run = {"nodes": args.nodes, "rounds": args.rounds, "eval_every": args.eval_every, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    cfg = with_options(default_config(data=args.data, method=method, threads=1, out=str(out), **run), task_options=task_options, method_options=method_options)
    return result_row(timed_run(cfg), label)


def table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        m = row["metrics"]
        cell = {"variant": row["variant"], "MRR %": 100 * m["mrr"], "HR@10 %": 100 * m["hr@10"], "NDCG@10 %": 100 * m["ndcg@10"]}
        cell.update({d.capitalize(): 100 * m.get(f"{d}/mrr", float("nan")) for d in DOMAINS})
        cell["KB/node/round"] = row["bytes"]["per_node_per_round"]["total"] / 1000
        cell.update({"best round": row["selected_round"], "CPU min": row["cpu_seconds"] / 60})
        cells.append(cell)
    return format_table(cells, list(cells[0]))


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """The targets, checked on the rows there are: SyNCRec against both SASRec baselines on mean
    MRR, the share of the negative-transfer gap it closes, each ablation's change of the mean,
    FedMoE-DA's MRR and bytes against Local and FedAvg."""
    mrr = {row["variant"]: row["metrics"] for row in rows}
    out = []
    if {"SyNCRec", "SASRec per domain (single)", "SASRec merged (cross)"} <= set(mrr):
        syn, single, cross = mrr["SyNCRec"], mrr["SASRec per domain (single)"], mrr["SASRec merged (cross)"]
        out.append(
            f"SyNCRec mean MRR {100 * syn['mrr']:.2f} vs single {100 * single['mrr']:.2f} and cross {100 * cross['mrr']:.2f}: "
            f"{'above both' if syn['mrr'] > max(single['mrr'], cross['mrr']) else 'NOT above both'}"
        )
        gaps = {d: single[f"{d}/mrr"] - cross[f"{d}/mrr"] for d in DOMAINS}
        worst = max(gaps, key=lambda d: gaps[d])
        if gaps[worst] > 0:
            closed = (syn[f"{worst}/mrr"] - cross[f"{worst}/mrr"]) / gaps[worst]
            out.append(
                f"negative-transfer domain (cross SASRec furthest below single SASRec): {worst}, gap {100 * gaps[worst]:.2f} MRR points; "
                f"SyNCRec closes {100 * closed:.0f} % of it (target: at least 50 %)"
            )
        else:
            out.append(
                f"no negative-transfer domain: cross SASRec is at or above single SASRec in every domain (closest: {worst}, "
                f"cross {100 * -gaps[worst]:.2f} MRR points above single); SyNCRec there {100 * syn[f'{worst}/mrr']:.2f}"
            )
        for label in ("SyNCRec w/o LC-NTG", "SyNCRec w/o SC-MIM", "SyNCRec w/o stop-gradients"):
            if label in mrr:
                delta = 100 * (mrr[label]["mrr"] - syn["mrr"])
                out.append(f"{label}: mean MRR {delta:+.2f} points against SyNCRec ({'lowers' if delta < 0 else 'does NOT lower'} the mean)")
    byts = {row["variant"]: row["bytes"]["per_node_per_round"]["total"] for row in rows}
    if {"Local SyNCRec", "FedAvg SyNCRec", "FedMoE-DA over SyNCRec experts"} <= set(mrr):
        fed, local = mrr["FedMoE-DA over SyNCRec experts"]["mrr"], mrr["Local SyNCRec"]["mrr"]
        share = byts["FedMoE-DA over SyNCRec experts"] / byts["FedAvg SyNCRec"]
        out.append(
            f"FedMoE-DA mean MRR {100 * fed:.2f} vs Local {100 * local:.2f} ({'at or above' if fed >= local else 'BELOW'}); "
            f"bytes per node per round {100 * share:.1f} % of FedAvg's (target: at most 25 %)"
        )
    return out


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--part", choices=("model", "p2p"), required=True)
    p.add_argument("--data", default="ml-1m-timelines")
    p.add_argument("--users", type=int, default=800)
    p.add_argument("--nodes", type=int, default=None, help="default: 1 for model, 4 for p2p")
    for flag, kind, default in (("rounds", int, 12), ("eval-every", int, 3), ("batch-size", int, 128), ("lr", float, 2e-3), ("embed-dim", int, 32)):
        p.add_argument(f"--{flag}", type=kind, default=default)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cross-expert-ratio", type=float, default=0.8, help="SyNCRec's share of cross-domain experts among the 5")
    p.add_argument("--negatives-from", choices=("domain", "all"), default="domain", help="draw negatives from the target's domain or all items")
    add_flags(p, "only", "name", "results", "report_only")
    return p


def setting_text(args: argparse.Namespace) -> str:
    cross = round(5 * args.cross_expert_ratio)
    return (
        f"{args.data}: {args.users} users drawn with seed {args.seed} (of 6,040), {args.nodes} node(s), {args.rounds} rounds x 1 local epoch, "
        f"evaluated every {args.eval_every} rounds, batch {args.batch_size}, Adam lr {args.lr}, hidden {args.embed_dim}, max length {args.max_len}, "
        f"1 block and 2 heads per expert/SASRec, dropout 0.2, 5 ACMoE experts ({5 - cross} single-domain, {cross} cross-domain), 100 negatives "
        f"{'from the target domain' if args.negatives_from == 'domain' else 'from all items'} that the user never touched (drawn once), 1 torch thread"
    )


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    torch.set_num_threads(1)
    args.nodes = args.nodes or (1 if args.part == "model" else 4)
    variants = MODEL_VARIANTS if args.part == "model" else P2P_VARIANTS
    args.name = args.name or ("syncrec_ml1m" if args.part == "model" else "syncrec_p2p_ml1m")
    if args.report_only:
        saved = json.loads((args.results / f"{args.name}.json").read_text())
        write(args.results, args.name, saved["command"], saved["setting"], [upgraded(r) for r in saved["rows"]])
        return
    command, rows = rerun_command(cli, args, skip=("results",)), []
    for label in chosen(cli, args, list(variants)):
        rows.append(run_variant(args, label, *variants[label], Path("runs") / args.name / str(list(variants).index(label))))
        print(label, f"MRR {100 * rows[-1]['metrics']['mrr']:.2f}", f"{rows[-1]['cpu_seconds'] / 60:.1f} CPU min", flush=True)
        write(args.results, args.name, command, setting_text(args), rows)


def write(folder: Path, name: str, command: str, setting: str, rows: list[dict[str, Any]]) -> None:
    """<name>.json (every row in full) and .md (the table and the targets)."""
    intro = (
        "Metrics in %, test split (leave-one-out, 1 positive + 100 negatives), at the evaluated round with the best mean validation MRR; "
        "per-domain columns are MRR by the domain of the target item; MRR/HR/NDCG are the unweighted mean over the five domains. "
        "KB/node/round: encoded bytes a client sends plus receives per round. CPU min: this process's CPU time (the machine was shared).\n\n```\n"
    )
    text = markdown(name, f"{setting}.", command, intro + table(rows) + "\n```\n\n" + "".join(f"- {line}\n" for line in findings(rows)))
    write_results(folder, name, {"command": command, "setting": setting, "rows": rows}, text, echo=False)


if __name__ == "__main__":
    main()
