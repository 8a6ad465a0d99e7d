"""The run folder every driver writes: summary.json, metrics.jsonl and ledger.csv.

metrics.jsonl and ledger.csv grow line by line and are flushed as they go, so a node killed
mid-run keeps everything up to its last completed round; summary.json is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Iterable

from p2pmoe.fsio import atomic_write_json
from p2pmoe.config import RunConfig
from p2pmoe.ledger import ByteLedger, LedgerEntry

LEDGER_FIELDS = [f.name for f in dataclasses.fields(LedgerEntry)]


class RunFolder:
    """Writer for one run folder; `append=True` continues a resumed node's files."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        ledger_path = self.path / "ledger.csv"
        fresh_ledger = not append or not ledger_path.exists() or ledger_path.stat().st_size == 0
        self._metrics = open(self.path / "metrics.jsonl", mode)
        self._ledger_file = open(ledger_path, mode, newline="")
        self._ledger = csv.DictWriter(self._ledger_file, fieldnames=LEDGER_FIELDS)
        if fresh_ledger:
            self._ledger.writeheader()

    def log(self, row: dict[str, Any]) -> None:
        """One metrics line (one node, one round)."""
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def log_messages(self, entries: Iterable[LedgerEntry]) -> None:
        """Append ledger rows, one per message."""
        self._ledger.writerows(dataclasses.asdict(e) for e in entries)
        self._ledger_file.flush()

    def close(self) -> None:
        self._metrics.close()
        self._ledger_file.close()

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the streams and write summary.json."""
        self.close()
        atomic_write_json(self.path / "summary.json", summary)


def summarise_metrics(per_node: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean over nodes of each metric, and its spread (std, min, max) over nodes."""
    names = sorted({name for metrics in per_node.values() for name in metrics})
    means, spread = {}, {}
    for name in names:
        values = [m[name] for m in per_node.values() if name in m]
        means[name] = statistics.fmean(values)
        spread[name] = {
            "std": statistics.pstdev(values),
            "min": min(values),
            "max": max(values),
        }
    return means, spread


def make_summary(
    cfg: RunConfig, last_eval: dict[str, dict[str, float]], ledger: ByteLedger, clients: list[str], wall_seconds: float
) -> dict[str, Any]:
    """summary.json: final metrics over clients, byte totals and the whole setting."""
    means, spread = summarise_metrics(last_eval)
    return {
        "method": cfg.method,
        "data": cfg.data,
        "nodes": cfg.nodes,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "metrics": means,
        "metrics_spread": spread,
        "per_node": last_eval,
        "bytes": {**ledger.totals(), "per_node_per_round": ledger.per_node_per_round(clients, cfg.rounds)},
        "wall_seconds": round(wall_seconds, 2),
        "setting": dataclasses.asdict(cfg),
    }
