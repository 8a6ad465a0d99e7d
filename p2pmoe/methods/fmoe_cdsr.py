"""FMoE-CDSR (arXiv 2503.13254, METHODS §2), sans-IO: experts through a caching server.

Round r on client c: train locally, upload its own expert (``model_update``, tensors
``expert.<param>``, meta ``{"domain": c}``). The server stores each upload as is (no
averaging) and, once every live client's expert of the round is in (or on the deadline, or
when the missing ones are lost), sends each client the cached experts of every OTHER domain
(``model_global``, tensors ``domain.<i>.<param>``). So round r's reply carries the others'
experts trained in round r; a domain that never uploaded is absent from the reply, and the
client keeps that branch masked. Under partial participation only the sampled clients upload,
and the reply goes to the clients sampled for the next round (`p2pmoe.methods.server`): the
cache still holds every domain's latest expert, so a sampled client gets them all.

Registered here: ``fmoe-cdsr`` and its ablations ``fmoe-cdsr-uniform`` (no gate) and
``fmoe-cdsr-unfrozen`` (foreign experts fine-tuned); and two baselines on the same client
model, which separate the method from its backbone: ``fmoe-cdsr-local`` (the own branch
trained alone) and ``fmoe-cdsr-fedavg`` (FedSASRec on that branch, `OwnExpertAverageClient`).
The option ``expert_epochs`` (the paper's Table 5) makes the server stop refreshing its cache.

Project decision: a client loads the experts it received in round r just before its local
training of round r+1, not on receipt. Its evaluation after round r then sees the foreign
experts its adaptation parameters and gate were trained with, which is the official order
(receive, train, upload, evaluate). Foreign branches are masked until their first expert is
loaded, i.e. during round 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from p2pmoe.data.sequences import DomainSequences
from p2pmoe.learners.sequential import NextItemLearner
from p2pmoe.methods.base import Method
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.methods.local import LocalMethod
from p2pmoe.methods.registry import BuildContext, MethodSpec, register_method
from p2pmoe.methods.server import CollectingServer, ServerClient
from p2pmoe.models.fmoe_cdsr import GATE_POOLINGS, GATES, HEADS, INITS, FMoECDSR, transition_adjacency
from p2pmoe.naming import SERVER_ID
from p2pmoe.options import Options, option, options_as
from p2pmoe.participation import Participation
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.sequential import SequenceOptions
from p2pmoe.wire.codec import check_like, require
from p2pmoe.wire.messages import Message, MessageKind, Send

UPLOAD_PREFIX = "expert."
PENDING_PREFIX = "pending."


def expert_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wire names for one expert (an upload, or FedAvg's average of them): ``expert.<param>``."""
    return {UPLOAD_PREFIX + name: t for name, t in state.items()}


def expert_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The expert in ``expert.<param>`` tensors; raises ProtocolError for any other name."""
    require(all(name.startswith(UPLOAD_PREFIX) for name in tensors), "expert tensors must be named expert.<param>")
    return {name[len(UPLOAD_PREFIX) :]: t for name, t in tensors.items()}


def domain_tensors(experts: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Wire names for experts by domain: ``domain.<i>.<param>``."""
    return {f"domain.{i}.{name}": t for i, state in experts.items() for name, t in state.items()}


def split_domains(tensors: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], domains: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Parse ``domain.<i>.<param>`` tensors into one state per domain, each checked against
    ``template`` (names, shapes, dtypes) and ``i`` against ``domains``. Raises ProtocolError."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        head, index, param = (name.split(".", 2) + ["", ""])[:3]
        require(head == "domain" and index.isdigit() and str(int(index)) == index, f"tensor {name!r} is not domain.<i>.<param>")
        require(int(index) in domains, f"tensor {name!r}: domain {index} is not one this node takes")
        out.setdefault(int(index), {})[param] = tensor
    for state in out.values():
        check_like(state, template)
    return out


