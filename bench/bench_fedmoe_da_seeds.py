"""FedMoE-DA against the personalised-FL baselines, over seeds, as a reviewer compares them.

    python bench/bench_fedmoe_da_seeds.py --settings c --seeds 0,1,2       # one setting
    python bench/bench_fedmoe_da_seeds.py --settings a,b,c --report-only   # tables from the runs so far

Settings (issue 25), Fashion-MNIST, Dirichlet 0.3: (a) 10 nodes x 2,000 images, 20 rounds;
(b) 100 nodes x all 60,000 images, 1 local epoch, 60 rounds; (c) 20 nodes x 300 images, 5
local epochs, 30 rounds. Peer-to-peer methods and Local run with every node active every
round; FedAvg runs with 100 % and with 10 % client sampling. Every run evaluates each node at
both points (`--eval-point both`): after the round's aggregation and after its local training.
Each (variant, seed) is a run folder under runs/bench_<name>/<setting>/; a killed benchmark
goes on where it stopped. Writes bench/results/<name>.json, .md and one PNG per setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from p2pmoe.config import build_config, default_config, with_options
from p2pmoe.driver.rounds import evaluation_due
from p2pmoe.fsio import atomic_write_json
from p2pmoe.harness import (
    RunResult,
    Variant,
    add_flags,
    bench_parser,
    by_label,
    chosen,
    fine_tuned_final,
    markdown,
    parse_flags,
    rerun_command,
    result_row,
    run_seeds,
    seed_list,
    write_results,
)
from p2pmoe.harness.writer import Figure
from p2pmoe.naming import client_ids
from p2pmoe.report import format_table
from p2pmoe.report.peer_similarity import selection_vs_labels
from p2pmoe.report.seeds import compare, draw_seeds, metric_by_seed, seed_table
from p2pmoe.report.stats import spearman
from p2pmoe.runs import read_metrics
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.image import client_label_counts

SETTINGS: dict[str, dict[str, Any]] = {
    "a": {"nodes": 10, "max_train_per_node": 2000, "rounds": 20, "local_epochs": 1, "eval_every": 4},
    "b": {"nodes": 100, "max_train_per_node": None, "rounds": 60, "local_epochs": 1, "eval_every": 10},
    "c": {"nodes": 20, "max_train_per_node": 300, "rounds": 30, "local_epochs": 5, "eval_every": 5},
}
CHEAP = {"compression": "embedding=int8,expert_response=int8"}  # FedMoE-DA's default sharing, 8-bit
REFERENCE = "fedmoe-da"
VARIANTS = [
    Variant("local", "local"),
    Variant("fedavg", "fedavg"),
    Variant("fedavg 10%", "fedavg", run={"participation": 0.1}),
    Variant("fedavg-ft", "fedavg-ft"),
    Variant("fedrep", "fedrep"),
    Variant(REFERENCE, "fedmoe-da", {"embedding_error_feedback": True}, CHEAP),
]
POINTS = {"after aggregation": "", "after local training": "@trained"}
SETTING_TEXT = (
    "Fashion-MNIST, Dirichlet 0.3 label skew, full topology, CNN φ (embed 64) + 4 experts (hidden 64), dense gate, SGD lr 0.05 momentum 0.9, "
    "batch 64; personalised accuracy on each node's own test split (same class shares as its training split), global accuracy on a seeded "
    "sample of 500 test images; every node evaluated after the round's aggregation and after its local training. Peer-to-peer methods and "
    "Local: every node active every round; FedAvg with 100 % and 10 % client sampling. FedMoE-DA: P = 2, τ = 1, I = 1, φ gossiped with one "
    "partner of a random matching every second round, 8-bit φ with error feedback and 8-bit experts; validated: a fifth of each node's "
    "examples held out; warm-up: the first sixth of the rounds gossip φ every round and exchange no expert. '+FT' rows: the "
    "same runs' final models scored after one local epoch on a copy, as FedAvg-FT scores FedAvg. "
    "Seeds 0, 1, 2 change the partition, the initial weights and the shuffling; '± std' is over seeds, '± se' the standard error of "
    "the paired difference over seeds; a verdict needs it beyond two standard errors. Compute: training examples x epochs per node "
    "and round (fine-tuning for evaluation included)."
)
BASELINES = ("local", "fedavg", "fedavg 10%", "fedavg-ft", "fedrep")
VALIDATED = "fedmoe-da validated"  # issue 25 item 6, beyond the paper: peers' experts vetted on a fifth of a node's own examples
WARMUP = "fedmoe-da warm-up"  # issue 25 item 6, beyond the paper: the first sixth of the rounds mix φ every round, no experts


def variants(setting: str) -> list[Variant]:
    """The comparison of a setting: the baselines, FedMoE-DA, FedMoE-DA with validated
    aggregation holding out a fifth of each node's training examples (120 of about 600 in (b)),
    and FedMoE-DA whose expert selection starts after a warm-up of a sixth of the rounds (5 of
    30 in (c)) in which φ is gossiped every round and no expert travels."""
    held = (SETTINGS[setting]["max_train_per_node"] or 600) // 5
    warmup = SETTINGS[setting]["rounds"] // 6
    return [
        *VARIANTS,
        Variant(VALIDATED, "fedmoe-da", {"embedding_error_feedback": True, "validation_examples": held}, CHEAP),
        Variant(WARMUP, "fedmoe-da", {"embedding_error_feedback": True, "warmup_rounds": warmup}, CHEAP),
    ]


def setting_config(name: str, threads: int) -> ExperimentConfig:
    run = {"data": "fmnist", "partition": "dirichlet:0.3", "eval_point": "both", "threads": threads, **SETTINGS[name]}
    return with_options(default_config(**run), task_options={"global_test_size": 500})


def why(results: list[RunResult]) -> list[dict[str, Any]]:
    """Item 5 per FedMoE-DA run: did the gate correlation pick label-similar peers?"""
    rows = []
    for r in results:
        if r.label in (REFERENCE, VALIDATED, WARMUP):
            cfg = build_config(r.summary["setting"])
            labels = dict(zip(client_ids(cfg.run.nodes), client_label_counts(cfg), strict=True))
            found = selection_vs_labels(read_metrics(r.out / "metrics.jsonl"), labels)
            rows.append({"variant": r.label, "seed": r.seed, **{k: v for k, v in found.items() if k != "nodes"}, "nodes": found["nodes"]})
    return rows


FINE_TUNED = ("fedrep", REFERENCE, VALIDATED, WARMUP)  # scored again after 1 local epoch, as FedAvg-FT scores FedAvg


def fine_tuned_rows(results: list[RunResult]) -> list[RunResult]:
    """Issue 25 item 6, "a fine-tuning step after aggregation", at no training cost: each final
    model of FINE_TUNED's runs scored after one local epoch on a copy (`fine_tuned_final`,
    from the last checkpoint, cached in the run folder), as rows `<label> +FT` with the run's
    bytes and its compute plus what FedAvg-FT's fine-tuning costs over the same evaluations."""
    derived = []
    for r in (r for r in results if r.label in FINE_TUNED):
        cache = r.out / "fine_tuned_1.json"
        if not cache.is_file():
            atomic_write_json(cache, fine_tuned_final(r, 1))
        per_node = json.loads(cache.read_text())
        means = {k: sum(m[k] for m in per_node.values()) / len(per_node) for k in ("accuracy", "global_accuracy")}
        run = r.summary["setting"]["run"]
        evaluations = sum(evaluation_due(k, run["rounds"], run["eval_every"]) for k in range(run["rounds"]))
        extra = evaluations * sum(m["eval_sample_epochs"] for m in per_node.values()) / (len(per_node) * run["rounds"])
        compute = {"per_node_per_round": r.summary["compute"]["per_node_per_round"] + extra}
        summary = {**r.summary, "metrics": means, "per_node": per_node, "compute": compute}
        derived.append(RunResult(f"{r.label} +FT", r.seed, r.out, summary))
    return derived


