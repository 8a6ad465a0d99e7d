"""FedMoE-DA: domain-aware, expert-by-expert aggregation (arXiv 2411.02115), sans-IO.

Peer-to-peer (the project's main mode): every I rounds a node publishes its gating matrix to
the peers it can see, computes its own row of the correlation and aggregation matrices, and
fetches only the selected experts, each (peer, slot) once, straight from their owner. The
embedding model φ is gossiped with neighbours (all of them or a random matching, every round
or every I-th, optionally 8-bit with error feedback), frozen, pretrained and frozen, or
FedAvg'd by a server.
Server-assisted (the paper's original): nodes send their gates to a coordinator that computes
every node's aggregation plan; experts still move peer to peer.

Partial participation (project decision, the paper has every node in every round): a node not
sampled for a round trains, publishes and fetches nothing and serves no experts; the sampled
nodes plan over the gates of sampled peers only, so they fetch only from peers sampled that
round (a plan kept from an earlier round is renormalised over them). With φ on a server, a node
awaits the global φ in the rounds before those it is sampled for, as FedAvg clients do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import networkx as nx
import torch

from p2pmoe.methods.base import Learner, LearnerMethod, Method, SendFailure
from p2pmoe.methods.expert_selection import correlation, fetch_set, selection_weights
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.methods.gossip import GossipExchange, Partners, every, random_matchings
from p2pmoe.methods.privacy import NoisyRelease, node_epsilon
from p2pmoe.methods.registry import BuildContext, MethodSpec, NoOptions, all_peers, register_method, topology_peers
from p2pmoe.methods.robust import cap_source_share
from p2pmoe.models.moe import ExpertSlots, MixtureOfExperts, slot_candidate_losses
from p2pmoe.models.params import float_state, load_float_state
from p2pmoe.models.pretrained import load_pretrained
from p2pmoe.naming import SERVER_ID
from p2pmoe.options import Options, option
from p2pmoe.participation import Participation
from p2pmoe.seeds import node_stream
from p2pmoe.settings import ExperimentConfig
from p2pmoe.wire.codec import ProtocolError, check_like, require
from p2pmoe.wire.compression import ErrorFeedback, parse_compression, scheme_for
from p2pmoe.wire.messages import Message, MessageKind, Send

EMBEDDING_MODES = ("gossip", "frozen", "server", "pretrained")
EMBEDDING_PEERS = ("all", "matching")
PLANNERS = ("p2p", "server")
SLOT_RULES = ("mean", "median")
EMBEDDING_PREFIX = "embedder."
RESIDUAL_PREFIX = "phi_residual."  # checkpoint keys of the error-feedback residual
PHI_PREFIX, GATE_NAME = "phi.", "gate"  # φ's and the gate's names in a private release (beside expert.<slot>.)
PUBLIC_PREFIX, DP_RNG = "dp_public.", "dp_rng"  # checkpoint keys of a private release's public state and noise stream


@dataclass(frozen=True)
class FedMoEDAOptions(Options):
    """FedMoE-DA: who plans, eq. 9-11's knobs and how phi is shared.

    Eq. 9-11: third-party defaults are P = 5, tau = 1, I = 5; project decision: P = 2 (P must
    stay below the number of experts a node sees in small swarms) and I = 1. The paper's own
    variant has a coordinator plan every node's aggregation and FedAvg phi (`fedmoe-da-server`
    pins `planner = server`, `embedding = server`); peer-to-peer planning is this project's.

    Default φ sharing, chosen from bench/results/fedmoe_da.md (10 nodes, Fashion-MNIST,
    Dirichlet 0.3, 20 rounds): gossip with one partner of a seeded random matching, every
    second round. Gossip with all neighbours every round (the earlier default) moved 7.9x
    FedAvg's bytes; one partner a round kept personalised accuracy (0.88 against 0.86) at a
    sixth of the bytes, and the exchange every second round halves φ's share again. With
    `--compression embedding=int8,expert_response=int8` and error feedback the same setting
    moved 0.21x FedAvg's bytes.
    """

    section: ClassVar[str] = "method"

    planner: str = option(
        "p2p", "who plans the aggregation: each node from its neighbours' gates (p2p) or a coordinator from everyone's (server)", choices=PLANNERS
    )
    p: int = option(2, "P: peer experts each own expert aggregates (0 = none)", minimum=0)
    tau: float = option(1.0, "softmax temperature of the aggregation weights", above=0)
    interval: int = option(1, "I: rounds between recomputing the aggregation plan", minimum=1)
    embedding: str = option(
        "gossip",
        "how phi is shared: gossip with neighbours, frozen (never sent), server (FedAvg), or pretrained (loaded from phi_path, frozen, never sent)",
        choices=EMBEDDING_MODES,
    )
    embedding_peers: str = option(
        "matching", "gossip: mix phi with all topology neighbours, or with one partner of a seeded random matching each round", choices=EMBEDDING_PEERS
    )
    embedding_every: int = option(2, "gossip: exchange phi on rounds divisible by this (1 = every round)", minimum=1)
    embedding_error_feedback: bool = option(
        False, "gossip: carry what lossy wire compression of phi lost into the next exchange (needs --compression embedding=int8 or fp16)"
    )
    phi_path: str | None = option(None, "pretrained: safetensors file of phi (p2pmoe pretrain-phi writes one)")
    finetune_epochs: int = option(
        0, "score each evaluation after this many local epochs on a copy of the aggregated model, as FedAvg-FT does (0: off; beyond the paper)", minimum=0
    )
    warmup_rounds: int = option(
        0,
        "for this many first rounds exchange no experts and gossip phi every round, so that expert selection starts from gates "
        "trained against a phi already mixed (0: off; beyond the paper, see docs/methods.md)",
        minimum=0,
    )
    validation_examples: int = option(
        0,
        "hold out this many of a node's training examples, at most a fifth of them (never trained on, never sent), and keep a selected "
        "peer expert in an own slot only if it scores no worse there on them than the own expert (0: off; beyond the paper, see docs/methods.md)",
        minimum=0,
    )

    source_cap: float = option(
        1.0,
        "at most this share of an own slot's aggregation weight from any one peer, the rest to the own expert "
        "(1: no cap; a defence against gate mimicry, beyond the paper, see docs/methods.md)",
        above=0,
        maximum=1,
    )
    slot_rule: str = option(
        "mean",
        "how a slot combines the experts it selected: mean (Eq. 11) or median (coordinate-wise; a defence, beyond the paper)",
        choices=SLOT_RULES,
    )
    phi_clip: float | None = option(
        None,
        "ClippedGossip on phi: each gossip partner's phi difference from this node's clipped to this norm before mixing "
        "(none: plain mixing; a defence against peers that lie, beyond the paper, see docs/methods.md)",
        above=0,
    )
    dp_clip: float | None = option(
        None,
        "node-level DP of what a node shares: clip each round's change of its experts and gossiped phi, together, to this norm S "
        "(needs dp_noise > 0; beyond the paper, see docs/methods.md)",
        above=0,
    )
    dp_noise: float = option(0.0, "node-level DP: the node adds N(0, (sigma S)^2) to each release; sigma is this noise multiplier", minimum=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.dp_clip is None) != (self.dp_noise == 0):
            raise ValueError("[method] dp_clip and dp_noise go together: set both or neither")
        if self.dp_clip is not None and (self.embedding in ("server", "pretrained") or self.embedding_error_feedback):
            raise ValueError("[method] DP noises gossiped or frozen phi only, without error feedback: use embedding = 'gossip' or 'frozen'")
        if self.phi_clip is not None and self.embedding != "gossip":
            raise ValueError("[method] phi_clip clips gossiped phi: use it with embedding = 'gossip'")
        if (self.embedding == "pretrained") != (self.phi_path is not None):
            raise ValueError("[method] embedding = 'pretrained' and phi_path go together: set both or neither")
        # embedding_peers and embedding_every have non-trivial defaults, so only error feedback
        # (off by default) can be a setting that another mode would silently ignore.
        if self.planner == "server" and self.embedding != "server":
            raise ValueError("[method] planner = 'server' is the paper's server-assisted variant: it FedAvgs phi, so embedding must be 'server'")
        if self.embedding != "gossip" and self.embedding_error_feedback:
            raise ValueError("[method] embedding_error_feedback applies to embedding = 'gossip' only")


def expert_tensors(states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Wire names for expert states: expert.<slot>.<param>."""
    return {f"expert.{slot}.{name}": t for slot, state in states.items() for name, t in state.items()}


