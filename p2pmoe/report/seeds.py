"""Tables and figures of a comparison over seeds: one row per variant, paired verdicts.

Input is plain: for each variant label, its summaries by seed (summary.json dicts). A table
row shows the mean and standard deviation over seeds of a metric, the bytes and the training
compute per node and round, and, against a reference variant, the paired difference over
seeds with its standard error and the verdict of `p2pmoe.report.stats.Paired`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pmoe.report.stats import Paired, paired, spread

Summaries = Mapping[str, Mapping[int, Mapping[str, Any]]]  # label -> seed -> summary


def metric_by_seed(runs: Mapping[int, Mapping[str, Any]], metric: str) -> dict[int, float]:
    """The summary's mean over nodes of `metric`, by seed (seeds without it left out)."""
    return {seed: float(s["metrics"][metric]) for seed, s in runs.items() if metric in s["metrics"]}


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
        if label != reference and reference in runs:
            diff = compare(runs, reference, label, metric)
            row |= {f"{reference} − this": diff.by_seed.mean, "± se": diff.by_seed.se, "verdict": diff.verdict}
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
