"""Epoch time of FMoE-CDSR against Local SASRec on one FKCB domain, measured side by side.

    python bench/bench_step.py --data-root DIR --domain Food --threads 1

Each method is one client model of the size the replication uses (hidden 64, batch 64, 2
blocks, 4 heads, max length 16 by default) trained by the same `NextItemLearner`. FMoE-CDSR
runs as in every round after the first: all K branches live, the foreign experts loaded
(from independently initialised experts; their values do not change the cost) and either
frozen (the method) or trainable (the "unfrozen" ablation). A last row times only the work
FMoE-CDSR's objective cannot skip, its K heads and K + 1 softmax cross-entropies
(`HeadsFloor`): a lower bound for any exact implementation. ``--train-negatives N`` adds
Local SASRec and FMoE-CDSR trained with a sampled softmax of N items (`[task] train_negatives`),
which changes the objective and so is not bound by that floor. The methods take turns, one
epoch each, ``--repeats`` times, so a load change on a shared machine hits all of them alike;
the table reports the median epoch in CPU seconds of this process (one torch thread: its
CPU time is its compute, which wall time on a shared machine is not). Writes bench/results/step.json and step.md.

    python bench/bench_step.py --data-root DIR --domain Food --threads 1 --quality 8

``--quality E`` instead trains, on that one domain alone, Local SASRec and a one-branch
FMoE-CDSR client (foreign branches absent, as in round 1) under each recipe of issue 11
(official init with the KL term, SASRec init with it, SASRec init without it, μ-only experts) for E epochs
each, and reports test MRR after the last epoch and at the epoch with the best validation
MRR. Writes bench/results/fmoe_cdsr_<domain>_one_client.json and .md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from p2pmoe.data.feddcsr import load_feddcsr
from p2pmoe.data.sequences import DomainSequences
from p2pmoe.harness import add_flags, bench_parser, markdown, parse_flags, rerun_command, write_results
from p2pmoe.learners.sequential import NextItemLearner, SASRecNextItem, SequenceBatch
from p2pmoe.models.fmoe_cdsr import FMoECDSR, transition_adjacency
from p2pmoe.report import format_table


def fmoe_model(domains: list[DomainSequences], c: int, args: argparse.Namespace, frozen: bool, train_negatives: int = 0) -> FMoECDSR:
    """Client c's model with every foreign branch live, as from round 2 on."""
    data = domains[c]
    options = dict(max_len=args.max_len, hidden=args.hidden, dropout=args.dropout)
    adjacency = transition_adjacency(data.train, data.num_items)
    model = FMoECDSR(data.num_items, len(domains), c, adjacency, **options, train_negatives=train_negatives)
    for i in range(len(domains)):
        if i != c:
            model.set_expert_state(i, model.expert_state(i))
            model.experts[i].requires_grad_(not frozen)
    return model


class HeadsFloor(torch.nn.Module):
    """The part of an FMoE-CDSR step no implementation of its objective can skip, alone.

    Per step: K linear heads over the client's items on every predicted position (forward,
    input and weight gradients), K branch cross-entropies and the mixture's cross-entropy
    through the model's own `FMoECDSR._mixture`. The positions' representations come from a
    trainable per-branch lookup (negligible cost) instead of branches and encoders, so this
    times the heads and softmaxes and nothing else: a lower bound on FMoE-CDSR's epoch.
    """

    def __init__(self, num_items: int, num_domains: int, hidden: int) -> None:
        super().__init__()
        self.reps = torch.nn.ModuleList(torch.nn.Embedding(num_items + 1, hidden) for _ in range(num_domains))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, num_items) for _ in range(num_domains))
        self.gate = torch.nn.Parameter(torch.zeros(1, num_domains))

    def loss(self, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        keep = ~batch.pad_mask
        targets = batch.targets[keep]
        logits = {i: head(rep(batch.inputs)[keep]) for i, (rep, head) in enumerate(zip(self.reps, self.heads, strict=True))}
        ce = sum(F.cross_entropy(table, targets) for table in logits.values())
        mixture = FMoECDSR._mixture(self.gate.softmax(dim=-1), logits)
        return ce + F.cross_entropy(mixture, targets), {}


RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # issue 11's defect: how the branch's embeddings start and the KL term
    "init": {
        "FMoE-CDSR one branch, official init (N(0,1) embeddings)": {"init": "official", "vae": True},
        "FMoE-CDSR one branch, SASRec init (N(0,0.02))": {"init": "sasrec", "vae": True},
        "FMoE-CDSR one branch, SASRec init, μ only (no σ stack, no KL)": {"init": "sasrec"},
    },
    # after the fix, over a longer run: which of the branch's other parts keeps it behind SASRec
    "head": {
        "FMoE-CDSR one branch, project default (μ only)": {},
        "FMoE-CDSR one branch, tied head": {"head": "tied"},
        "FMoE-CDSR one branch, no contrastive term": {"contrastive_weight": 0.0},
    },
    # with the tied head: do the graph layer or the official input (·√d, LayerNorm) keep it behind SASRec?
    "backbone": {
        "FMoE-CDSR one branch, tied head": {"head": "tied"},
        "FMoE-CDSR one branch, tied head, no graph layer": {"head": "tied", "graph": False},
        "FMoE-CDSR one branch, tied head, SASRec input (no √d, no input LayerNorm)": {"head": "tied", "input_norm": False},
    },
}


