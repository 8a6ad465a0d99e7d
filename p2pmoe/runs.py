"""The run folder every driver writes (summary.json, metrics.jsonl and ledger.csv) and the
readers of its streams.

metrics.jsonl and ledger.csv grow line by line and are flushed as they go, so a node killed
mid-run keeps everything up to its last completed round; summary.json is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from p2pmoe.fsio import atomic_write_json
from p2pmoe.ledger import LedgerEntry

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
        self._ledger = csv.writer(self._ledger_file)
        if fresh_ledger:
            self._ledger.writerow(LEDGER_FIELDS)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics line (one node, one round)."""
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def log_messages(self, entries: Iterable[LedgerEntry]) -> None:
        """Append ledger rows, one per message."""
        self._ledger.writerows([getattr(e, name) for name in LEDGER_FIELDS] for e in entries)
        self._ledger_file.flush()

    def close(self) -> None:
        self._metrics.close()
        self._ledger_file.close()

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the streams and write summary.json."""
        self.close()
        atomic_write_json(self.path / "summary.json", summary)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (blank lines skipped)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_ledger(path: str | Path) -> list[LedgerEntry]:
    """The messages of a ledger.csv file, as the entries they were written from."""
    with open(path, newline="") as handle:
        return [
            LedgerEntry(int(r["round"]), r["src"], r["dst"], r["kind"], int(r["header_bytes"]), int(r["payload_bytes"]), int(r["phase"]))
            for r in csv.DictReader(handle)
        ]
