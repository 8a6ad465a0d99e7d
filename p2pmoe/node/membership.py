"""Who is alive: peer liveness from the last time each peer was heard from.

Pure logic with time passed in, so the daemon (wall clock) and tests (made-up times) drive
the same code. A peer is alive until `suspect_after` seconds of silence, suspect until
`dead_after`, then dead. `newly_dead` and `revived` report changes once each, so the daemon
tells a method about a lost peer exactly once and again only after the peer came back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

State = Literal["alive", "suspect", "dead"]


class Membership:
    """Liveness of a set of peers.

    A peer that was never heard from counts from `start` (by default the first time this
    object is given), so a peer that never shows up is declared dead `dead_after` later.
    """

    def __init__(self, peers: Iterable[str], suspect_after: float, dead_after: float, start: float | None = None) -> None:
        if not 0 < suspect_after <= dead_after:
            raise ValueError(f"need 0 < suspect_after <= dead_after, got {suspect_after}, {dead_after}")
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self._start = start
        self._last_seen: dict[str, float | None] = {peer: None for peer in peers}
        self._reported_dead: set[str] = set()

    def _since(self, peer: str, now: float) -> float:
        if self._start is None:
            self._start = now
        last = self._last_seen[peer]
        return now - (self._start if last is None else last)

    def add(self, peer: str) -> None:
        """Track `peer` too (it counts from `start` until heard from)."""
        self._last_seen.setdefault(peer, None)

    def remove(self, peer: str) -> None:
        """Stop tracking `peer`; nothing more is reported about it."""
        self._last_seen.pop(peer, None)
        self._reported_dead.discard(peer)

    def seen(self, peer: str, now: float) -> None:
        """`peer` was heard from at `now` (an unknown peer is added)."""
        last = self._last_seen.get(peer)
        self._last_seen[peer] = now if last is None else max(last, now)

    def never_heard(self) -> list[str]:
        """Peers never heard from at all, sorted."""
        return sorted(peer for peer, last in self._last_seen.items() if last is None)

    def state(self, peer: str, now: float) -> State:
        """'alive', 'suspect' or 'dead' at `now`; KeyError for a peer not tracked."""
        silence = self._since(peer, now)
        if silence < self.suspect_after:
            return "alive"
        return "suspect" if silence < self.dead_after else "dead"

    def alive(self, now: float) -> list[str]:
        """Peers in state 'alive' (suspects excluded), sorted."""
        return sorted(p for p in self._last_seen if self.state(p, now) == "alive")

    def newly_dead(self, now: float) -> list[str]:
        """Peers dead at `now` that have not been reported dead since they were last alive."""
        dead = sorted(p for p in self._last_seen if p not in self._reported_dead and self.state(p, now) == "dead")
        self._reported_dead.update(dead)
        return dead

    def revived(self, now: float) -> list[str]:
        """Peers reported dead that have been heard from since; each is reported once."""
        back = sorted(p for p in self._reported_dead if self.state(p, now) != "dead")
        self._reported_dead.difference_update(back)
        return back

    def table(self, now: float) -> dict[str, dict[str, object]]:
        """Per peer: state, last time heard from (None if never) and seconds of silence."""
        return {peer: {"state": self.state(peer, now), "last_seen": last, "silence": self._since(peer, now)} for peer, last in sorted(self._last_seen.items())}