class Plan:
    """An aggregation plan: candidate (node, slot) columns and the [E, M] weights over them."""

    def __init__(self, sources: list[tuple[str, int]], weights: torch.Tensor) -> None:
        self.sources = sources
        self.weights = weights

    def to_message(self, round_index: int) -> Message:
        return Message(MessageKind.AGGREGATION_PLAN, round_index, {"weights": self.weights.float()}, {"sources": [list(s) for s in self.sources]})

    @classmethod
    def from_message(cls, message: Message, num_experts: int) -> Plan:
        sources = message.meta.get("sources")
        weights = message.tensors.get("weights")
        # Explicit raises rather than require(): they narrow the types of sources and weights.
        if not (isinstance(sources, list) and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], int) for s in sources)):
            raise ProtocolError("meta.sources must be a list of [node, slot]")
        if weights is None or tuple(weights.shape) != (num_experts, len(sources)) or weights.dtype != torch.float32:
            raise ProtocolError("plan weights must be float32 [experts, sources]")
        require(
            bool((weights >= 0).all()) and bool(torch.allclose(weights.sum(dim=1), torch.ones(num_experts), atol=1e-4)),
            "plan weights must be non-negative rows summing to 1",
        )
        return cls([(n, s) for n, s in sources], weights.double())


def make_plan(node: str, own_gate: torch.Tensor, gates: dict[str, torch.Tensor], p: int, tau: float) -> Plan:
    """Node's row of Eq. 9–10: candidates are its own experts first, then each peer's by name."""
    sources = [(node, e) for e in range(own_gate.shape[0])]
    sources += [(peer, e) for peer in sorted(gates) for e in range(gates[peer].shape[0])]
    candidates = torch.cat([own_gate, *(gates[peer] for peer in sorted(gates))])
    return Plan(sources, selection_weights(correlation(own_gate, candidates), p, tau))


