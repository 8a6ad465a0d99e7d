"""What a benchmark reads back from a run folder: a finished run's summary, a stopped run's
metrics so far, and the payload bytes its ledger recorded.

A benchmark made elsewhere (a GPU machine) or killed part way comes back as run folders;
these readers let its tables be made from them without running anything again.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from p2pmoe.config import build_config, resolve
from p2pmoe.driver.summary import select_round, summarise_metrics
from p2pmoe.naming import SERVER_ID
from p2pmoe.runs import read_metrics
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import Selection

Traffic = dict[int, dict[str, dict[str, int]]]  # round -> client -> {"up": bytes, "down": bytes}


def finished_summary(out: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The summary in `out` when it is of exactly `cfg` (resolved), else None. The stored
    setting is read back through `build_config`, so an option added since the run was made
    counts as its default (a run is not redone for an option it could not have had)."""
    path = out / "summary.json"
    try:
        summary = json.loads(path.read_text())
        stored = resolve(build_config(summary["setting"], str(path)))
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn, or of an older or foreign shape
        return None
    return summary if stored == resolve(cfg) else None


def partial_summary(cfg: ExperimentConfig, clients: list[str], selection: Selection, first_rounds: int = 0) -> dict[str, Any] | None:
    """What a run stopped before its last round left: its metrics.jsonl read as the simulator
    reads a finished run's, over the rounds every client evaluated, with ``rounds_done``
    saying how many. Its setting is taken to be `cfg` (an unfinished folder has no summary to
    check it against). A `first_rounds` of N reads rounds 0 .. N-1 only, finished run or not,
    so runs stopped at different rounds compare at one budget."""
    path = Path(cfg.run.out) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = read_metrics(path)
    evaluated: dict[int, set[str]] = defaultdict(set)
    for row in rows:
        if "metrics" in row:
            evaluated[row["round"]].add(row["node"])
    complete = {r for r, nodes in evaluated.items() if nodes >= set(clients) and (not first_rounds or r < first_rounds)}
    chosen, per_node = select_round([r for r in rows if r["round"] in complete], clients, selection)
    if chosen is None:
        return None
    metrics, spread = summarise_metrics(per_node)
    return {
        "method": cfg.run.method,
        "data": cfg.run.data,
        "rounds": cfg.run.rounds,
        "rounds_done": len(complete),
        "first_rounds": first_rounds or None,
        "selection": {"key": selection.key, "round": chosen},
        "metrics": metrics,
        "metrics_spread": spread,
        "per_node": per_node,
        "bytes": {},
        "wall_seconds": None,
        "cpu_seconds": None,
        "setting": cfg.to_dict(),
    }


def client_traffic(run_folder: Path) -> Traffic:
    """Payload bytes each client uploaded to and downloaded from the server, by round, from
    the run's ledger.csv."""
    traffic: dict[int, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"up": 0, "down": 0}))
    with open(run_folder / "ledger.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["dst"] == SERVER_ID:
                traffic[int(row["round"])][row["src"]]["up"] += int(row["payload_bytes"])
            elif row["src"] == SERVER_ID:
                traffic[int(row["round"])][row["dst"]]["down"] += int(row["payload_bytes"])
    return {r: {node: dict(t) for node, t in by_node.items()} for r, by_node in traffic.items()}
