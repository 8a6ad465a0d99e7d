"""The run folder every driver writes: summary.json, metrics.jsonl and ledger.csv."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from p2pmoe.fsio import atomic_write_json
from p2pmoe.ledger import ByteLedger


class RunFolder:
    """metrics.jsonl grows one line per node per round (flushed, so a crash keeps what was
    done); summary.json and the ledger are written atomically at the end."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "w")

    def log(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def finish(self, summary: dict[str, Any], ledger: ByteLedger) -> None:
        self._metrics.close()
        ledger.write_csv(self.path / "ledger.csv")
        atomic_write_json(self.path / "summary.json", summary)
