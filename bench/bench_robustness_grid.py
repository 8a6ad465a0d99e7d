"""Issue 30: every attack against FedAvg, gossip and FedMoE-DA, with and without each defence.

    python bench/bench_robustness_grid.py --seeds 0,1,2

Fashion-MNIST, 10 clients of at most 500 images, Dirichlet 0.3, 10 rounds x 2 local epochs;
2 of the 10 clients (20 %, a seeded draw) lie: `sign-flip:5` (what they share times -5),
`noise:0.5` (Gaussian noise added), `label-flip` (they train on permuted labels) and, for
FedMoE-DA, `mimic-mean+sign-flip:5` (they publish the mean of their neighbours' gates so that
everyone selects them, then serve flipped experts). A sign-flip row at 10 % and 30 % shows
the fraction. Defences: FedAvg's coordinate-wise median, trimmed mean (20 %) and centred
clipping (tau 1; run at 20 % and without attackers only); gossip's
self-centred clipping (ClippedGossip, tau 1); FedMoE-DA's cap of 0.34 on any one source's
share of a slot plus the slot median, the check of each fetched expert on 100 held-out
examples of the node's own (validated), and that check with φ gossip clipped as in
ClippedGossip (tau 1; validated+clip, run at 20 % and without attackers only). Each row is the honest clients' accuracy on their own
test split after the round's exchange (every method scored at the same point), mean over
seeds; the paired difference is the reference row minus the row, with its standard error and
a verdict only beyond two standard errors. For FedMoE-DA, from the plan the gates make before
any defence acts: "planned from liars" is the share of honest nodes whose plan gives a liar's
expert some weight (mean over rounds), "liars' planned weight" the share of an honest node's
plan weight on liars' experts (mean over nodes and rounds); "vetoed pairs/node" counts the
(slot, peer expert) pairs the held-out check refused over the run (validated only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from p2pmoe.config import default_config, with_options
from p2pmoe.harness import Variant, add_flags, bench_parser, by_label, chosen, honest_view, parse_flags, run_seeds, seed_list, write_seed_tables
from p2pmoe.report.seeds import draw_seeds, seed_table

ATTACKS = {"sign-flip": "sign-flip:5", "noise": "noise:0.5", "label-flip": "label-flip"}
DEFENCES = {
    "fedavg": {"none": {}, "median": {"aggregation": "median"}, "trimmed": {"aggregation": "trimmed:0.2"}, "clipped": {"aggregation": "clip:1"}},
    "gossip": {"none": {}, "clipped": {"clip": 1.0}},
    "fedmoe-da": {
        "none": {},
        "cap+median": {"source_cap": 0.34, "slot_rule": "median"},
        "validated": {"validation_examples": 100},
        "validated+clip": {"validation_examples": 100, "phi_clip": 1.0},
    },
}
FRACTIONS = (0.1, 0.3)  # sign-flip only, beside the 20 % of every attack


def attacks_of(method: str) -> dict[str, str]:
    return {**ATTACKS, "mimic+sign-flip": "mimic-mean+sign-flip:5"} if method == "fedmoe-da" else ATTACKS


def variants() -> list[Variant]:
    found = []
    for method, defences in DEFENCES.items():
        for defence, options in defences.items():
            found.append(Variant(f"{method} {defence} / no attack", method, options))
            for name, spec in attacks_of(method).items():
                found.append(Variant(f"{method} {defence} / 20% {name}", method, options, {"attack": spec, "attackers": 0.2}))
            for fraction in FRACTIONS:
                found.append(Variant(f"{method} {defence} / {fraction:.0%} sign-flip", method, options, {"attack": "sign-flip:5", "attackers": fraction}))
    return found


def fetched_from_liars(out: Path, liars: set[str]) -> dict[str, float]:
    """FedMoE-DA's selection under attack, from the run's diagnostics: `fetched`, the mean over
    rounds of the share of honest nodes whose plan weights a liar's expert; `share`, the mean
    over honest nodes and rounds of the plan's weight on liars' experts (each slot's row sums to
    1). Both are the plan by gate correlation, before the defences (cap, median, held-out check)
    act on it: they show whether mimicry gets liars selected, not what was mixed in. `vetoed`,
    with validated aggregation, the (slot, peer expert) pairs an honest node's held-out check
    refused over the run, liars' and honest ones alike (mean over honest nodes; NaN without the
    check; a run resumed from a checkpoint counts from the resume)."""
    counts: dict[int, list[bool]] = {}
    vetoed: dict[str, int] = {}
    shares = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        found = row.get("diagnostics", {})
        if row.get("node") in liars or "plan_sources" not in found:
            continue
        by_source = [sum(w) for w in zip(*found["plan_weights"], strict=True)]  # a column's weight over the node's slots
        counts.setdefault(row["round"], []).append(any(w and s[0] in liars for s, w in zip(found["plan_sources"], by_source, strict=True)))
        shares.append(sum(w for s, w in zip(found["plan_sources"], by_source, strict=True) if s[0] in liars) / len(found["plan_weights"]))
        if "dropped_by_validation" in found:
            vetoed[row["node"]] = found["dropped_by_validation"]  # a running count: the last row holds the run's
    return {
        "fetched": sum(sum(c) / len(c) for c in counts.values()) / len(counts) if counts else float("nan"),
        "share": sum(shares) / len(shares) if shares else float("nan"),
        "vetoed": sum(vetoed.values()) / len(vetoed) if vetoed else float("nan"),
    }


def tables(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per method and defence, what each attack costs ("better": no attack is better beyond
    2 SE); per method and attack, each defence against none ("worse": none is worse)."""
    found = {}
    for method, defences in DEFENCES.items():
        for defence in defences:
            mine = {k: v for k, v in runs.items() if k.startswith(f"{method} {defence} /")}
            found[f"{method} {defence}: each attack against no attack"] = seed_table(
                mine, "accuracy", f"{method} {defence} / no attack", f"{method} {defence} / no attack"
            )
        for case in ["no attack", *(f"20% {a}" for a in attacks_of(method)), *(f"{f:.0%} sign-flip" for f in FRACTIONS)]:
            mine = {k: v for k, v in runs.items() if k.startswith(f"{method} ") and k.endswith(f" / {case}")}
            found[f"{method}, {case}: each defence against none"] = seed_table(mine, "accuracy", f"{method} none / {case}", f"{method} none / {case}")
    for rows in found.values():
        for row in rows:
            if row["method"].startswith("fedmoe-da"):
                for key, column in (("fetched", "planned from liars"), ("share", "liars' planned weight"), ("vetoed", "vetoed pairs/node")):
                    values = [s["liar_selection"][key] for s in runs[row["method"]].values()]
                    row[column] = sum(values) / len(values)
    return found