class FedMoEDANode(LearnerMethod):
    """One node of FedMoE-DA over a model with `embedder` and `moe` (a MoEClassifier)."""

    def __init__(
        self,
        node_id: str,
        learner: Learner,
        visible: Sequence[str],
        neighbours: Sequence[str],
        p: int = 2,
        tau: float = 1.0,
        interval: int = 1,
        embedding: str = "gossip",
        server_id: str | None = None,
        planner: str = "p2p",
        local_epochs: int = 1,
        embedding_partners: Partners | None = None,
        embedding_feedback: ErrorFeedback | None = None,
        phi: Mapping[str, torch.Tensor] | None = None,
        participation: Participation | None = None,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
        finetune_epochs: int = 0,
        warmup_rounds: int = 0,
        source_cap: float = 1.0,
        slot_rule: str = "mean",
        dp: tuple[float, float, int] | None = None,
        phi_clip: float | None = None,
    ) -> None:
        """`embedding_partners` narrows gossip to some neighbours a round (default: all, every
        round); `embedding_feedback` corrects a lossy wire; `phi` is the pretrained φ that the
        `pretrained` mode loads and freezes; `validation` (the node's own held-out images and
        labels) turns on validated aggregation (`validated_weights`); in the first
        `warmup_rounds` rounds the node aggregates no peer's experts (P = 0). Against peers
        that lie (issue 30): `source_cap` bounds any one peer's share of an own slot's weights,
        `slot_rule` "median" replaces a slot's weighted mean by the coordinate-wise median of
        the experts it selected, and `phi_clip` clips each partner's φ difference before mixing
        (ClippedGossip). `dp` = (clip S, noise multiplier σ, seed) noises every expert and φ the
        node shares (`NoisyRelease`); its own model stays private."""
        super().__init__(node_id, learner, local_epochs, participation, finetune_epochs)
        if embedding not in EMBEDDING_MODES:
            raise ValueError(f"embedding must be one of {EMBEDDING_MODES}, got {embedding!r}")
        if (embedding == "pretrained") != (phi is not None):
            raise ValueError("embedding 'pretrained' needs phi, and only it takes one")
        if embedding != "gossip" and (embedding_partners is not None or embedding_feedback is not None):
            raise ValueError("embedding_partners and embedding_feedback are for embedding 'gossip' only")
        if planner not in ("p2p", "server") or ((planner == "server" or embedding == "server") and server_id is None):
            raise ValueError("planner 'server' and embedding 'server' need a server_id")
        if interval < 1 or p < 0 or tau <= 0:
            raise ValueError("need interval >= 1, P >= 0 and tau > 0")
        self.visible = set(visible)
        self.p, self.tau, self.interval = p, tau, interval
        self.warmup = warmup_rounds
        self.embedding, self.server_id, self.planner = embedding, server_id, planner
        moe = learner.model.moe
        if not isinstance(moe, ExpertSlots):
            raise TypeError(f"FedMoE-DA needs a model whose `moe` is an ExpertSlots layer, got {type(moe).__name__}")
        self.moe: ExpertSlots = moe
        self.num_experts = self.moe.num_experts
        model = learner.model
        if phi is not None:
            load_float_state(model, dict(phi), EMBEDDING_PREFIX)
            for name, param in model.named_parameters():
                if name.startswith(EMBEDDING_PREFIX):
                    param.requires_grad_(False)  # no gradient, so no optimiser step moves it
        self.gossip = GossipExchange(
            neighbours if embedding == "gossip" else [],
            MessageKind.EMBEDDING,
            lambda: float_state(model, EMBEDDING_PREFIX),
            lambda state: load_float_state(model, state, EMBEDDING_PREFIX),
            partners=embedding_partners,
            feedback=embedding_feedback,
            publish=(lambda own: self._released_phi) if dp is not None else None,
            clip=phi_clip,
        )
        if validation is not None and not isinstance(moe, MixtureOfExperts):
            raise TypeError(f"validated aggregation needs a MixtureOfExperts layer, got {type(moe).__name__}")
        self.validation = validation
        self._dropped_by_validation = 0
        if not 0 < source_cap <= 1 or slot_rule not in SLOT_RULES:
            raise ValueError(f"need 0 < source_cap <= 1 and slot_rule one of {SLOT_RULES}")
        self.source_cap, self.slot_rule = source_cap, slot_rule
        self.plan: Plan | None = None
        self._round = -1
        self.privacy = None if dp is None else NoisyRelease(self._shared(), dp[0], dp[1], torch.Generator().manual_seed(dp[2]))
        self._snapshot: dict[int, dict[str, torch.Tensor]] = {}  # the own experts as the round starts
        self._served: dict[int, dict[str, torch.Tensor]] = {}  # what peers get of them: the snapshot, or its private release
        self._released_phi: dict[str, torch.Tensor] = {}
        self._released_gate: torch.Tensor | None = None
        self._previous: tuple[int, dict[int, dict[str, torch.Tensor]]] | None = None  # (round, served) still served
        self._gates: dict[str, torch.Tensor] = {}
        self._gates_awaited: set[str] = set()
        self._plan_awaited = False
        self._fetched: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._fetch_awaited: dict[str, tuple[int, list[int]]] = {}  # peer -> (request id, slots)
        self._embedding_awaited = False
        self._aggregated = True
        self._req = 0

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learner's state and, with error feedback, φ's residual: it is what the wire still
        owes the peers, so a restarted node that lost it would drop that error for good."""
        residual = self.gossip.feedback.residual if self.gossip.feedback is not None else {}
        state = {**self.learner.state_dict(), **{RESIDUAL_PREFIX + k: v for k, v in residual.items()}}
        if self.privacy is not None:  # what peers have seen and the noise to come: a resumed run releases the same
            state |= {PUBLIC_PREFIX + k: v for k, v in self.privacy.public.items()} | {DP_RNG: self.privacy.generator.get_state()}
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.learner.load_state_dict({k: v for k, v in state.items() if not k.startswith((RESIDUAL_PREFIX, PUBLIC_PREFIX)) and k != DP_RNG})
        if self.privacy is not None:
            public = {k[len(PUBLIC_PREFIX) :]: v for k, v in state.items() if k.startswith(PUBLIC_PREFIX)}
            check_like(public, self.privacy.public)
            self.privacy.public = {k: public[k] for k in self.privacy.public}  # the noise is drawn in this order: not the file's
            self.privacy.generator.set_state(state[DP_RNG])
        residual = {k[len(RESIDUAL_PREFIX) :]: v for k, v in state.items() if k.startswith(RESIDUAL_PREFIX)}
        if self.gossip.feedback is not None:
            if residual:
                check_like(residual, float_state(self.learner.model, EMBEDDING_PREFIX))
            self.gossip.feedback.residual = residual

    # -- round start ---------------------------------------------------------------------

    def start_round(self, round_index: int) -> list[Send]:
        self._enter(round_index, sampled=True)
        self._aggregated = False
        # P = 0 aggregates nothing, so no peer needs this node's gate (FedRep-style runs send none)
        sampled_peers = self.participation.among(self.visible, round_index) if self.p_now() else set()
        sends = self.gossip.start(round_index, self.participation.among(self.gossip.neighbours, round_index))
        if self.embedding == "server":
            assert self.server_id is not None  # checked in __init__
            phi = float_state(self.learner.model, EMBEDDING_PREFIX)
            sends.append(Send(self.server_id, Message(MessageKind.MODEL_UPDATE, round_index, phi, {"num_examples": self.learner.num_train_examples})))
            self._embedding_awaited = self.takes_part(round_index + 1)
        if round_index % self.interval == 0 or self.plan is None or round_index == self.warmup:
            gate = Message(MessageKind.GATE_PUBLISH, round_index, {"gate": self._public_gate().float()})
            if self.planner == "server":
                assert self.server_id is not None  # checked in __init__
                self._plan_awaited = True
                sends.append(Send(self.server_id, gate))
            else:
                self._gates = {}
                self._gates_awaited = sampled_peers
                sends += [Send(peer, gate) for peer in sorted(sampled_peers)]
                sends += self._plan_if_ready()
        else:
            sends += self._request_experts()
        return sends

    def p_now(self) -> int:
        """P of the current round: 0 during the warm-up rounds."""
        return 0 if self._round < self.warmup else self.p

    def sit_out(self, round_index: int) -> list[Send]:
        self._enter(round_index, sampled=False)
        self._embedding_awaited = self.embedding == "server" and self.takes_part(round_index + 1)
        return []

    def _enter(self, round_index: int, sampled: bool) -> None:
        """Move to round r. The experts are snapshotted only in sampled rounds: the last sampled
        round's snapshot stays served to slow peers, and an unsampled node serves none."""
        if self._served:
            self._previous = (self._round, self._served)
        self._round = round_index
        self._snapshot = {slot: self.moe.expert_state(slot) for slot in range(self.num_experts)} if sampled else {}
        self._served = self._release(self._snapshot) if sampled and self.privacy is not None else self._snapshot
        self._fetched, self._fetch_awaited = {}, {}

    def _release(self, snapshot: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        """This round's private release of the experts and (gossiped) φ, together: one
        Gaussian mechanism a round (`NoisyRelease`); φ's part is what gossip sends."""
        assert self.privacy is not None
        released = self.privacy.release(self._shared(snapshot))
        self._released_phi = {k[len(PHI_PREFIX) :]: v for k, v in released.items() if k.startswith(PHI_PREFIX)}
        self._released_gate = released[GATE_NAME]
        return {slot: {k: released[f"expert.{slot}.{k}"] for k in state} for slot, state in snapshot.items()}

    def _shared(self, snapshot: dict[int, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """What the node shares, under one set of names: every expert (`expert.<slot>.`), its
        gate (`GATE_NAME`) and, when φ is gossiped, φ (`phi.`)."""
        experts = snapshot if snapshot is not None else {slot: self.moe.expert_state(slot) for slot in range(self.num_experts)}
        phi = float_state(self.learner.model, EMBEDDING_PREFIX) if self.embedding == "gossip" else {}
        gate = {GATE_NAME: self.moe.gating_matrix().detach().float().cpu()}
        return {**expert_tensors(experts), **gate, **{PHI_PREFIX + k: v for k, v in phi.items()}}

    def _public_gate(self) -> torch.Tensor:
        """The gate peers see and the node plans with: with DP its release (so the plan, and
        the requests that show it, are a function of public values only), else its own."""
        if self.privacy is not None and self._released_gate is not None:
            return self._released_gate
        return self.moe.gating_matrix().detach().cpu()

    # -- messages ------------------------------------------------------------------------

    def on_message(self, src: str, message: Message) -> list[Send]:
        if message.kind == MessageKind.EXPERT_REQUEST and self._previous is not None and message.round == self._previous[0]:
            return self._on_expert_request(src, message, self._previous[1])
        require(message.round == self._round, f"{message.kind.value} for round {message.round}, node is at {self._round}")
        handlers = {
            MessageKind.GATE_PUBLISH: self._on_gate,
            MessageKind.AGGREGATION_PLAN: self._on_plan,
            MessageKind.EXPERT_REQUEST: self._on_expert_request,
            MessageKind.EXPERT_RESPONSE: self._on_expert_response,
            MessageKind.EMBEDDING: self._on_embedding,
            MessageKind.MODEL_GLOBAL: self._on_global_embedding,
        }
        require(message.kind in handlers, f"FedMoE-DA nodes do not take {message.kind.value}")
        return handlers[message.kind](src, message)

    def _on_gate(self, src: str, message: Message) -> list[Send]:
        require(src in self._gates_awaited, f"no gate expected from {src}")
        own = self.moe.gating_matrix()
        check_like(message.tensors, {"gate": own.detach().float().cpu()})
        self._gates[src] = message.tensors["gate"].double()
        self._gates_awaited.discard(src)
        return self._plan_if_ready()

    def _plan_if_ready(self) -> list[Send]:
        if self._gates_awaited or self.planner != "p2p":
            return []
        self.plan = make_plan(self.node_id, self._public_gate().double(), self._gates, self.p_now(), self.tau)
        return self._request_experts()

    def _on_plan(self, src: str, message: Message) -> list[Send]:
        require(src == self.server_id and self._plan_awaited, f"no aggregation plan expected from {src}")
        plan = Plan.from_message(message, self.num_experts)
        own = [(n, s) for n, s in plan.sources if n == self.node_id]
        own_first = own == [(self.node_id, e) for e in range(self.num_experts)] and plan.sources[: self.num_experts] == own
        require(own_first, "plan must list this node's own experts first")
        self.plan = plan
        self._plan_awaited = False
        return self._request_experts()

    def _request_experts(self) -> list[Send]:
        assert self.plan is not None
        sampled = self.participation.among(self.visible, self._round)
        available = torch.tensor([n == self.node_id or n in sampled for n, _ in self.plan.sources])
        if not bool(available.all()):  # a peer of the plan is gone or not sampled: renormalise over the rest
            masked = self.plan.weights.clone()
            masked[:, ~available] = 0
            self.plan = Plan(self.plan.sources, masked / masked.sum(dim=1, keepdim=True))
        self._fetch_awaited = {}
        sends = []
        for peer, slots in fetch_set(self.plan.weights, self.plan.sources, self.node_id).items():
            self._req += 1
            self._fetch_awaited[peer] = (self._req, slots)
            sends.append(Send(peer, Message(MessageKind.EXPERT_REQUEST, self._round, meta={"req": self._req, "slots": slots})))
        self._aggregate_if_ready()
        return sends

    def _on_expert_request(self, src: str, message: Message, snapshot: dict[int, dict[str, torch.Tensor]] | None = None) -> list[Send]:
        """Serve the experts as they were when the request's round started. Project decision:
        a node that has moved on to round r+1 still serves round r's snapshot, because a
        slower peer may fetch from it after this node finished its own round (the paper runs
        rounds in lockstep; a swarm does not)."""
        slots = message.meta.get("slots")
        # An explicit raise rather than require(): it narrows the type of slots.
        if not (
            isinstance(slots, list)
            and slots
            and len(set(slots)) == len(slots)
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < self.num_experts for s in slots)
        ):
            raise ProtocolError(f"meta.slots must be distinct expert slots in 0..{self.num_experts - 1}")
        meta = {"req": message.meta["req"]} if "req" in message.meta else {}
        served = self._served if snapshot is None else snapshot
        require(bool(served), f"{self.node_id} was not sampled for round {message.round}: it serves no experts")
        reply = Message(MessageKind.EXPERT_RESPONSE, message.round, expert_tensors({s: served[s] for s in slots}), meta)
        return [Send(src, reply)]

    def _on_expert_response(self, src: str, message: Message) -> list[Send]:
        """Take the reply to our outstanding request: the same request id, exactly the slots
        asked for. A reply with another id (or none) is refused and the genuine one is still
        awaited; a reply to our request that is malformed ends the wait for that peer (the
        round goes on without its experts instead of idling to the deadline)."""
        awaited = self._fetch_awaited.get(src)
        if awaited is None:
            raise ProtocolError(f"no experts expected from {src}")
        req, slots = awaited
        got = message.meta.get("req")
        require(type(got) is int and got == req, f"expert_response answers request {got!r}, the request outstanding with {src} is {req}")
        try:
            check_like(message.tensors, expert_tensors({s: self._snapshot[s] for s in slots}))
        except ProtocolError:
            self._give_up_on(src)
            raise
        for slot in slots:
            prefix = f"expert.{slot}."
            self._fetched[(src, slot)] = {k[len(prefix) :]: v for k, v in message.tensors.items() if k.startswith(prefix)}
        del self._fetch_awaited[src]
        self._aggregate_if_ready()
        return []

    def _on_embedding(self, src: str, message: Message) -> list[Send]:
        self.gossip.take(src, message)
        return []

    def _on_global_embedding(self, src: str, message: Message) -> list[Send]:
        require(src == self.server_id and self._embedding_awaited, f"no global embedding expected from {src}")
        load_float_state(self.learner.model, message.tensors, EMBEDDING_PREFIX)
        self._embedding_awaited = False
        return []

    # -- aggregation ---------------------------------------------------------------------

    def _aggregate_if_ready(self, force: bool = False) -> None:
        # Not before this round's plan: the plan kept from an earlier round would mix now and
        # this round's would find the round already aggregated (a peer lost or refused early).
        if self._aggregated or self.plan is None or ((self._fetch_awaited or self._gates_awaited or self._plan_awaited) and not force):
            return
        weights = self.plan.weights.clone()
        present = torch.tensor([n == self.node_id or (n, s) in self._fetched for n, s in self.plan.sources])
        weights[:, ~present] = 0
        weights = weights / weights.sum(dim=1, keepdim=True)
        if self.validation is not None:
            weights = self.validated_weights(weights)
        if self.source_cap < 1:
            weights = cap_source_share(weights, self.plan.sources, self.node_id, self.source_cap)
        used = torch.nonzero(weights.sum(dim=0)).flatten().tolist()  # columns some own slot takes
        states = [self._snapshot[s] if n == self.node_id else self._fetched[(n, s)] for n, s in (self.plan.sources[c] for c in used)]
        mix = weights[:, used]  # [E, used]: Eq. 11 for every slot at once, in float64
        new: dict[int, dict[str, torch.Tensor]] = {slot: {} for slot in range(self.num_experts)}
        for name, own in self._snapshot[0].items():
            stacked = torch.stack([state[name].double().reshape(-1) for state in states])
            mixed = (mix @ stacked).float()
            for slot in range(self.num_experts):
                if self.slot_rule == "median":  # the selected experts' coordinate-wise median, weights ignored
                    chosen = stacked[mix[slot] > 0]
                    mixed[slot] = torch.quantile(chosen, 0.5, dim=0).float() if len(chosen) > 1 else chosen[0].float()
                new[slot][name] = mixed[slot].reshape(own.shape)
        for slot, state in new.items():
            self.moe.load_expert_state(slot, state)
        self._fetched = {}  # mixed in: no need to hold peers' experts until the next round
        self._aggregated = True

    def validated_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Project decision beyond the paper (issue 25): the gates choose the candidates (Eq. 9),
        the node's own held-out data vets them. For each own slot, a peer column keeps its plan
        weight only if the mixture with that peer's expert in the slot has a validation loss no
        higher than with the slot's own expert; the row is renormalised over what stays (the
        own expert always stays). A peer expert that would make this node worse on its own
        data is not blended in, whatever its gate correlation."""
        moe = self.moe
        assert self.validation is not None and self.plan is not None and isinstance(moe, MixtureOfExperts)  # checked in __init__
        model = self.learner.model
        was_training = model.training
        model.eval()
        x, y = self.validation
        with torch.no_grad():
            features = model.get_submodule("embedder")(x)
        kept = weights.clone()
        for slot in range(self.num_experts):
            columns = [c for c in torch.nonzero(weights[slot]).flatten().tolist() if self.plan.sources[c][0] != self.node_id]
            if not columns:
                continue
            states = [self._snapshot[slot]] + [self._fetched[self.plan.sources[c]] for c in columns]
            own, *peers = slot_candidate_losses(moe, features, y, slot, states)
            for column, loss in zip(columns, peers, strict=True):
                if loss > own:
                    kept[slot, column] = 0
                    self._dropped_by_validation += 1
        model.train(was_training)
        return kept / kept.sum(dim=1, keepdim=True)

    def round_complete(self) -> bool:
        waiting_gates = bool(self._gates_awaited) or self._plan_awaited
        return not waiting_gates and self._aggregated and self.gossip.done and not self._embedding_awaited

    def on_peer_lost(self, peer: str) -> list[Send]:
        self.visible.discard(peer)
        self.gossip.lose(peer)
        sends: list[Send] = []
        if peer in self._gates_awaited:
            self._gates_awaited.discard(peer)
            sends = self._plan_if_ready()
        self._fetch_awaited.pop(peer, None)
        self._aggregate_if_ready()
        return sends

    def on_peer_joined(self, peer: str) -> list[Send]:
        self.visible.add(peer)
        self.gossip.rejoin(peer)
        return []

    def on_refused(self, src: str, message: Message) -> list[Send]:
        """A refused gate or φ of this round ends the wait for it (a refused expert reply
        already did, in `_on_expert_response`): the plan and the mix go on without that peer."""
        if message.kind == MessageKind.EMBEDDING:
            self.gossip.skip(src, message.round)
        elif message.kind == MessageKind.GATE_PUBLISH and message.round == self._round and src in self._gates_awaited:
            self._gates_awaited.discard(src)
            return self._plan_if_ready()
        return []

    def diagnostics(self) -> dict[str, Any]:
        """This round's plan (candidate (node, slot) sources and the [E, M] weights, whose zero
        columns were not fetched) and the node's own gate, for expert-selection reports."""
        if self.plan is None:
            return {}
        found: dict[str, Any] = {
            "plan_sources": [list(s) for s in self.plan.sources],
            "plan_weights": self.plan.weights.float().tolist(),
            "gate": self.moe.gating_matrix().detach().float().cpu().tolist(),
        }
        if self.validation is not None:
            found["dropped_by_validation"] = self._dropped_by_validation  # peer columns vetoed so far, over the run
        return found

    def on_send_failed(self, dst: str, failure: SendFailure) -> list[Send]:
        """An expert request that failed (refused, timed out, unreachable) re-plans the round
        around that peer's experts at once: the weights renormalise over what is in hand."""
        awaited = self._fetch_awaited.get(dst)
        if failure.kind == MessageKind.EXPERT_REQUEST and awaited is not None and failure.req in (None, awaited[0]):
            self._give_up_on(dst)
        return []

    def _give_up_on(self, peer: str) -> None:
        self._fetch_awaited.pop(peer, None)
        self._aggregate_if_ready()

    def on_deadline(self, round_index: int) -> list[Send]:
        """Go on with what arrived: plan over the gates in hand, experts and φ that came."""
        self.gossip.give_up()
        self._embedding_awaited = False
        if self._plan_awaited or (self._gates_awaited and self.planner == "p2p"):
            self._plan_awaited = False
            self._gates_awaited = set()
            if self.planner == "p2p":
                self.plan = make_plan(self.node_id, self._public_gate().double(), self._gates, self.p_now(), self.tau)
            elif self.plan is None:
                self.plan = Plan([(self.node_id, e) for e in range(self.num_experts)], torch.eye(self.num_experts, dtype=torch.float64))
        self._aggregate_if_ready(force=True)
        self._fetch_awaited = {}  # the round is mixed: a late reply is refused, not kept
        return []


