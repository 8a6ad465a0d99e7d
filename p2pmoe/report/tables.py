"""Results tables and benchmark rows, shared by the command line, bench/ scripts and reports."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

GATE_PREFIXES = ("gate_mean/", "alpha/")
"""Metric-name prefixes of a per-client weight over experts or domains (FMoE-CDSR's mean gate
weight per branch, FeDecider's alpha): pictures in a report, never table columns."""


def cell(value: Any) -> str:
    """A table cell: floats to 4 decimals, integers with thousands separators."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table with right-aligned numbers, for terminals and READMEs alike."""
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def metric_order(name: str) -> list[Any]:
    """Sort key that puts `hr@5` before `hr@10` (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def breakdown(name: str, means: Collection[str]) -> tuple[str, str] | None:
    """(part, metric) of a per-domain or per-task metric, None for a mean over them.

    Timelines name a domain's value `books/mrr`, multi-task data a task's `auc/click`: the side
    that is itself a mean metric's name (`means`) is the metric, the other the part."""
    if "/" not in name or name.startswith(GATE_PREFIXES):
        return None
    first, rest = name.split("/", 1)
    if first in means:  # a metric's value per task: auc/click
        return rest, first
    part, metric = name.rsplit("/", 1)  # a domain's value of a metric; the domain's own name may hold a "/"
    return part, metric


def mean_metric_names(names: Iterable[str]) -> list[str]:
    """The metrics without a per-domain breakdown (gate weights left out), in natural order."""
    return sorted((n for n in names if "/" not in n), key=metric_order)


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The columns every results table shows for one run: the mean metrics (per-domain values
    are `summary_domain_rows`', so a timelines run's row stays one screen wide), bytes and
    wall time."""
    metrics = summary["metrics"]
    return {
        "method": summary["method"],
        **{name: metrics[name] for name in mean_metric_names(metrics)},
        "MB/node/round": summary["bytes"]["per_node_per_round"]["total"] / 1e6,
        "total MB": summary["bytes"]["total"] / 1e6,
        "wall s": summary["wall_seconds"],
    }


def split_by_part(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """part (domain or task) -> metric -> value, of the metrics that have a breakdown."""
    means = set(mean_metric_names(metrics))
    parts: dict[str, dict[str, Any]] = {}
    for name in sorted(metrics, key=metric_order):
        found = breakdown(name, means)
        if found is not None:
            parts.setdefault(found[0], {})[found[1]] = metrics[name]
    return parts


def summary_domain_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per domain (or task) of a run whose metrics have a breakdown, one column per
    metric; no rows for a run without one."""
    return [{"method": summary["method"], "domain": part, **values} for part, values in sorted(split_by_part(summary["metrics"]).items())]


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every key of `rows`, in order of first appearance: rows of different tasks have
    different metrics."""
    return list(dict.fromkeys(k for row in rows for k in row))


def random_ranking_rows(summaries: Iterable[dict[str, Any]], columns: Sequence[str], label: str) -> list[dict[str, Any]]:
    """One row per candidate count among the runs' ranking protocols: what ranking at random
    scores in each of `columns` (issue 28: a ranking table shows the level a method must beat).
    `label` is the column that names the row."""
    levels = {}
    for summary in summaries:
        level = summary.get("data_profile", {}).get("random_ranking")
        if level:
            levels[level["candidates"]] = level
    return [
        {label: f"random ranking ({count} candidates)", **{c: level[c] for c in columns if c in level and c != "candidates"}}
        for count, level in sorted(levels.items())
    ]


def summary_tables(summaries: Sequence[dict[str, Any]]) -> str:
    """The terminal text for finished runs: a table of mean metrics, bytes and wall time (one
    row per run, then the random-ranking level of a ranking protocol), then, where metrics
    have a per-domain breakdown, a table with one row per run and domain (in one table, a
    five-domain timelines run is ~55 columns wide)."""
    means = [summary_row(s) for s in summaries]
    means += random_ranking_rows(summaries, columns_of(means), "method")
    parts = [row for s in summaries for row in summary_domain_rows(s)]
    tables = [format_table(means, columns_of(means))]
    if parts:
        tables.append("per domain:\n" + format_table(parts, columns_of(parts)))
    return "\n\n".join(tables)


COLD_START_SHARE = 0.5
"""Above this share of unseen test targets in a domain, the data is flagged as cold-start."""


def profile_lines(profile: dict[str, Any]) -> list[str]:
    """A task's data profile (`Task.profile`) in words, for the terminal and the report."""
    lines = []
    unseen = profile.get("unseen_targets", {})
    if unseen:
        shares = "; ".join(
            f"{domain} " + ", ".join(f"{split} {share:.0%}" for split, share in splits.items() if share is not None) for domain, splits in unseen.items()
        )
        lines.append(f"targets never seen in training: {shares}")
        cold = [domain for domain, splits in unseen.items() if (splits.get("test") or 0) > COLD_START_SHARE]
        if cold:
            lines.append(
                f"warning: cold-start data: in {', '.join(cold)} most test targets never occur in training, so an ID-based model "
                "cannot rank them above chance; compare every method with the random-ranking level"
            )
    level = profile.get("random_ranking")
    if level:
        shown = ", ".join(f"{m} {level[m]:.4f}" for m in ("mrr", "hr@10", "ndcg@10") if m in level)
        lines.append(f"random ranking with {level['candidates']} candidates per target: {shown}")
    return lines


def round_ranges(rounds: Iterable[int]) -> str:
    """Rounds as runs of consecutive numbers: `0-2, 5, 7-9` (empty: `none`)."""
    ordered = sorted(set(rounds))
    if not ordered:
        return "none"
    spans, start, previous = [], ordered[0], ordered[0]
    for current in [*ordered[1:], None]:
        if current is None or current != previous + 1:
            spans.append(str(start) if start == previous else f"{start}-{previous}")
            start = current if current is not None else start
        previous = current if current is not None else previous
    return ", ".join(spans)


def participation_lines(took_part: Mapping[str, str], rounds: int) -> list[str]:
    """The end-of-run table of who ran which rounds (issue 29: a swarm ended without saying)."""
    width = max((len(node) for node in took_part), default=4)
    return [f"{node:<{width}}  rounds {ran} of 0-{rounds - 1}" for node, ran in sorted(took_part.items())]


LOCAL_PLACEHOLDERS = {"run.data_root": "DIR", "data_root": "DIR"}
"""Options whose value is a path of the machine that ran the command (the experiment flag, or a
script's own `--data-root`), and what stands for it."""


def rerun_command(script: str, args: argparse.Namespace, skip: Iterable[str] = (), parser: argparse.ArgumentParser | None = None) -> str:
    """The command line that reruns a benchmark with the options it was given (for its .md).

    With `parser`, each option is written as the flag that sets it (dest `method.p` is
    `--fedmoe-p`); without, as its dest with dashes and without the section (`run.batch_size`
    is `--batch-size`), which is wrong for a method option whose flags carry a prefix.
    `skip` names dests to leave out. Values are shell-quoted, so a value with spaces (an
    `--only` label such as "φ gossip all") pastes back as one argument. A path of this
    machine (`LOCAL_PLACEHOLDERS`, the data root) is written as a placeholder: it means
    nothing elsewhere and must not be committed."""
    flags: dict[str, str] = {}
    switches: set[str] = set()  # store_true options: the bare flag when set, nothing when not
    if parser is not None:
        for action in parser._actions:
            long = [s for s in action.option_strings if s.startswith("--")]
            if long:
                flags.setdefault(action.dest, long[0])
            if isinstance(action, argparse._StoreTrueAction):
                switches.add(action.dest)
    skipped = set(skip)
    given = []
    for k, v in vars(args).items():
        if v in (None, "") or k in skipped or (k in switches and v is False):
            continue
        flag = flags.get(k) or "--" + k.rsplit(".", 1)[-1].replace("_", "-")
        v = LOCAL_PLACEHOLDERS.get(k, v)
        given.append(flag if k in switches else f"{flag} {shlex.quote(str(v))}")
    return " ".join([f"python {script}", *given])