def main() -> None:
    cli = bench_parser(__doc__)
    add_flags(cli, "seeds", "only", "threads", "name", "results", "checkpoint_every", "report_only", name="robustness")
    args = parse_flags(cli)
    base = default_config(
        data="fmnist", nodes=10, max_train_per_node=500, partition="dirichlet:0.3", rounds=10, local_epochs=2, eval_every=10, threads=args.threads
    )
    base = with_options(base, task_options={"global_test_size": 500})
    every = variants()
    picked = set(chosen(cli, args, [v.label for v in every], parts=True))
    todo = [v for v in every if v.label in picked]
    results = run_seeds(base, todo, seed_list(args), Path("runs") / f"bench_{args.name}", args.checkpoint_every, args.report_only)
    runs = by_label(results, lambda r: {**honest_view(r.summary), "liar_selection": fetched_from_liars(r.out, set(r.summary.get("attackers", [])))})
    found = tables(runs)
    figures = {f"{args.name}_{m}.png": _figure(runs, m) for m in DEFENCES if f"{m} none / no attack" in runs}
    write_seed_tables(cli, args, "Attacks and defences, every method", __doc__, found, figures)


def _figure(runs: dict[str, dict[int, dict[str, Any]]], method: str) -> Any:
    mine = {k: v for k, v in runs.items() if k.startswith(f"{method} ") and (" / 20%" in k or k.endswith(" / no attack"))}
    return lambda folder, file_name: draw_seeds(mine, ["accuracy"], f"{method} none / no attack", folder, file_name, f"{method}: honest accuracy, 20% liars")


if __name__ == "__main__":
    main()
