"""The one row a benchmark keeps per run in <name>.json, whatever it compares.

Keys: method, variant (the script's label), data, case (the benchmark's own setting name,
"alpha 0.3" or "b"), seed, metrics, per_node or per_domain, bytes, wall_seconds,
cpu_seconds, selected_round and setting (the run's full configuration). A failed run keeps
the same keys with its error, so a table can name it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from p2pmoe.settings import ExperimentConfig


def result_row(summary: dict[str, Any], variant: str, case: str = "", domains: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The row of a finished run (`summary` as the simulator writes it, or a partial one);
    with `domains`, per-node metrics are keyed by domain (client k is domain k). `extra`
    adds the script's own fields (the payload by round, a ratio)."""
    per_node = summary.get("per_node", {})
    local = {"per_domain": {d: per_node[f"node-{k:02d}"] for k, d in enumerate(domains)}} if domains is not None else {"per_node": per_node}
    return {
        "method": summary["method"],
        "variant": variant,
        "data": summary["data"],
        "case": case,
        "seed": summary["setting"]["run"]["seed"],
        "metrics": summary["metrics"],
        **local,
        "bytes": summary["bytes"],
        "wall_seconds": summary.get("wall_seconds"),
        "cpu_seconds": summary.get("cpu_seconds"),
        "selected_round": summary.get("selection", {}).get("round"),
        "setting": summary["setting"],
        **extra,
    }


def failed_row(variant: str, cfg: ExperimentConfig, error: Exception, case: str = "") -> dict[str, Any]:
    """The row of a run that raised: what it was and why it stopped."""
    run = cfg.run
    return {"method": run.method, "variant": variant, "data": run.data, "case": case, "seed": run.seed, "error": str(error), "setting": cfg.to_dict()}


RENAMED = {"selection_round": "selected_round", "label": "variant"}
"""Keys of rows saved before this schema, and what they are called now."""


def upgraded(row: dict[str, Any]) -> dict[str, Any]:
    """A row saved before this schema (a committed <name>.json re-rendered with
    --report-only) with today's keys: renamed ones, and CPU minutes as cpu_seconds."""
    row = {RENAMED.get(k, k): v for k, v in row.items()}
    if "cpu_min" in row and "cpu_seconds" not in row:
        row["cpu_seconds"] = 60 * row["cpu_min"]
    return row


def honest_view(summary: dict[str, Any], liars: Sequence[str] | None = None) -> dict[str, Any]:
    """`summary` as the honest clients see it: its per-node rows and mean metrics over the
    clients that do not lie, `liars` (default: the run's own `attackers`; pass another run's
    to compare a clean run over the same clients)."""
    own = liars is None
    excluded = set(summary.get("attackers", []) if liars is None else liars)
    per_node = {n: v for n, v in summary["per_node"].items() if n not in excluded}
    if own:  # the driver's own mean over the honest clients (the run's metrics when nobody lies)
        return {**summary, "metrics": summary.get("honest_metrics", summary["metrics"]), "per_node": per_node}
    names = sorted({k for v in per_node.values() for k, x in v.items() if isinstance(x, (int, float))})
    metrics = {k: sum(v[k] for v in per_node.values() if k in v) / max(1, sum(k in v for v in per_node.values())) for k in names}
    return {**summary, "metrics": metrics, "per_node": per_node}