def quality(domains: list[DomainSequences], c: int, args: argparse.Namespace, command: str) -> None:
    """Test MRR of Local SASRec and of the one-branch recipes after ``args.quality`` epochs."""
    data = domains[c]
    adjacency = transition_adjacency(data.train, data.num_items)
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "Local SASRec": lambda: SASRecNextItem(data.num_items, args.max_len, args.hidden, heads=4, blocks=2, dropout=args.dropout),
        **{
            name: (lambda o=options: FMoECDSR(data.num_items, len(domains), c, adjacency, max_len=args.max_len, hidden=args.hidden, dropout=args.dropout, **o))
            for name, options in RECIPES[args.recipes].items()
        },
    }
    rows = []
    for name, build in builders.items():
        torch.manual_seed(0)
        learner = NextItemLearner(build(), data, args.max_len, batch_size=args.batch_size, num_negatives=999)
        history = []
        for _ in range(args.quality):
            learner.train(1)
            history.append(learner.evaluate())
        best = max(range(len(history)), key=lambda e: history[e]["valid_mrr"])
        rows.append(
            {
                "method": name,
                "test MRR % last": 100 * history[-1]["mrr"],
                "test MRR % best valid": 100 * history[best]["mrr"],
                "best epoch": best + 1,
                "HR@10 % last": 100 * history[-1]["hr@10"],
                "valid MRR % by epoch": " ".join(f"{100 * h['valid_mrr']:.1f}" for h in history),
            }
        )
        print(rows[-1], flush=True)
    setting = (
        f"FKCB {data.name} alone ({len(data.train)} training sequences, {data.num_items} items), {args.quality} epochs, "
        f"batch {args.batch_size}, Adam lr 1e-3 betas (0.9, 0.98), hidden {args.hidden}, 2 blocks, 4 heads, dropout "
        f"{args.dropout}, max length {args.max_len}, seed 0, 999 sampled negatives (seed 0); FMoE-CDSR: client "
        f"{c} of {len(domains)} with the foreign branches absent, contrastive weight 0.1 and KL annealed min(1, step/10000) unless the "
        f"recipe says otherwise"
    )
    text = markdown("One client, own branch only: FMoE-CDSR recipes against Local SASRec", setting, command, f"```\n{format_table(rows, list(rows[0]))}\n```\n")
    stem = f"fmoe_cdsr_{data.name.lower()}_one_client" + ("" if args.recipes == "init" else f"_{args.recipes}")
    write_results(args.results, stem, {"setting": setting, "command": command, "rows": rows}, text)


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--data-root", required=True, help="FedDCSR-format FKCB folder")
    p.add_argument("--domain", default="Food")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.3)
    add_flags(p, "threads")
    p.add_argument("--repeats", type=int, default=3, help="epochs timed per method (median reported)")
    p.add_argument("--train-negatives", type=int, default=0, metavar="N", help="also time Local SASRec and FMoE-CDSR with a sampled softmax of N items")
    add_flags(p, "name", "results", name="step")
    p.add_argument("--quality", type=int, default=0, metavar="EPOCHS", help="train the one-branch recipes this long instead of timing")
    p.add_argument("--recipes", choices=sorted(RECIPES), default="init", help="which one-branch recipes --quality trains")
    return p


