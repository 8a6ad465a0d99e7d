"""The run folder every driver writes (summary.json, metrics.jsonl and ledger.csv) and the
readers of its streams.

metrics.jsonl and ledger.csv grow line by line and are flushed as they go, so a node killed
mid-run keeps everything up to its last completed round; summary.json is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from p2pmoe.fsio import atomic_write_bytes, atomic_write_json
from p2pmoe.ledger import LedgerEntry
from p2pmoe.trackers import Tracker

LEDGER_FIELDS = [f.name for f in dataclasses.fields(LedgerEntry)]
T = TypeVar("T")


log = logging.getLogger("p2pmoe.runs")

NODE_FILE = "node.json"
"""A daemon's own file in its run folder (setting, start and end, peers found and lost); the
report merges a LAN run's per-node folders by it."""


class RunFolder:
    """Writer for one run folder; `append=True` continues a resumed node's files. `holds` names
    what each client holds (its domain): every metrics line of that node carries it."""

    def __init__(self, path: str | Path, append: bool = False, holds: Mapping[str, str] | None = None, trackers: Sequence[Tracker] = ()) -> None:
        self.path = Path(path)
        self.holds = dict(holds or {})
        self.trackers = list(trackers)  # TensorBoard, MLflow: each line also goes there
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
        if row.get("node") in self.holds:
            row = {**row, "holds": self.holds[row["node"]]}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        for tracker in list(self.trackers):
            try:
                tracker.log(row)
            except Exception as exc:  # a tracker that fails (a server gone) must not end the run: it is dropped
                log.warning("%s stopped receiving metrics: %s", type(tracker).__name__, exc)
                self.trackers.remove(tracker)

    def log_messages(self, entries: Iterable[LedgerEntry]) -> None:
        """Append ledger rows, one per message."""
        self._ledger.writerows(_ledger_rows(entries))
        self._ledger_file.flush()

    def close(self) -> None:
        self._metrics.close()
        self._ledger_file.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the streams and write summary.json."""
        self.close()
        atomic_write_json(self.path / "summary.json", summary)


def _ledger_rows(entries: Iterable[LedgerEntry]) -> list[list[Any]]:
    return [[getattr(e, name) for name in LEDGER_FIELDS] for e in entries]


def cut_records(path: str | Path, last_round: int) -> tuple[list[dict[str, Any]], list[LedgerEntry]]:
    """Keep only the metrics rows and ledger entries of rounds up to `last_round` in the run
    folder `path` (a resumed simulation drops what it will run again); return what is kept.
    A torn last line (a kill mid-write) is dropped with the rest of the later rounds; a bad line
    elsewhere raises ValueError before anything is written. Each file is replaced atomically,
    so a kill here loses nothing that is kept."""
    path = Path(path)
    metrics, ledger = path / "metrics.jsonl", path / "ledger.csv"
    rows = [r for r in _lines(metrics, json.loads) if r["round"] <= last_round]
    entries = [e for e in _lines(ledger, _ledger_entry, header=True) if e.round <= last_round]
    atomic_write_bytes(metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())
    text = io.StringIO(newline="")
    csv.writer(text).writerows([LEDGER_FIELDS, *_ledger_rows(entries)])
    atomic_write_bytes(ledger, text.getvalue().encode())
    return rows, entries


def _lines(path: Path, parse: Callable[[str], T], header: bool = False) -> list[T]:
    """Each non-blank line of `path` parsed (none if it does not exist); an unparseable last
    line is taken for a torn write and skipped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines()[1 if header else 0 :] if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(parse(line))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1 + header}: {exc}") from None
    return out


def _ledger_entry(line: str) -> LedgerEntry:
    values = next(csv.reader([line]))
    if len(values) != len(LEDGER_FIELDS):
        raise ValueError(f"{len(values)} fields, expected {len(LEDGER_FIELDS)}")
    round_index, src, dst, kind, header, payload, phase = values  # LEDGER_FIELDS' order
    return LedgerEntry(int(round_index), src, dst, kind, int(header), int(payload), int(phase))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (blank lines skipped)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_ledger(path: str | Path) -> list[LedgerEntry]:
    """The messages of a ledger.csv file, as the entries they were written from."""
    with open(path, newline="") as handle:
        return [_ledger_entry(line) for line in list(handle)[1:] if line.strip()]
