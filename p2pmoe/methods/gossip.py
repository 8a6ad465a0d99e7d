"""Gossip averaging with topology neighbours (D-PSGD), sans-IO.

One helper serves the serverless baseline (the whole model) and FedMoE-DA's `gossip`
embedding mode (only φ): send our tensors to every neighbour with our degree, and when the
neighbours' tensors are in, mix them with Metropolis–Hastings weights
w_kj = 1 / (1 + max(deg_k, deg_j)), w_kk = 1 − Σ_j w_kj (doubly stochastic on any graph).

FedMoE-DA's cheaper φ options narrow who is mixed with in a round (`partners`: a seeded random
matching, or nobody on the rounds between exchanges) and correct a lossy wire with error
feedback; the degrees in the weights are then those of the round's graph.

Under partial participation a node exchanges only with the partners sampled in the same
round; the weight of the others stays with the node itself, so the mixing stays symmetric
and doubly stochastic over the sampled nodes (degrees remain those of the round's graph).
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Collection, Sequence, Set
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import torch

from p2pmoe.methods.base import Learner, LearnerMethod, Method
from p2pmoe.methods.registry import BuildContext, MethodSpec, register_method, topology_peers
from p2pmoe.methods.robust import self_centred_mix
from p2pmoe.models.params import float_state, load_float_state
from p2pmoe.options import Options, option
from p2pmoe.participation import Participation
from p2pmoe.topology import metropolis_hastings_weights
from p2pmoe.wire.codec import ProtocolError, check_like, require
from p2pmoe.wire.compression import ErrorFeedback
from p2pmoe.wire.messages import Message, MessageKind, Send

Partners = Callable[[int], Collection[str]]
"""The neighbours a node mixes with in a round (a subset of its topology neighbours)."""


class RandomMatchings:
    """A seeded random maximal matching of the topology for every round, the same at every node.

    Project decision (FedMoE-DA's `embedding_peers = "matching"`): each node mixes with at most
    one neighbour a round, its partner in the matching. A matching rather than "each node picks
    a random neighbour" because the exchange must be symmetric: both ends of a pair send and
    both average, with weight 1/2 each (Metropolis–Hastings with degree 1), so the round's
    mixing matrix is symmetric and doubly stochastic and the swarm's mean of φ is kept; with
    independent picks, j could hear from i without i being j's pick, the mixing would not be
    symmetric, and a popular node would receive many copies. This is randomised pairwise gossip
    (Boyd et al., 2006). The matching depends only on (topology, seed, round): the edges in a
    canonical order shuffled by `random.Random` seeded with a string of seed and round (stable
    across processes and platforms), then taken greedily, so the simulator and every daemon of
    a swarm compute the same pairs. Nodes left unmatched skip the round's exchange. Under
    partial participation only edges whose two ends are both sampled that round are matched
    (project decision: a partner that sits the round out would leave its node waiting for the
    deadline, and matching over the sampled subgraph pairs up more of the sampled nodes).
    """

    def __init__(self, graph: nx.Graph, seed: int, participation: Participation | None = None) -> None:
        self.edges = sorted(tuple(sorted((str(a), str(b)))) for a, b in graph.edges() if a != b)
        self.seed = seed
        self.participation = participation or Participation()
        self._cached: tuple[int, dict[str, str]] | None = None  # the latest round's: every node asks in turn

    def pairs(self, round_index: int) -> dict[str, str]:
        """Partner of every matched node in `round_index` (both directions listed)."""
        if self._cached is None or self._cached[0] != round_index:
            sampled = self.participation
            edges = [e for e in self.edges if sampled.takes_part(e[0], round_index) and sampled.takes_part(e[1], round_index)]
            random.Random(f"p2pmoe-matching:{self.seed}:{round_index}").shuffle(edges)
            partner: dict[str, str] = {}
            for a, b in edges:
                if a not in partner and b not in partner:
                    partner[a], partner[b] = b, a
            self._cached = (round_index, partner)
        return self._cached[1]

    def partners(self, node: str) -> Partners:
        """`node`'s schedule: its partner of each round, or nobody."""
        return lambda round_index: [p] if (p := self.pairs(round_index).get(node)) is not None else []


_MATCHINGS: weakref.WeakKeyDictionary[nx.Graph, dict[tuple[int, float], RandomMatchings]] = weakref.WeakKeyDictionary()


def random_matchings(graph: nx.Graph, seed: int, participation: Participation | None = None) -> RandomMatchings:
    """One `RandomMatchings` per graph, seed and participation fraction in a process, so a
    simulator's nodes share each round's matching instead of computing it once per node (treat
    the graph as frozen)."""
    participation = participation or Participation()
    by_key = _MATCHINGS.setdefault(graph, {})
    key = (seed, participation.fraction)
    if key not in by_key:
        by_key[key] = RandomMatchings(graph, seed, participation)
    return by_key[key]


def every(interval: int, partners: Partners) -> Partners:
    """`partners` on rounds divisible by `interval`, nobody on the others."""
    return lambda round_index: partners(round_index) if round_index % interval == 0 else []


class GossipExchange:
    """One round of neighbour averaging over the tensors `read()` returns.

    `partners(r)` says which neighbours round r mixes with (default: all of them, every round);
    the degree each end sends and weighs with is its number of partners that round, so both
    ends of a link agree on its weight whatever the schedule. With `feedback`, what is sent is
    corrected by the residual of the lossy wire (`ErrorFeedback`); our own term of the mix is
    our exact tensors.
    """

    def __init__(
        self,
        neighbours: Sequence[str],
        kind: MessageKind,
        read: Callable[[], dict[str, torch.Tensor]],
        write: Callable[[dict[str, torch.Tensor]], None],
        partners: Partners | None = None,
        feedback: ErrorFeedback | None = None,
        clip: float | None = None,
        publish: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """`publish` turns the own tensors into what is sent (a differentially private
        release); mixing still uses the own ones. Not with `feedback`: one of the two."""
        if publish is not None and feedback is not None:
            raise ValueError("a gossip exchange takes error feedback or a private release, not both")
        self.publish = publish
        self.clip = clip  # ClippedGossip's tau (issue 30); None: plain Metropolis-Hastings mixing
        self.configured = set(neighbours)
        self.neighbours = set(neighbours)
        self.kind = kind
        self.feedback = feedback
        self._partners = partners
        self._read = read
        self._write = write
        self._own: dict[str, torch.Tensor] = {}
        self._received: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
        self._degree = 0
        self._expected: set[str] = set()
        self._waiting: set[str] = set()
        self.done = True
        self.round = -1  # the round of the latest start()

    def start(self, round_index: int, sampled: Set[str] | None = None) -> list[Send]:
        """Snapshot our tensors and send them to this round's live partners (those of
        `sampled`, when the round has partial participation). Without partners (a lone node,
        FedMoE-DA's frozen φ, a round between exchanges) there is nothing to snapshot: a copy
        of φ per node would be most of an accounting run's memory on thousands of nodes."""
        chosen = set(self._partners(round_index)) if self._partners is not None else self.configured
        unknown = chosen - self.configured
        if unknown:
            raise ValueError(f"gossip partners {sorted(unknown)} are not topology neighbours")
        self.round = round_index
        self._degree = len(chosen)  # the configured count, not the live or sampled one: both ends of a link agree on its weight
        self._received = {}
        self._expected = chosen & self.neighbours if sampled is None else chosen & self.neighbours & sampled
        self._waiting = set(self._expected)
        self.done = not self._waiting
        if self.done:
            self._own = {}
            return []
        self._own = self._read()
        sent = self.feedback.apply(self._own) if self.feedback is not None else self.publish(self._own) if self.publish is not None else self._own
        message = Message(self.kind, round_index, sent, {"degree": self._degree})
        return [Send(peer, message) for peer in sorted(self._expected)]

    def take(self, src: str, message: Message) -> None:
        """A partner's tensors; mix once all have arrived."""
        require(src in self._expected, f"{src} is not a gossip partner this round")
        degree = message.meta.get("degree")
        if not (isinstance(degree, int) and not isinstance(degree, bool) and degree >= 1):  # a raise, not require(): it narrows degree
            raise ProtocolError("meta.degree must be a positive integer")
        check_like(message.tensors, self._own)
        self._received[src] = (message.tensors, degree)
        self._waiting.discard(src)
        self._finish_if_ready()

    def lose(self, peer: str) -> None:
        """`peer` is gone: stop waiting for it, this round and the next."""
        self.neighbours.discard(peer)
        self._expected.discard(peer)
        self._waiting.discard(peer)
        self._finish_if_ready()

    def skip(self, peer: str, round_index: int) -> None:
        """`peer`'s tensors for `round_index` were refused: if that is this exchange's round,
        mix without them (it stays a neighbour; a valid message later this round still counts)."""
        if round_index == self.round and peer in self._waiting:
            self._waiting.discard(peer)
            self._finish_if_ready()

    def rejoin(self, peer: str) -> None:
        """A configured neighbour is back: exchange with it again from the next round."""
        if peer in self.configured:
            self.neighbours.add(peer)

    def give_up(self) -> None:
        """Mix with whatever arrived."""
        self._waiting.clear()
        self._finish_if_ready()

    def _finish_if_ready(self) -> None:
        if self.done or self._waiting:
            return
        # Sorted by sender, not arrival: the same sums in the same order whatever the network did,
        # so a swarm computes exactly what the simulator does.
        received = sorted(self._received.items())
        own_weight, weights = metropolis_hastings_weights(self._degree, {src: degree for src, (_, degree) in received})
        if self.clip is not None:
            self._write(self_centred_mix(self._own, [(tensors, weights[src]) for src, (tensors, _) in received], self.clip))
            self.done = True
            return
        mixed = {}
        for name, own in self._own.items():
            total = own_weight * own
            for src, (tensors, _) in received:
                total = total + weights[src] * tensors[name]
            mixed[name] = total
        self._write(mixed)
        self.done = True


class GossipNode(LearnerMethod):
    """D-PSGD: train locally, then average the whole model with topology neighbours."""

    def __init__(
        self,
        node_id: str,
        learner: Learner,
        neighbours: Sequence[str],
        local_epochs: int = 1,
        participation: Participation | None = None,
        clip: float | None = None,
    ) -> None:
        super().__init__(node_id, learner, local_epochs, participation)
        model = learner.model
        read, write = lambda: float_state(model), lambda state: load_float_state(model, state)
        self.exchange = GossipExchange(neighbours, MessageKind.GOSSIP, read, write, clip=clip)

    def start_round(self, round_index: int) -> list[Send]:
        return self.exchange.start(round_index, self.participation.among(self.exchange.neighbours, round_index))

    def on_message(self, src: str, message: Message) -> list[Send]:
        require(message.kind == MessageKind.GOSSIP, f"gossip nodes take gossip messages, not {message.kind.value}")
        self.exchange.take(src, message)
        return []

    def on_peer_lost(self, peer: str) -> list[Send]:
        self.exchange.lose(peer)
        return []

    def on_peer_joined(self, peer: str) -> list[Send]:
        self.exchange.rejoin(peer)
        return []

    def on_refused(self, src: str, message: Message) -> list[Send]:
        if message.kind == MessageKind.GOSSIP:
            self.exchange.skip(src, message.round)
        return []

    def on_deadline(self, round_index: int) -> list[Send]:
        self.exchange.give_up()
        return []

    def round_complete(self) -> bool:
        return self.exchange.done


@dataclass(frozen=True)
class GossipOptions(Options):
    """D-PSGD's mixing: plain, or with each neighbour's pull clipped (a defence, issue 30)."""

    section: ClassVar[str] = "method"

    clip: float | None = option(
        None, "ClippedGossip's tau: each neighbour's difference from this node clipped to this norm before mixing (none: plain mixing)", above=0
    )


def _client(ctx: BuildContext[GossipOptions], node: str) -> Method:
    neighbours = sorted(ctx.graph.neighbors(node))
    return GossipNode(node, ctx.learner(node), neighbours, ctx.cfg.run.local_epochs, ctx.participation, clip=ctx.options.clip)


register_method(
    MethodSpec(
        name="gossip",
        summary="D-PSGD: the whole model averaged with topology neighbours (Metropolis-Hastings weights), no server",
        needs=frozenset({"whole_model"}),
        options=GossipOptions,
        flag_prefix="gossip",
        build_client=_client,
        peers=topology_peers,
    )
)