class FedMoEDAServer(Method):
    """The coordinator of the server-assisted variant and of the `server` embedding mode:
    FedAvg of φ, and every node's aggregation plan from all gates (experts never pass here)."""

    def __init__(
        self,
        node_id: str,
        clients: Sequence[str],
        embedding_template: dict[str, torch.Tensor] | None,
        p: int,
        tau: float,
        plans: bool,
        interval: int = 1,
        participation: Participation | None = None,
        gate_template: torch.Tensor | None = None,
    ) -> None:
        """`gate_template` (a gating matrix of the run's model) is what every gate is checked
        against, with `plans`: never the first sender's shape, which a hostile client would
        set for the whole run (issue 26 N6)."""
        super().__init__(node_id, participation)
        if plans and gate_template is None:
            raise ValueError("a planning server needs gate_template, the run's gating matrix")
        self.clients = list(clients)
        self.p, self.tau, self.plans, self.interval = p, tau, plans, interval
        self._gate_template = {"gate": gate_template.detach().float().cpu()} if gate_template is not None else {}
        self.embedding = FedAvgServer(node_id, clients, embedding_template, participation) if embedding_template is not None else None
        self._live = set(self.clients)
        self._gates: dict[str, torch.Tensor] = {}
        self._round = -1
        self._refused: set[str] = set()  # nodes whose gate of this round was refused
        self._planned = True

    def start_round(self, round_index: int) -> list[Send]:
        self._round = round_index
        self._gates = {}
        self._refused = set()
        self._planned = not self._expects_gates()
        return self.embedding.start_round(round_index) if self.embedding else []

    def _expects_gates(self) -> bool:
        """Nodes publish gates on the rounds their plan is recomputed (every `interval`)."""
        return self.plans and self._round % self.interval == 0

    def on_message(self, src: str, message: Message) -> list[Send]:
        if message.kind == MessageKind.MODEL_UPDATE and self.embedding is not None:
            return self.embedding.on_message(src, message)
        require(message.kind == MessageKind.GATE_PUBLISH and self._expects_gates(), f"server does not take {message.kind.value} now")
        expected = src in self._live and self.participation.takes_part(src, self._round)
        require(expected and message.round == self._round and not self._planned, f"unexpected gate from {src} for round {message.round}")
        check_like(message.tensors, self._gate_template)
        self._gates[src] = message.tensors["gate"].double()
        return self._plan_if_ready()

    def _plan_if_ready(self, force: bool = False) -> list[Send]:
        expected = self.participation.among(self._live, self._round)
        if self._planned or (not force and (not self._gates or set(self._gates) | self._refused != expected)):
            return []
        self._planned = True  # with force and no gates at all, nodes keep their previous plans
        sends = []
        for node in sorted(self._gates):
            others = {peer: g for peer, g in self._gates.items() if peer != node}
            plan = make_plan(node, self._gates[node], others, self.p, self.tau)
            sends.append(Send(node, plan.to_message(self._round)))
        return sends

    def round_complete(self) -> bool:
        return self._planned and (self.embedding is None or self.embedding.round_complete())

    def on_refused(self, src: str, message: Message) -> list[Send]:
        """A refused gate of this round ends the wait for it: plan over the others (a liar
        must not hold every node's plan to the deadline)."""
        if message.kind == MessageKind.GATE_PUBLISH and message.round == self._round and src in self._live and not self._planned:
            self._refused.add(src)
            return self._plan_if_ready()
        return []

    def on_peer_lost(self, peer: str) -> list[Send]:
        self._live.discard(peer)
        self._gates.pop(peer, None)
        sends = self.embedding.on_peer_lost(peer) if self.embedding else []
        return sends + self._plan_if_ready()

    def on_peer_joined(self, peer: str) -> list[Send]:
        if peer in self.clients:
            self._live.add(peer)
        return self.embedding.on_peer_joined(peer) if self.embedding else []

    def on_deadline(self, round_index: int) -> list[Send]:
        sends = self.embedding.on_deadline(round_index) if self.embedding else []
        return sends + self._plan_if_ready(force=True)