def where_it_loses(results: list[RunResult], analysis: list[dict[str, Any]], baseline: str, metric: str) -> dict[str, Any]:
    """Per FedMoE-DA node and seed: its `metric` minus `baseline`'s on the same node, beside how
    far its fetched peers' labels were from its own (JS) and a random peer's; and over all of
    them, whether the nodes that lose most are those whose gate picked dissimilar peers."""
    scores = {(r.label, r.seed): r.summary["per_node"] for r in results}
    nodes = []
    for a in (a for a in analysis if a["variant"] == REFERENCE):
        ours, theirs = scores.get((REFERENCE, a["seed"])), scores.get((baseline, a["seed"]))
        for node, entry in a["nodes"].items():
            if ours and theirs and node in ours and node in theirs and "js_fetched" in entry:
                gap = entry["js_fetched"] - entry["js_random_peer"]
                nodes.append({"seed": a["seed"], "node": node, "difference": ours[node][metric] - theirs[node][metric], "js_fetched_minus_random": gap})
    rho = spearman([n["difference"] for n in nodes], [n["js_fetched_minus_random"] for n in nodes]) if len(nodes) > 2 else float("nan")
    return {
        "baseline": baseline,
        "metric": metric,
        "nodes": nodes,
        "spearman_difference_vs_js_gap": rho,
        "losing_nodes": sum(n["difference"] < 0 for n in nodes),
    }


