"""Issue 30 item 3: accuracy against the privacy spent, FedAvg (DP-FedAvg) and FedMoE-DA
(node-level DP of what it shares), three noise levels each.

    python bench/bench_dp.py --seeds 0,1,2

Fashion-MNIST, 10 clients of at most 500 images, Dirichlet 0.3, 10 rounds x 2 local epochs,
as bench/bench_robustness_grid.py. FedAvg: the server clips each update to S = 1 and adds
N(0, (σS)²) to the sum of 10 (central DP). FedMoE-DA: each node clips its round's change of
experts and φ to S = 1 and adds N(0, (σS)²) to what it releases (no server to average the
noise away, so σ is far smaller). ε at δ = 1/10 from the RDP accountant over the 10 rounds.
Each row is the mean over seeds of the clients' accuracy on their own test split after the
round's exchange and of the global accuracy; the paired difference is the run without DP
minus the row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pmoe.config import default_config, with_options
from p2pmoe.harness import Variant, add_flags, bench_parser, by_label, parse_flags, run_seeds, seed_list, write_seed_tables
from p2pmoe.report.seeds import draw_seeds, seed_table

NOISE = {"fedavg": (0.3, 1.0, 3.0), "fedmoe-da": (0.003, 0.01, 0.03)}
CLIP = 1.0


def variants() -> list[Variant]:
    found = []
    for method, levels in NOISE.items():
        found.append(Variant(f"{method}, no DP", method))
        found += [Variant(f"{method}, sigma {sigma:g}", method, {"dp_clip": CLIP, "dp_noise": sigma}) for sigma in levels]
    return found


def tables(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for method in NOISE:
        mine = {k: v for k, v in runs.items() if k.startswith(f"{method},")}
        rows = seed_table(mine, "accuracy", f"{method}, no DP", f"{method}, no DP", ["global_accuracy"])
        for row in rows:
            spent = [s.get("privacy", {}).get("epsilon") for s in runs[row["method"]].values()]
            row["epsilon (delta 1/10)"] = spent[0] if spent and spent[0] is not None else float("inf")
        found[method] = rows
    return found


def main() -> None:
    cli = bench_parser(__doc__)
    add_flags(cli, "seeds", "threads", "name", "results", "checkpoint_every", "report_only", name="dp")
    args = parse_flags(cli)
    setting = {"nodes": 10, "max_train_per_node": 500, "partition": "dirichlet:0.3", "rounds": 10, "local_epochs": 2, "eval_every": 10}
    base = with_options(default_config(data="fmnist", threads=args.threads, **setting), task_options={"global_test_size": 500})
    runs = by_label(run_seeds(base, variants(), seed_list(args), Path("runs") / f"bench_{args.name}", args.checkpoint_every, args.report_only))
    found = tables(runs)
    figures = {f"{args.name}_{m}.png": _figure(runs, m) for m in NOISE if f"{m}, no DP" in runs}
    figures[f"{args.name}.png"] = lambda folder, file_name: _against_epsilon(found, folder / file_name)
    write_seed_tables(cli, args, "Accuracy against the privacy spent", __doc__, found, figures)


def _figure(runs: dict[str, dict[int, dict[str, Any]]], method: str) -> Any:
    mine = {k: v for k, v in runs.items() if k.startswith(f"{method},")}
    title = f"{method}: accuracy by noise level"
    return lambda folder, file_name: draw_seeds(mine, ["accuracy", "global_accuracy"], f"{method}, no DP", folder, file_name, title)


def _against_epsilon(found: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Accuracy (mean ± std over seeds) against ε on a log axis, a line per method; the run
    without DP drawn as a dashed level (its ε is infinite)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (method, rows), colour in zip(found.items(), ("#3182bd", "#e6550d"), strict=False):
        noisy = sorted((r["epsilon (delta 1/10)"], r["accuracy"], r["± std"]) for r in rows if r["epsilon (delta 1/10)"] != float("inf"))
        if noisy:
            eps, acc, std = zip(*noisy, strict=True)
            ax.errorbar(eps, acc, yerr=std, marker="o", capsize=3, color=colour, label=f"{method} with DP")
        clean = [r["accuracy"] for r in rows if r["epsilon (delta 1/10)"] == float("inf")]
        if clean:
            ax.axhline(clean[0], linestyle="--", color=colour, label=f"{method} without DP")
    ax.set_xscale("log")
    ax.set_xlabel("ε at δ = 1/10 (RDP accountant), per client or node")
    ax.set_ylabel("accuracy on the client's own test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