def _embedding_partners(ctx: BuildContext[FedMoEDAOptions], node: str, opts: FedMoEDAOptions) -> Partners:
    """Whom `node` gossips φ with each round: all topology neighbours or its partner in the
    round's random matching (seeded by the run's seed), on rounds divisible by `embedding_every`."""
    neighbours = sorted(ctx.graph.neighbors(node))
    if opts.embedding_peers == "matching":
        base = random_matchings(ctx.graph, ctx.cfg.run.seed, ctx.participation).partners(node)
    else:
        base = lambda _round: neighbours  # noqa: E731 (a schedule, like `partners`' own lambdas)
    scheduled = every(opts.embedding_every, base)
    return lambda round_index: base(round_index) if round_index < opts.warmup_rounds else scheduled(round_index)


def _embedding_feedback(ctx: BuildContext[FedMoEDAOptions], opts: FedMoEDAOptions) -> ErrorFeedback | None:
    """Error feedback over the scheme the run's wire compresses embedding messages with: the
    codec does the quantising, the feedback only keeps what it lost (one quantiser, not two)."""
    if not opts.embedding_error_feedback:
        return None
    scheme = scheme_for(MessageKind.EMBEDDING.value, parse_compression(ctx.cfg.run.compression))
    if scheme == "none":
        raise ValueError("[method] embedding_error_feedback needs lossy wire compression of phi: add --compression embedding=int8 (or fp16)")
    return ErrorFeedback(scheme)


