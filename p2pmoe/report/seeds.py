"""Tables and figures of a comparison over seeds: one row per variant, paired verdicts.

Input is plain: for each variant label, its summaries by seed (summary.json dicts). A table
row shows the mean and standard deviation over seeds of a metric, the bytes and the training
compute per node and round, and, against a reference variant, the paired difference over
seeds with its standard error and the verdict of `p2pmoe.report.stats.Paired`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pmoe.report.folders import UNCOMPARED, RunData, differences
from p2pmoe.report.stats import Paired, paired, spread

Summaries = Mapping[str, Mapping[int, Mapping[str, Any]]]  # label -> seed -> summary


UNGROUPED = UNCOMPARED | {"seed", "threads", "workers", "plugins", "tensorboard", "mlflow", "data_root"}
"""Setting keys that do not make runs different experiments when grouping them over seeds: the
seed itself, where the run wrote, and how it ran (threads, workers, trackers)."""


def seed_groups(runs: Sequence[RunData]) -> dict[str, dict[int, dict[str, Any]]]:
    """Run folders with a summary, grouped by their setting with the seed left out: a group is
    one experiment repeated over seeds (label -> seed -> summary). A group's label is its method
    and the options on which it differs from the other groups, the seed aside, so
    `p2pmoe report A/seed0 A/seed1 B/seed0 B/seed1` compares A and B over seeds."""
    grouped: dict[str, list[RunData]] = {}
    for run in runs:
        if run.summary.get("setting") and run.summary.get("per_node"):
            values = {k: v for k, v in run.setting_values().items() if k not in UNGROUPED}
            grouped.setdefault(json.dumps(values, sort_keys=True), []).append(run)
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for group, differ in zip(grouped.values(), differences([g[0] for g in grouped.values()]), strict=True):
        shown = {k: v for k, v in differ.items() if k not in ("seed", "method")}
        label = str(group[0].run_setting.get("method", "?")) + (f" ({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")
        label = label if label not in found else f"{label} #{len(found) + 1}"
        found[label] = {int(r.run_setting.get("seed", 0)): r.summary for r in group}
    return found


def repeated(groups: Mapping[str, Mapping[int, Any]]) -> bool:
    """Whether any group holds more than one seed (a seed table has something to say)."""
    return any(len(by_seed) > 1 for by_seed in groups.values())


def compared_metric(runs: Sequence[RunData]) -> str | None:
    """The test metric a seed table compares: the first run's headline, its test name when the
    headline is a validation metric the run also scores on test (valid_ndcg@5 -> ndcg@5)."""
    headline = runs[0].headline if runs else None
    test = headline.removeprefix("valid_") if headline else None
    return test if test in runs[0].metric_names else headline


def seeds_table(runs: Sequence[RunData]) -> tuple[str, list[dict[str, Any]]] | None:
    """`p2pmoe report`'s table over seeds, with its heading: one row per group of `seed_groups`
    and the paired difference against the first group; None when no group repeats a seed."""
    groups, metric = seed_groups(runs), compared_metric(runs)
    if not repeated(groups) or metric is None:
        return None
    first = next(iter(groups))
    heading = (
        f"over seeds ({metric} in the selected round: mean ± std over seeds; paired difference of {first} against each, "
        "a verdict only with at least 3 seeds and beyond 2 SE)"
    )
    return heading, seed_table(groups, metric, first, first)


def metric_by_seed(runs: Mapping[int, Mapping[str, Any]], metric: str) -> dict[int, float]:
    """The summary's mean over nodes of `metric`, by seed (seeds without it left out); a name
    `<node>/<metric>` that the summary's metrics lack is that node's own value (one client per
    domain: the domain's column)."""
    return {seed: value for seed, s in runs.items() if (value := _summary_metric(s, metric)) is not None}


def _summary_metric(summary: Mapping[str, Any], metric: str) -> float | None:
    if metric in summary["metrics"]:
        return float(summary["metrics"][metric])
    node, _, name = metric.partition("/")
    own = summary.get("per_node", {}).get(node, {})
    return float(own[name]) if name in own else None


def nodes_by_seed(runs: Mapping[int, Mapping[str, Any]], metric: str) -> dict[int, dict[str, float]]:
    """Every node's `metric` in the selected round, by seed."""
    return {seed: {n: float(m[metric]) for n, m in s["per_node"].items() if metric in m} for seed, s in runs.items()}


def compare(runs: Summaries, a: str, b: str, metric: str) -> Paired:
    """`a - b` on `metric`, paired by seed and by (seed, node)."""
    return paired(metric_by_seed(runs[a], metric), metric_by_seed(runs[b], metric), nodes_by_seed(runs[a], metric), nodes_by_seed(runs[b], metric))


def seed_table(runs: Summaries, metric: str, reference: str, bytes_unit: str, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per variant: `metric` (and each `extra` metric) mean ± std over seeds, bytes
    and compute per node and round (means over seeds), bytes as a multiple of `bytes_unit`'s,
    and the paired difference `reference - variant` with its verdict for the reference."""
    unit = _mean(runs[bytes_unit], lambda s: s["bytes"]["per_node_per_round"]["total"]) if bytes_unit in runs else float("nan")
    rows = []
    for label, by_seed in runs.items():
        values = metric_by_seed(by_seed, metric)
        if not values:
            continue
        s = spread(list(values.values()))
        per_round = _mean(by_seed, lambda x: x["bytes"]["per_node_per_round"]["total"])
        row: dict[str, Any] = {"method": label, "seeds": s.n, metric: s.mean, "± std": s.std}
        for name in extra:
            extra_values = list(metric_by_seed(by_seed, name).values())
            row[name] = spread(extra_values).mean if extra_values else float("nan")
        row |= {
            "KB/node/round": per_round / 1e3,
            f"x {bytes_unit} bytes": per_round / unit if unit else float("nan"),
            "sample-epochs/node/round": _mean(by_seed, lambda x: x.get("compute", {}).get("per_node_per_round", float("nan"))),
        }
        chosen = [s.get("selection", {}).get("round") for s in by_seed.values()]
        row["selected round"] = "/".join("-" if r is None else str(r + 1) for r in chosen)  # per seed, counted from 1
        common = set(metric_by_seed(runs[reference], metric)) & set(values) if reference in runs else set()
        if label != reference and common:
            diff = compare(runs, reference, label, metric)
            row |= {f"{reference} − this": diff.by_seed.mean, "± se": diff.by_seed.se, "verdict": diff.verdict}
        elif label != reference and reference in runs:
            row["verdict"] = "no seed in common"
        rows.append(row)
    return rows


def _mean(by_seed: Mapping[int, Mapping[str, Any]], value: Any) -> float:
    values = [float(value(s)) for s in by_seed.values()]
    return sum(values) / len(values) if values else float("nan")


def draw_seeds(runs: Summaries, metrics: Sequence[str], reference: str, out: Path, name: str, title: str) -> Path:
    """Left: each metric's mean over seeds per variant, a dot per seed; right: the reference's
    per-node differences against every other variant (all seeds' nodes), as box plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5.2 * (len(metrics) + 1), 4.2))
    for ax, metric in zip(axes, metrics, strict=False):
        for i, label in enumerate(labels):
            values = list(metric_by_seed(runs[label], metric).values())
            if values:
                ax.bar(i, sum(values) / len(values), color="#9ecae1" if label != reference else "#3182bd")
                ax.plot([i] * len(values), values, "k.", markersize=5)
        ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=7)
        ax.set_ylabel(metric)
        low = min((v for label in labels for v in metric_by_seed(runs[label], metric).values()), default=0.0)
        ax.set_ylim(max(0.0, low - 0.05), None)
    others = [label for label in labels if label != reference]
    diffs = []
    for label in others:
        a, b = nodes_by_seed(runs[reference], metrics[0]), nodes_by_seed(runs[label], metrics[0])
        diffs.append([a[s][n] - b[s][n] for s in sorted(set(a) & set(b)) for n in sorted(set(a[s]) & set(b[s]))])
    ax = axes[-1]
    ax.boxplot(diffs, showmeans=True)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(1, len(others) + 1), others, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(f"{metrics[0]}: {reference} − method, per node")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
