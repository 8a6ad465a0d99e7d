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
each variant to bench/results/<name>.json and .md.
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


def run_variant(args: argparse.Namespace, method: str, changes: dict[str, Any], out: Path) -> dict[str, Any]:
    method_options = {k: v for k, v in changes.items() if k in METHOD_KEYS}
    task_options = {k: v for k, v in changes.items() if k not in METHOD_KEYS}
    task_options.update(
        users=args.users, embed_dim=args.embed_dim, max_len=args.max_len, negatives_from=args.negatives_from, cross_expert_ratio=args.cross_expert_ratio
    )
    cfg = with_options(
        default_config(
            data=args.data,
            method=method,
            nodes=args.nodes,
            rounds=args.rounds,
            eval_every=args.eval_every,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            threads=1,
            out=str(out),
        ),
        task_options=task_options,
        method_options=method_options,
    )
    start, cpu = time.time(), time.process_time()
    summary = run_simulation(cfg, progress=False)
    cost = {"wall_min": (time.time() - start) / 60, "cpu_min": (time.process_time() - cpu) / 60}
    return {**bench_row(summary), "selection_round": summary["selection"]["round"], **cost}


def table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        m = row["metrics"]
        cell = {"variant": row["variant"], "MRR %": 100 * m["mrr"], "HR@10 %": 100 * m["hr@10"], "NDCG@10 %": 100 * m["ndcg@10"]}
        cell.update({d.capitalize(): 100 * m.get(f"{d}/mrr", float("nan")) for d in DOMAINS})
        cell["KB/node/round"] = row["bytes"]["per_node_per_round"]["total"] / 1000
        cell.update({"best round": row["selection_round"], "CPU min": row["cpu_min"]})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("model", "p2p"), required=True)
    parser.add_argument("--data", default="ml-1m-timelines")
    parser.add_argument("--users", type=int, default=800)
    parser.add_argument("--nodes", type=int, default=None, help="default: 1 for model, 4 for p2p")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cross-expert-ratio", type=float, default=0.8, help="SyNCRec's share of cross-domain experts among the 5")
    parser.add_argument("--negatives-from", choices=("domain", "all"), default="domain", help="draw negatives from the target's domain or all items")
    parser.add_argument("--only", default="", help="comma-separated variant numbers (1-based) to run")
    parser.add_argument("--name", default="")
    parser.add_argument("--render", action="store_true", help="only rewrite <name>.md from <name>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.nodes = args.nodes or (1 if args.part == "model" else 4)
    variants = MODEL_VARIANTS if args.part == "model" else P2P_VARIANTS
    name = args.name or ("syncrec_ml1m" if args.part == "model" else "syncrec_p2p_ml1m")
    if args.render:
        render(name)
        return
    chosen = [int(i) - 1 for i in args.only.split(",") if i] or list(range(len(variants)))
    command = "python " + " ".join(["bench/bench_syncrec.py", *sys.argv[1:]])
    rows: list[dict[str, Any]] = []
    for i, (label, (method, changes)) in enumerate(variants.items()):
        if i not in chosen:
            continue
        row = run_variant(args, method, changes, Path("runs") / name / str(i))
        row["variant"] = label
        rows.append(row)
        print(label, f"MRR {100 * row['metrics']['mrr']:.2f}", f"{row['cpu_min']:.1f} CPU min", flush=True)
        setting = (
            f"{args.data}: {args.users} users drawn with seed {args.seed} (of 6,040), {args.nodes} node(s), {args.rounds} rounds x 1 local epoch, "
            f"evaluated every {args.eval_every} rounds, batch {args.batch_size}, Adam lr {args.lr}, hidden {args.embed_dim}, max length {args.max_len}, "
            "1 block and 2 heads per expert/SASRec, dropout 0.2, 5 ACMoE experts "
            f"({5 - round(5 * args.cross_expert_ratio)} single-domain, {round(5 * args.cross_expert_ratio)} cross-domain), 100 negatives "
            f"{'from the target domain' if args.negatives_from == 'domain' else 'from all items'} that the user never touched (drawn once), 1 torch thread"
        )
        write_results(name, command, setting, rows)


def write_results(name: str, command: str, setting: str, rows: list[dict[str, Any]]) -> None:
    """bench/results/<name>.json (every row in full) and .md (the table and the targets)."""
    md = (
        f"# {name}\n\n{setting}.\n\nCommand: `{command}`\n\n"
        "Metrics in %, test split (leave-one-out, 1 positive + 100 negatives), at the evaluated round with the best mean validation MRR; "
        "per-domain columns are MRR by the domain of the target item; MRR/HR/NDCG are the unweighted mean over the five domains. "
        "KB/node/round: encoded bytes a client sends plus receives per round. CPU min: this process's CPU time (the machine was shared).\n\n```\n"
        + table(rows)
        + "\n```\n\n"
        + "".join(f"- {line}\n" for line in findings(rows))
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{name}.json", {"command": command, "setting": setting, "rows": rows})
    atomic_write_bytes(RESULTS / f"{name}.md", md.encode())


def render(name: str) -> None:
    """Rewrite <name>.md from <name>.json (after the table or the findings changed)."""
    saved = json.loads((RESULTS / f"{name}.json").read_text())
    write_results(name, saved["command"], saved["setting"], saved["rows"])


if __name__ == "__main__":
    main()
