"""Byte accounting: every message a driver moves is one ledger row.

Sizes are those of the encoded frames (header + payload), so the simulator and the daemon
report the same numbers for the same messages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    src: str
    dst: str
    kind: str
    header_bytes: int
    payload_bytes: int
    phase: int = 0  # causal depth in the round: 0 = sent at round start, k = in reply to phase k-1

    @property
    def total(self) -> int:
        return self.header_bytes + self.payload_bytes


class ByteLedger:
    """Append-only record of messages; summaries are derived, never stored twice."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []
        self._sent: dict[tuple[str, int], int] = defaultdict(int)  # (node, round) -> bytes, kept as rows come
        self._received: dict[tuple[str, int], int] = defaultdict(int)

    def record(self, round_index: int, src: str, dst: str, kind: str, header_bytes: int, payload_bytes: int, phase: int = 0) -> None:
        entry = LedgerEntry(round_index, src, dst, kind, header_bytes, payload_bytes, phase)
        self.entries.append(entry)
        self._sent[(src, round_index)] += entry.total
        self._received[(dst, round_index)] += entry.total

    def extend(self, entries: Iterable[LedgerEntry]) -> None:
        """Record entries read back from a ledger.csv (a resumed simulation's earlier rounds)."""
        for e in entries:
            self.record(e.round, e.src, e.dst, e.kind, e.header_bytes, e.payload_bytes, e.phase)

    def totals(self) -> dict[str, object]:
        """Bytes of all messages, split into header and payload and by message kind."""
        by_kind: dict[str, int] = defaultdict(int)
        for e in self.entries:
            by_kind[e.kind] += e.total
        return {
            "total": sum(e.total for e in self.entries),
            "header": sum(e.header_bytes for e in self.entries),
            "payload": sum(e.payload_bytes for e in self.entries),
            "messages": len(self.entries),
            "by_kind": dict(sorted(by_kind.items())),
        }

    def node_traffic(self, node: str, round_index: int | None = None) -> dict[str, int]:
        """Bytes `node` sent and received (in `round_index`, or in all rounds)."""
        if round_index is not None:
            return {"sent": self._sent.get((node, round_index), 0), "received": self._received.get((node, round_index), 0)}
        return {
            "sent": sum(v for (n, _), v in self._sent.items() if n == node),
            "received": sum(v for (n, _), v in self._received.items() if n == node),
        }

    def per_node_per_round(self, nodes: Iterable[str], rounds: int) -> dict[str, object]:
        """Mean over `nodes` of bytes sent plus received per round, in all and by kind.

        This is the figure a client pays per round: for FedAvg, one upload and one download.
        """
        nodes = list(nodes)
        members = set(nodes)
        by_kind: dict[str, int] = defaultdict(int)
        for e in self.entries:  # integer sums: the same whatever order the entries were recorded in
            by_kind[e.kind] += ((e.src in members) + (e.dst in members)) * e.total
        count = len(nodes) * rounds

        def mean(byte_count: int) -> float:
            return byte_count / count if count else 0.0

        return {"total": mean(sum(by_kind.values())), "by_kind": {kind: mean(v) for kind, v in sorted(by_kind.items())}}