def verdicts(runs: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The issue's target, per evaluation point and FedMoE-DA row: personalised accuracy at
    least 1 point above the best baseline, the difference beyond two standard errors over
    seeds, at no more than a quarter of FedAvg-100 %'s bytes per node and round."""
    lines = []
    fedavg_bytes = sum(s["bytes"]["per_node_per_round"]["total"] for s in runs["fedavg"].values()) / len(runs["fedavg"]) if "fedavg" in runs else None
    for point, suffix in POINTS.items():
        metric = "accuracy" + suffix
        means = {lb: sum(v := list(metric_by_seed(runs[lb], metric).values())) / len(v) for lb in BASELINES if lb in runs and metric_by_seed(runs[lb], metric)}
        if not means:
            continue
        best = max(means, key=lambda lb: means[lb])
        for label in (lb for lb in runs if lb not in BASELINES and metric_by_seed(runs[lb], metric)):
            diff = compare(runs, label, best, metric)
            ratio = (
                sum(s["bytes"]["per_node_per_round"]["total"] for s in runs[label].values()) / len(runs[label]) / fedavg_bytes if fedavg_bytes else float("nan")
            )
            met = diff.by_seed.mean >= 0.01 and diff.by_seed.mean - 2 * diff.by_seed.se > 0 and ratio <= 0.25
            lines.append(
                f"Evaluated {point}: {label} − best baseline ({best}, {means[best]:.4f}) = {diff.by_seed.mean:+.4f} ± {diff.by_seed.se:.4f} (SE over "
                f"{diff.by_seed.n} seeds; {diff.verdict}) at {ratio:.2f}x FedAvg-100 %'s bytes: target {'MET' if met else 'missed'}.\n"
            )
    return lines


def differences(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per evaluation point: FedMoE-DA minus every other row, mean over seeds."""
    if REFERENCE not in runs:
        return {}
    return {
        point: {
            lb: compare(runs, REFERENCE, lb, "accuracy" + sfx).by_seed.mean for lb in runs if lb != REFERENCE and metric_by_seed(runs[lb], "accuracy" + sfx)
        }
        for point, sfx in POINTS.items()
    }


def why_lines(analysis: list[dict[str, Any]]) -> list[str]:
    return [
        f"{a['variant']}, seed {a['seed']}, round {a['round']}: Spearman(gate similarity, label similarity) over {a['pairs']} pairs = "
        f"{a['spearman_gate_vs_label_similarity']:.3f}; JS of fetched peers' labels {a['mean_js_fetched']:.3f} vs a random peer's "
        f"{a['mean_js_random_peer']:.3f}; {a['nodes_closer_than_random']}/{a['nodes_fetching']} nodes fetched closer than random.\n"
        for a in analysis
    ]


def losses(results: list[RunResult], analysis: list[dict[str, Any]], best: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per evaluation point, `where_it_loses` against the baseline FedMoE-DA trails most (or leads least)."""
    found = []
    for point, suffix in POINTS.items():
        others = {lb: d for lb, d in best.get(point, {}).items() if lb in BASELINES}
        if analysis and others:
            strongest = min(others, key=lambda lb: others[lb])
            found.append({"point": point, **where_it_loses(results, analysis, strongest, "accuracy" + suffix)})
    return found


def loss_line(loss: dict[str, Any]) -> str:
    return (
        f"Evaluated {loss['point']}, against the strongest baseline ({loss['baseline']}): FedMoE-DA is below it on {loss['losing_nodes']} of "
        f"{len(loss['nodes'])} node-seeds; Spearman(per-node difference, JS of fetched peers minus a random peer's) = "
        f"{loss['spearman_difference_vs_js_gap']:.3f}.\n"
    )


def section(name: str, results: list[RunResult]) -> tuple[dict[str, Any], str, dict[str, Figure]]:
    """A setting's JSON, Markdown and figure: the tables at both evaluation points, why the
    gate picked whom it picked, the verdicts and where FedMoE-DA loses."""
    results = results + fine_tuned_rows(results)
    runs, analysis = by_label(results), why(results)
    best = differences(runs)
    text = [f"## Setting ({name}): {json.dumps(SETTINGS[name])}\n"]
    for point, suffix in POINTS.items():
        table = seed_table(runs, "accuracy" + suffix, REFERENCE, "fedavg", extra=("global_accuracy" + suffix,))
        text.append(f"Evaluated {point}:\n\n```\n{format_table(table, list(table[0]))}\n```\n")
    found = losses(results, analysis, best)
    png = f"fedmoe_da_seeds_{name}.png"
    title = f"setting ({name}), seeds {sorted({r.seed for r in results})}"
    text += [*why_lines(analysis), *verdicts(runs), *map(loss_line, found), f"![seeds]({png})\n"]
    rows = [result_row(r.summary, r.label, case=name, compute=r.summary.get("compute")) for r in results]
    data = {"runs": rows, "differences_vs_" + REFERENCE: best, "why": analysis, "where_it_loses": found}
    return data, "\n".join(text), {png: lambda folder, file: draw_seeds(runs, ["accuracy", "accuracy@trained"], REFERENCE, folder, file, title)}


def parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--settings", default="c", help="comma-separated: a, b, c")
    add_flags(p, "seeds", "only", "threads", "checkpoint_every", "report_only", "name", "results", name="fedmoe_da_seeds")
    p.add_argument("--runs", type=Path, default=Path("runs/bench_fedmoe_da_seeds"), help="folder of the run folders (<runs>/<setting>/<variant>/seed<k>)")
    return p


def main() -> None:
    cli = parser()
    args = parse_flags(cli)
    seeds, labels = seed_list(args), [v.label for v in variants("a")]
    wanted = chosen(cli, args, labels)
    skip = ("only", "threads", "report_only", "runs", "results", *(("name",) if args.name == "fedmoe_da_seeds" else ()))
    command = rerun_command(cli, args, skip, checkpoint_every=args.checkpoint_every or 5)  # the +FT rows need checkpoints
    data, sections, figures = {}, [], {}
    for name in args.settings.split(","):
        root, base, compared = args.runs / name, setting_config(name, args.threads), variants(name)
        if not args.report_only:
            run_seeds(base, [v for v in compared if v.label in wanted], seeds, root, args.checkpoint_every)
        finished = run_seeds(base, compared, seeds, root, only_finished=True)
        if finished:
            data[name], md, drawn = section(name, finished)
            sections.append(md)
            figures.update(drawn)
    write_results(args.results, args.name, data, markdown("FedMoE-DA over seeds", SETTING_TEXT, command, *sections), figures)


if __name__ == "__main__":
    main()