def epoch_seconds(domains: list[DomainSequences], c: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """CPU seconds of each method's timed epochs, the methods taking turns after a warm-up epoch each."""
    data = domains[c]

    def learner(model: torch.nn.Module) -> NextItemLearner:
        return NextItemLearner(model, data, args.max_len, batch_size=args.batch_size, num_negatives=999)

    torch.manual_seed(0)
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "Local SASRec": lambda: SASRecNextItem(data.num_items, args.max_len, args.hidden, heads=4, blocks=2, dropout=args.dropout),
        "FMoE-CDSR": lambda: fmoe_model(domains, c, args, frozen=True),
        "FMoE-CDSR unfrozen": lambda: fmoe_model(domains, c, args, frozen=False),
        "FMoE-CDSR heads and softmaxes only (floor)": lambda: HeadsFloor(data.num_items, len(domains), args.hidden),
    }
    if args.train_negatives:
        n = args.train_negatives
        builders[f"Local SASRec, sampled softmax ({n})"] = lambda: SASRecNextItem(
            data.num_items, args.max_len, args.hidden, heads=4, blocks=2, dropout=args.dropout, train_negatives=n
        )
        builders[f"FMoE-CDSR, sampled softmax ({n})"] = lambda: fmoe_model(domains, c, args, frozen=True, train_negatives=n)
    learners = {name: learner(build()) for name, build in builders.items()}
    seconds: dict[str, list[float]] = {name: [] for name in learners}
    for lrn in learners.values():  # warm-up epoch, not timed (allocator, lazy init)
        lrn.train(1)
    for _ in range(args.repeats):
        for name, lrn in learners.items():
            started = time.process_time()
            lrn.train(1)
            seconds[name].append(time.process_time() - started)
    return seconds


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    if args.train_negatives and args.name == cli.get_default("name"):
        args.name = "step_sampled"  # the full-softmax table keeps its own file; the rerun command (no --name) lands here again
    torch.set_num_threads(args.threads)
    domains = load_feddcsr(args.data_root)
    c = [d.name for d in domains].index(args.domain)
    data = domains[c]
    if args.quality:
        quality(domains, c, args, rerun_command(cli, args, skip=("repeats", "name", "results", "max_len", "dropout"), data_root="DIR"))
        return
    seconds = epoch_seconds(domains, c, args)
    base, steps = statistics.median(seconds["Local SASRec"]), -(-len(data.train) // args.batch_size)
    rows = [
        {
            "method": name,
            "epoch CPU s": statistics.median(t),
            "CPU ms/step": 1e3 * statistics.median(t) / steps,
            "x Local SASRec": statistics.median(t) / base,
            "epochs s (all)": " ".join(f"{x:.1f}" for x in t),
        }
        for name, t in seconds.items()
    ]
    setting = (
        f"FKCB {args.domain} ({len(data.train)} training sequences, {data.num_items} items, {steps} steps/epoch), "
        f"{len(domains)} domains (FMoE-CDSR: all {len(domains)} branches live, the model's defaults: SASRec init, no KL "
        f"term, so the log σ² stacks are not run; contrastive weight 0.1), hidden {args.hidden}, batch {args.batch_size}, 2 blocks, 4 heads, max length "
        f"{args.max_len}, dropout {args.dropout}, {args.threads} torch thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}; process CPU seconds, median of {args.repeats} epochs after "
        f"one warm-up epoch, methods interleaved"
    )
    command = rerun_command(cli, args, skip=("name", "results", "max_len", "dropout", "quality", "recipes"), data_root="DIR")
    write_results(
        args.results,
        args.name,
        {"setting": setting, "command": command, "rows": rows},
        markdown("Epoch time per method", setting, command, f"```\n{format_table(rows, list(rows[0]))}\n```\n"),
    )


if __name__ == "__main__":
    main()