def _client(ctx: BuildContext[FedMoEDAOptions], node: str) -> Method:
    opts = ctx.options
    assisted = opts.planner == "server"
    visible = [m for m in ctx.clients if m != node] if assisted else topology_peers(ctx.cfg, ctx.graph, [node])[node]
    learner = ctx.learner(node)
    partners, feedback, phi = None, None, None
    if opts.embedding == "gossip":
        partners, feedback = _embedding_partners(ctx, node, opts), _embedding_feedback(ctx, opts)
    if opts.phi_path is not None:
        phi = load_pretrained(Path(opts.phi_path), float_state(learner.model, EMBEDDING_PREFIX))
    validation = None
    if opts.validation_examples:
        hold_out = getattr(learner, "hold_out", None)
        if hold_out is None:
            raise ValueError(f"[method] validation_examples needs the image task's MoE classifier; {ctx.cfg.run.data} has another model")
        # project decision: a node holds out at most a fifth of its own examples, so a node with
        # few (Dirichlet partitions give some under 100) still trains on most of them
        count = min(opts.validation_examples, learner.num_train_examples // 5)
        validation = hold_out(count, node_stream(ctx.cfg.run.seed, "shuffle", ctx.index(node))) if count else None
    return FedMoEDANode(
        node,
        learner,
        sorted(visible),
        sorted(ctx.graph.neighbors(node)),
        p=opts.p,
        tau=opts.tau,
        interval=opts.interval,
        embedding=opts.embedding,
        server_id=SERVER_ID if opts.embedding == "server" else None,
        planner=opts.planner,
        local_epochs=ctx.cfg.run.local_epochs,
        embedding_partners=partners,
        embedding_feedback=feedback,
        phi=phi,
        participation=ctx.participation,
        validation=validation,
        finetune_epochs=opts.finetune_epochs,
        warmup_rounds=opts.warmup_rounds,
        source_cap=opts.source_cap,
        slot_rule=opts.slot_rule,
        dp=(opts.dp_clip, opts.dp_noise, node_stream(ctx.cfg.run.seed, "dp", ctx.index(node))) if opts.dp_clip is not None else None,
        phi_clip=opts.phi_clip,
    )


def privacy_spent(opts: FedMoEDAOptions, cfg: ExperimentConfig) -> dict[str, Any]:
    """summary.json's `privacy`: each node's ε at δ = 1/n after a release in every round (an
    upper bound for a node that sat rounds out), none without DP."""
    if opts.dp_clip is None:
        return {}
    delta = 1 / cfg.run.nodes
    spent = node_epsilon(opts.dp_noise, cfg.run.rounds, delta)
    unit = "a node's data set, for everything it shares (experts, gate and gossiped phi; its requests follow from public gates)"
    return {
        "privacy": {
            "epsilon": spent,
            "delta": delta,
            "noise_multiplier": opts.dp_noise,
            "clip": opts.dp_clip,
            "unit": unit,
            "accountant": "RDP (dp-accounting)",
        }
    }


def _server(ctx: BuildContext[FedMoEDAOptions]) -> Method:
    opts = ctx.options
    assisted = opts.planner == "server"
    model = ctx.template()
    template = float_state(model, EMBEDDING_PREFIX) if opts.embedding == "server" else None
    moe = model.get_submodule("moe")
    gate = moe.gating_matrix() if assisted and isinstance(moe, ExpertSlots) else None
    return FedMoEDAServer(
        SERVER_ID, ctx.clients, template, opts.p, opts.tau, plans=assisted, interval=opts.interval, participation=ctx.participation, gate_template=gate
    )


def _peers(cfg: ExperimentConfig, graph: nx.Graph, clients: list[str]) -> dict[str, set[str]]:
    """A node fetches experts from its topology neighbourhood; with a coordinator planning
    from everyone's gates, from anyone."""
    rule = all_peers if FEDMOE_DA.options_of(cfg).planner == "server" else topology_peers
    return rule(cfg, graph, clients)


FEDMOE_DA = register_method(
    MethodSpec(
        name="fedmoe-da",
        summary="FedMoE-DA peer to peer: gates published to neighbours, experts chosen by gate correlation and fetched from their owners",
        needs=frozenset({"expert_slots"}),
        options=FedMoEDAOptions,
        flag_prefix="fedmoe",
        build_client=_client,
        build_server=_server,
        uses_server=lambda opts: opts.embedding == "server",
        peers=_peers,
        summary_extra=privacy_spent,
    )
)


def _fedrep_client(ctx: BuildContext[NoOptions], node: str) -> Method:
    return FedMoEDANode(
        node,
        ctx.learner(node),
        visible=[],
        neighbours=[],
        p=0,
        embedding="server",
        server_id=SERVER_ID,
        local_epochs=ctx.cfg.run.local_epochs,
        participation=ctx.participation,
    )


def _fedrep_server(ctx: BuildContext[NoOptions]) -> Method:
    template = float_state(ctx.template(), EMBEDDING_PREFIX)
    return FedMoEDAServer(SERVER_ID, ctx.clients, template, p=0, tau=1.0, plans=False, participation=ctx.participation)


register_method(
    MethodSpec(
        name="fedrep",
        summary="FedRep-style baseline: phi averaged by a server (FedAvg), gate and experts never leave the node (FedMoE-DA with P = 0, phi on a server)",
        needs=frozenset({"expert_slots"}),
        options=NoOptions,
        build_client=_fedrep_client,
        build_server=_fedrep_server,
    )
)
# The paper's server-assisted variant; phi's gossip options do not apply to it, so they are pinned too.
register_method(
    FEDMOE_DA.variant(
        "fedmoe-da-server",
        "FedMoE-DA as in the paper: a coordinator FedAvgs phi and plans every node's aggregation; experts still move peer to peer",
        {
            "planner": "server",
            "embedding": "server",
            "embedding_peers": "matching",
            "embedding_every": 2,
            "embedding_error_feedback": False,
            "phi_path": None,
            "warmup_rounds": 0,
        },
    )
)