class FMoECDSRClient(ServerClient):
    """Client of one domain: uploads its own expert, takes the other domains' experts.

    ``freeze_foreign`` (default True, the paper's method) keeps received experts out of local
    training; False is the "without freezing" ablation: they train locally until the next
    download overwrites them.
    """

    def __init__(
        self,
        node_id: str,
        learner: NextItemLearner,
        domain_index: int,
        server_id: str,
        local_epochs: int = 3,
        freeze_foreign: bool = True,
        participation: Participation | None = None,
    ) -> None:
        super().__init__(node_id, learner, server_id, local_epochs, participation)
        if not isinstance(learner.model, FMoECDSR):
            raise TypeError(f"an FMoE-CDSR client needs an FMoECDSR model, got {type(learner.model).__name__}")
        self.model: FMoECDSR = learner.model
        self.next_item: NextItemLearner = learner
        if self.model.domain_index != domain_index:
            raise ValueError(f"the model is for domain {self.model.domain_index}, not {domain_index}")
        self.domain_index = domain_index
        self.freeze_foreign = freeze_foreign
        self.pending: dict[int, dict[str, torch.Tensor]] = {}

    def _foreign(self) -> set[int]:
        return set(range(self.model.num_domains)) - {self.domain_index}

    def _set_trainable(self) -> None:
        """Foreign experts train only when loaded and not frozen; the optimiser follows suit."""
        for i in self._foreign():
            self.model.experts[i].requires_grad_(bool(self.model.available[i]) and not self.freeze_foreign)
        self.next_item.refresh_optimizer()

    def _apply_pending(self) -> None:
        for i, state in sorted(self.pending.items()):
            self.model.set_expert_state(i, state)
        self.pending = {}
        self._set_trainable()

    def train_local(self, round_index: int) -> dict[str, float]:
        self._apply_pending()
        return super().train_local(round_index)

    def model_update(self, round_index: int) -> Message:
        own = self.model.expert_state(self.domain_index)
        return Message(MessageKind.MODEL_UPDATE, round_index, expert_tensors(own), {"domain": self.domain_index})

    def adopt(self, message: Message) -> None:
        """Keep the experts until the next training; without a reply (deadline) the client goes
        on with those already loaded."""
        self.pending = split_domains(message.tensors, self.model.expert_state(self.domain_index), self._foreign())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learner's state and the received experts not yet loaded (``pending.domain.<i>.*``)."""
        return {**self.learner.state_dict(), **{PENDING_PREFIX + k: v for k, v in domain_tensors(self.pending).items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pending = {k[len(PENDING_PREFIX) :]: v for k, v in state.items() if k.startswith(PENDING_PREFIX)}
        parsed = split_domains(pending, self.model.expert_state(self.domain_index), self._foreign())
        self.learner.load_state_dict({k: v for k, v in state.items() if not k.startswith(PENDING_PREFIX)})
        self.pending = parsed
        self._set_trainable()


class FMoECDSRServer(CollectingServer):
    """Caches the latest expert of every domain and hands each client the other domains'.

    A lost client's last expert stays in the cache and is still sent to the others.
    ``store_rounds`` (None: every round) stops the cache from taking uploads of round
    ``store_rounds`` and later, which are still checked: the other domains then keep getting the
    expert as it was after that many rounds of training. This is how the benchmark runs the
    paper's Table 5 (foreign experts trained 3 vs 14 epochs); how the paper produced its older
    experts is not said, so this reading (the same run, the cache frozen) is a project decision.
    """

    def __init__(
        self,
        node_id: str,
        clients: Mapping[str, int],
        expert_template: Mapping[str, torch.Tensor],
        participation: Participation | None = None,
        store_rounds: int | None = None,
    ) -> None:
        super().__init__(node_id, list(clients), participation)
        if len(set(clients.values())) != len(clients):
            raise ValueError("each domain must have exactly one client")
        if store_rounds is not None and store_rounds < 1:
            raise ValueError(f"store_rounds must be at least 1 (or None for every round), got {store_rounds}")
        self.domain_of = dict(clients)
        self.template = {name: t.detach().clone() for name, t in expert_template.items()}
        self.store_rounds = store_rounds
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def take(self, src: str, message: Message) -> None:
        domain = self.domain_of[src]
        require(message.meta.get("domain") == domain, f"{src} serves domain {domain}, meta.domain says {message.meta.get('domain')!r}")
        expert = expert_state(message.tensors)
        check_like(expert, self.template)
        if self.store_rounds is None or message.round < self.store_rounds:
            self.cache[domain] = expert

    def reply(self) -> list[Send]:
        sends = []
        for client in self.receivers():
            own = self.domain_of[client]
            others = {i: state for i, state in sorted(self.cache.items()) if i != own}
            sends.append(Send(client, Message(MessageKind.MODEL_GLOBAL, self._round, domain_tensors(others))))
        return sends

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The expert cache as ``domain.<i>.<param>`` tensors."""
        return domain_tensors(self.cache)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the cache; every tensor is checked before the cache changes."""
        self.cache = split_domains(state, self.template, set(self.domain_of.values()))


@dataclass(frozen=True)
class FMoECDSROptions(Options):
    """The FMoE-CDSR client model's choices; each marked where the paper or its code is silent."""

    section: ClassVar[str] = "method"

    encoder: str = option(
        "lean",
        "experts with a mu stack only (lean; project default, measured on FKCB Food) or mu and log-sigma^2 stacks with the official "
        "annealed KL term (vae, twice the expert bytes); the log-sigma^2 stack serves only the KL term",
        choices=("lean", "vae"),
    )
    gate_pooling: str = option(
        "sequence", "one gate vector per sequence (project default), per position, or per batch (the official code)", choices=GATE_POOLINGS
    )
    head: str = option("linear", "each branch's linear prediction head (as specified) or scores tied to its item embeddings (tied)", choices=HEADS)
    contrastive_weight: float = option(0.1, "weight of the InfoNCE term between a sequence and a permutation of it", minimum=0)
    init: str = option(
        "sasrec",
        "branch embedding init: sasrec = N(0, 0.02) as the SASRec baselines (project default); "
        "official = torch's N(0, 1) and U(+-1/sqrt d) graph bias, as the official code",
        choices=INITS,
    )
    gate: str = option("learned", "how a client mixes the branches: a learned gate (the method) or uniformly (an ablation, no gate)", choices=GATES)
    freeze_foreign: bool = option(
        True, "keep the other domains' experts frozen (the method); false: fine-tune them locally until the next download (an ablation)"
    )
    graph: bool = option(True, "the branch's graph layer over the item-transition graph (false: an ablation, the item table is E alone)")
    input_norm: bool = option(True, "the official encoder input LayerNorm((H + E) * sqrt(d) + P) (false: an ablation, (H + E) + P as SASRec)")
    expert_epochs: int = option(
        0,
        "the server keeps each domain's expert as it was after this many local epochs (its uploads of the first "
        "ceil(E / local epochs) rounds) and sends that version from then on; 0 = always the latest (the method). "
        "The paper's Table 5 compares 3 and 14",
        minimum=0,
    )


def _model_factory(opts: FMoECDSROptions) -> Callable[[ExperimentConfig, DomainSequences | None, int, int], nn.Module]:
    """The sequential task's model hook: an FMoE-CDSR client model for domain k of K."""

    def build(cfg: ExperimentConfig, domain: DomainSequences | None, k: int, num_domains: int) -> nn.Module:
        task = options_as(cfg.task, SequenceOptions, "FMoE-CDSR's model")
        items = domain.num_items if domain is not None else 1
        adjacency = transition_adjacency(domain.train if domain is not None else [], items)
        return FMoECDSR(
            items,
            num_domains,
            k,
            adjacency,
            max_len=task.max_len,
            hidden=task.embed_dim,
            heads=task.heads,
            blocks=task.blocks,
            dropout=task.dropout,
            contrastive_weight=opts.contrastive_weight,
            vae=opts.encoder == "vae",
            gate=opts.gate,
            gate_pooling=opts.gate_pooling,
            head=opts.head,
            init=opts.init,
            graph=opts.graph,
            input_norm=opts.input_norm,
            train_negatives=task.train_negatives,
        )

    return build


def _learner(ctx: BuildContext[FMoECDSROptions], node: str) -> NextItemLearner:
    learner = ctx.learner(node, _model_factory(ctx.options))
    if not isinstance(learner, NextItemLearner):
        raise TypeError(f"{ctx.cfg.run.method} needs a next-item learner, got {type(learner).__name__}")
    return learner


def _expert_template(ctx: BuildContext[FMoECDSROptions]) -> dict[str, torch.Tensor]:
    template = ctx.template(_model_factory(ctx.options))
    if not isinstance(template, FMoECDSR):
        raise TypeError(f"{ctx.cfg.run.method} needs an FMoECDSR template, got {type(template).__name__}")
    return template.expert_state(0)


def _client(ctx: BuildContext[FMoECDSROptions], node: str) -> Method:
    """Own expert up, the others' experts down, a gate (or a uniform mixture) over the branches."""
    learner = _learner(ctx, node)
    opts = ctx.options
    return FMoECDSRClient(
        node, learner, ctx.index(node), SERVER_ID, ctx.cfg.run.local_epochs, freeze_foreign=opts.freeze_foreign, participation=ctx.participation
    )


def _server(ctx: BuildContext[FMoECDSROptions]) -> Method:
    opts = ctx.options
    store_rounds = math.ceil(opts.expert_epochs / ctx.cfg.run.local_epochs) if opts.expert_epochs else None
    return FMoECDSRServer(SERVER_ID, {n: k for k, n in enumerate(ctx.clients)}, _expert_template(ctx), ctx.participation, store_rounds)


FMOE_CDSR = register_method(
    MethodSpec(
        name="fmoe-cdsr",
        summary="FMoE-CDSR: each client's own expert goes to a caching server; the others' experts come back frozen and a gate mixes the branches",
        needs=frozenset({"domain_sequences"}),
        options=FMoECDSROptions,
        flag_prefix="fmoe",
        build_client=_client,
        build_server=_server,
    )
)
register_method(FMOE_CDSR.variant("fmoe-cdsr-uniform", "FMoE-CDSR ablation without the gate: a uniform mixture of the branches", {"gate": "uniform"}))
register_method(
    FMOE_CDSR.variant("fmoe-cdsr-unfrozen", "FMoE-CDSR ablation: foreign experts fine-tuned locally until the next download", {"freeze_foreign": False})
)


class OwnExpertAverageClient(ServerClient):
    """FedSASRec on FMoE-CDSR's branch: the client's own expert is averaged with the other
    domains' (FedAvg, weighted by training sequences), its adaptation parameters stay local
    and the foreign branches are never used. With `LocalMethod` on the same model (Local on
    the branch), it separates what the method adds from what its backbone adds (issue 11)."""

    def __init__(self, node_id: str, learner: NextItemLearner, server_id: str, local_epochs: int, participation: Participation | None = None) -> None:
        super().__init__(node_id, learner, server_id, local_epochs, participation)
        if not isinstance(learner.model, FMoECDSR):
            raise TypeError(f"needs an FMoECDSR model, got {type(learner.model).__name__}")
        self.model: FMoECDSR = learner.model

    def model_update(self, round_index: int) -> Message:
        own = self.model.expert_state(self.model.domain_index)
        meta = {"num_examples": self.learner.num_train_examples}
        return Message(MessageKind.MODEL_UPDATE, round_index, expert_tensors(own), meta)

    def adopt(self, message: Message) -> None:
        """Load the average into the own expert; a wrong name, shape, dtype or value changes nothing."""
        self.model.set_expert_state(self.model.domain_index, expert_state(message.tensors))


def _local_branch(ctx: BuildContext[FMoECDSROptions], node: str) -> Method:
    return LocalMethod(node, _learner(ctx, node), ctx.cfg.run.local_epochs, ctx.participation)


def _average_branch(ctx: BuildContext[FMoECDSROptions], node: str) -> Method:
    return OwnExpertAverageClient(node, _learner(ctx, node), SERVER_ID, ctx.cfg.run.local_epochs, ctx.participation)


def _average_server(ctx: BuildContext[FMoECDSROptions]) -> Method:
    return FedAvgServer(SERVER_ID, ctx.clients, expert_tensors(_expert_template(ctx)), ctx.participation)


def _branch_baseline(
    name: str, summary: str, client: Callable[[BuildContext[FMoECDSROptions], str], Method], server: Callable[[BuildContext[FMoECDSROptions]], Method] | None
) -> MethodSpec[FMoECDSROptions]:
    """A backbone baseline: FMoE-CDSR's own branch and options, other builders, the mixture's
    two options pinned (it has no mixture)."""
    return dataclasses.replace(FMOE_CDSR.variant(name, summary, {"gate": "learned", "freeze_foreign": True}), build_client=client, build_server=server)


register_method(
    _branch_baseline(
        "fmoe-cdsr-local", "backbone baseline: Local training of FMoE-CDSR's own branch (graph layer, contrastive loss), nothing sent", _local_branch, None
    )
)
register_method(
    _branch_baseline(
        "fmoe-cdsr-fedavg",
        "backbone baseline: FedSASRec on FMoE-CDSR's branch, each client's own expert averaged over the domains",
        _average_branch,
        _average_server,
    )
)
