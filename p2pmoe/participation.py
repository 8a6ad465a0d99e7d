"""Partial participation: which clients take part in a round, as a pure function of the run.

Two meanings of one fraction q, chosen by the kind of method (`MODES`):
- `sample`, for methods with a server: FedAvg at scale samples a fraction C of its K clients
  each round (McMahan et al. 2017 run C = 0.1 of 100), exactly m = floor(C K) of them;
- `availability`, for peer-to-peer methods and Local: no one samples a swarm; each node is
  online in a round with probability q, independently of the others and of other rounds
  (churn). Its model lives on the node, so it trains every round it is online.
Either way the set is a pure, seeded function of (seed, round, clients, q), so every node, the
server, the simulator and every daemon of a swarm compute the same set on their own, and no
message announces it.

A churn schedule (`[run] churn`, e.g. `node-05:join@3,node-02:leave@5`) adds nodes that exist
only from a round on or until a round: outside its window a node takes part in nothing, in the
simulator and in a swarm alike, so both run the same rounds with the same nodes.

Torch-free and at the bottom layer: methods (which peers to wait for) and drivers (which
nodes train) both ask it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence

_CACHED_ROUNDS = 4  # rounds a `Participation` remembers: a node asks about r and r + 1
MODES = ("sample", "availability")


def sample_size(clients: int, fraction: float) -> int:
    """m = max(floor(C * K), 1), as FedAvg's reference implementations round (Flower's
    `int(K * fraction_fit)`); the tolerance keeps 0.29 * 100 at 29 despite float error."""
    return max(1, min(clients, math.floor(fraction * clients + 1e-9)))


def sample_clients(seed: int, round_index: int, clients: Sequence[str], fraction: float) -> frozenset[str]:
    """The clients sampled for `round_index`: m of them uniformly without replacement,
    independently every round. Fraction 1 is everyone, without drawing anything.

    The generator is seeded with SHA-256 of (seed, round), not Python's `hash`, so the draw is
    the same in every process whatever PYTHONHASHSEED is; the clients are sorted first, so
    their order in a config does not change the sample.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"participation must be in (0, 1], got {fraction!r}")
    if fraction >= 1:
        return frozenset(clients)
    digest = hashlib.sha256(f"p2pmoe.participation:{seed}:{round_index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    ordered = sorted(set(clients))
    return frozenset(rng.sample(ordered, sample_size(len(ordered), fraction)))


def available_clients(seed: int, round_index: int, clients: Sequence[str], probability: float) -> frozenset[str]:
    """The clients online in `round_index`: each independently with `probability`, from a
    uniform number that SHA-256 of (seed, round, client) gives, so a node's availability does
    not depend on which other nodes the run has. Probability 1 is everyone.

    Project decision: unlike `sample_clients` the count varies from round to round (it may be
    zero), as it does in a swarm whose machines come and go.
    """
    if not 0 < probability <= 1:
        raise ValueError(f"participation must be in (0, 1], got {probability!r}")
    if probability >= 1:
        return frozenset(clients)

    def uniform(client: str) -> float:
        digest = hashlib.sha256(f"p2pmoe.availability:{seed}:{round_index}:{client}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    return frozenset(c for c in clients if uniform(c) < probability)


Window = tuple[int, int | None]  # (first round the node exists, first round it is gone for good or None)


def parse_churn(spec: str) -> dict[str, Window]:
    """`node-05:join@3,node-02:leave@5` -> {"node-05": (3, None), "node-02": (0, 5)}: when each
    scheduled node exists. A node may have one join and one leave (join before leave)."""
    joins: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        node, _, event = item.partition(":")
        kind, _, value = event.partition("@")
        if not node or kind not in ("join", "leave") or not value.isdigit():
            raise ValueError(f"[run] churn: {item!r} is not NODE:join@ROUND or NODE:leave@ROUND (e.g. node-05:join@3,node-02:leave@5)")
        events = joins if kind == "join" else leaves
        if node in events:
            raise ValueError(f"[run] churn: {node} has two {kind} events")
        events[node] = int(value)
    windows = {node: (joins.get(node, 0), leaves.get(node)) for node in {**joins, **leaves}}
    for node, (join, leave) in windows.items():
        if leave is not None and not join < leave:
            raise ValueError(f"[run] churn: {node} must join (round {join}) before it leaves (round {leave})")
    return windows


def check_churn(windows: dict[str, Window], clients: Sequence[str], rounds: int) -> None:
    """Each scheduled node is a client and its events fall inside the run."""
    unknown = sorted(set(windows) - set(clients))
    if unknown:
        raise ValueError(f"[run] churn names {unknown}, which are not clients of this run ({clients[0]}..{clients[-1]})")
    for node, (join, leave) in windows.items():
        if not 0 <= join < rounds or (leave is not None and not 0 < leave < rounds):
            raise ValueError(f"[run] churn: {node}'s rounds must lie within the run's rounds 0..{rounds - 1}")


class Participation:
    """One run's participation rule: `sample_clients` (mode `sample`) or `available_clients`
    (mode `availability`) with the run's seed, clients and fraction.

    Nodes that are not clients (a server) always take part. The default object (no clients,
    fraction 1) is full participation, what every method did before this option existed.
    """

    def __init__(
        self, seed: int = 0, fraction: float = 1.0, clients: Sequence[str] = (), mode: str = "sample", windows: dict[str, Window] | None = None
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"participation must be in (0, 1], got {fraction!r}")
        if mode not in MODES:
            raise ValueError(f"participation mode must be one of {MODES}, got {mode!r}")
        self.seed, self.fraction, self.clients, self.mode = seed, fraction, tuple(clients), mode
        self.windows = dict(windows or {})
        self._members = frozenset(self.clients)
        self._cache: dict[int, frozenset[str]] = {}

    @property
    def everyone(self) -> bool:
        return self.fraction >= 1 and not self.windows

    def exists(self, node: str, round_index: int) -> bool:
        """Whether `node` is part of the swarm in `round_index` (its churn window, if any)."""
        join, leave = self.windows.get(node, (0, None))
        return join <= round_index and (leave is None or round_index < leave)

    def sampled(self, round_index: int) -> frozenset[str]:
        """The clients taking part in `round_index` (cached: thousands of nodes may share this object)."""
        if round_index not in self._cache:
            if len(self._cache) >= _CACHED_ROUNDS:
                del self._cache[min(self._cache)]
            draw = sample_clients if self.mode == "sample" else available_clients
            present = [c for c in self.clients if self.exists(c, round_index)]  # a sample of the clients that exist then
            self._cache[round_index] = draw(self.seed, round_index, present, self.fraction) if present else frozenset()
        return self._cache[round_index]

    def takes_part(self, node: str, round_index: int) -> bool:
        """Whether `node` trains and exchanges in `round_index`."""
        if self.everyone or node not in self._members:
            return True
        return self.exists(node, round_index) and (self.fraction >= 1 or node in self.sampled(round_index))

    def among(self, nodes: Iterable[str], round_index: int) -> set[str]:
        """The members of `nodes` that take part in `round_index`."""
        return {n for n in nodes if self.takes_part(n, round_index)}
