"""PF-MSMTrec: personalised federated multi-scenario multi-task recommendation (METHODS.md §4).

One client per scenario trains an MMoE whose experts follow the parameter template
(``glob + task(t) + scen(k)``, `p2pmoe.models.template`) on per-task BCE plus
``lambda * ||theta_k - theta_k^agg||^2`` towards the last aggregate it received. Each round it
uploads every shared tensor; the server builds each client's own state:

- expert template parts, per expert: ``glob`` and each ``task.<t>`` aggregated over all clients
  (weighted by training examples), ``scen`` by personalised aggregation; before aggregating,
  conflicting client updates are projected apart (PCGrad) and the parameters go through
  federated batch normalisation (normalise with cross-client statistics, aggregate,
  de-normalise with the client's own);
- each task's gate and tower: a second personalised aggregation;
- feature embeddings: each row averaged over the clients that changed it (a user private to
  one scenario keeps its update whole), or a plain mean;
- the experts' BatchNorm layers: their weights averaged (weighted by examples), or, with
  classic FedBN, kept local; their running statistics always stay local.
Personalised weights are ``softmax_j(cos(theta_k, theta_j) / tau)`` over the group's tensors.

Ablations are options (`--pf-template`, `--pf-fedbn`, `--pf-conflict`, `--pf-personalised`);
``fedbn-mmoe`` is the FedBN-style baseline (everything averaged but the BatchNorm layers).
The server refuses an upload whose names, shapes, dtypes or finiteness are wrong (an ERROR
reply; nothing it holds changes) and, at the deadline, aggregates the uploads that arrived.
Under partial participation the sampled clients' uploads are aggregated together and each
client's new state waits on the server until the client is next sampled
(`p2pmoe.methods.server`; a project decision, the paper has every scenario in every round).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from p2pmoe.learners.multitask import MultiTaskLearner
from p2pmoe.methods.base import Method, SendFailure
from p2pmoe.methods.pf_aggregation import aggregate_group, average_touched_rows, conflict_share, cosine_softmax
from p2pmoe.methods.registry import BuildContext, MethodSpec, register_method
from p2pmoe.methods.server import CollectingServer, ServerClient, example_count
from p2pmoe.models.params import float_state
from p2pmoe.models.template import template_part
from p2pmoe.naming import SERVER_ID
from p2pmoe.options import Options, option
from p2pmoe.participation import Participation
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.multitask import FeatureSpec, mmoe_model
from p2pmoe.wire.codec import check_like, require
from p2pmoe.wire.messages import Message, MessageKind, Send

FEDBN_MODES = ("parameter", "classic", "none")
EMBEDDING_MODES = ("touched", "mean")


@dataclass(frozen=True)
class PFMSMTrecOptions(Options):
    """PF-MSMTrec's choices; where the paper is silent the default is a project decision."""

    section: ClassVar[str] = "method"

    template: bool = option(True, "experts as glob + task(t) + scen(k) parts (off: plain experts, personalised as a whole)")
    fedbn: str = option(
        "parameter",
        "parameter: federated normalisation of expert parameters (project reading of Eq. 8); classic: BatchNorm layers stay local; none",
        choices=FEDBN_MODES,
    )
    conflict: bool = option(True, "project conflicting client updates apart before aggregating (PCGrad-style; project reading of Eq. 13)")
    personalised: bool = option(True, "cosine-softmax personalised aggregation of scenario parts and towers (off: example-weighted averages)")
    tau: float = option(0.1, "temperature of the cosine softmax (project decision)", above=0)
    prox: float = option(1e-5, "lambda of the proximal term ||theta_k - theta_k^agg||^2, summed over entries (project decision)", minimum=0)
    embeddings: str = option(
        "touched",
        "feature embeddings: each row averaged over the clients whose update changed it (touched, project decision) or a plain mean (FedAvg's)",
        choices=EMBEDDING_MODES,
    )


@dataclass(frozen=True)
class Plan:
    """How the server treats one group of tensor names."""

    personal: bool  # cosine-softmax weights (else example-weighted)
    coordinated: bool  # conflict projection and parameter FedBN apply (expert networks)


def group_of(name: str) -> str:
    """The aggregation group of a shared tensor: an expert's template part, a whole plain
    expert, a task's gate and tower, the embeddings or the normalisation layers."""
    head, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    if head == "experts":
        part, task = template_part(name)
        if part == "task":
            return f"experts.{index}.task.{task}"
        return f"experts.{index}.{part}" if part != "other" else f"experts.{index}"
    if head in ("gates", "towers"):
        return f"task.{index}"
    return head


def plan_for(group: str, opts: PFMSMTrecOptions) -> Plan:
    """Scenario parts, plain experts and task modules are personalised; template glob and
    task parts are global; experts are coordinated; embeddings and norms are plain means."""
    is_expert = group.startswith("experts.")
    personal = group.startswith("task.") or (is_expert and not (group.endswith(".glob") or ".task." in group))
    return Plan(personal=personal and opts.personalised, coordinated=is_expert)


RUNNING_STATS = (".running_mean", ".running_var")


def shared_names(model: nn.Module, opts: PFMSMTrecOptions) -> list[str]:
    """What a client uploads: every floating-point tensor but the BatchNorm running statistics
    and, under classic FedBN, the whole BatchNorm layers.

    Project decision: the running statistics describe this client's own (personalised) expert
    outputs; averaged over clients (with parameter FedBN giving each client its own scale) they
    no longer match them, and evaluation, which uses them, degraded round after round
    (measured: mean test AUC 0.76 -> 0.58 over 15 rounds on ML-1M while the training loss kept
    falling)."""
    return [n for n in float_state(model) if not n.endswith(RUNNING_STATS) and not (opts.fedbn == "classic" and n.startswith("norms."))]


class PFMSMTrecClient(ServerClient):
    """Uploads its shared tensors; adopts its personalised state and anchors training to it."""

    def __init__(
        self,
        node_id: str,
        learner: MultiTaskLearner,
        server_id: str,
        opts: PFMSMTrecOptions,
        local_epochs: int = 1,
        participation: Participation | None = None,
    ) -> None:
        super().__init__(node_id, learner, server_id, local_epochs, participation)
        self.tasks_learner = learner  # `learner`, typed: the anchor of the proximal term lives there
        self.opts = opts
        self.names = shared_names(learner.model, opts)

    def model_update(self, round_index: int) -> Message:
        state = float_state(self.learner.model)
        return Message(MessageKind.MODEL_UPDATE, round_index, {n: state[n] for n in self.names}, {"num_examples": self.learner.num_train_examples})

    def adopt(self, message: Message) -> None:
        tensors = message.tensors
        own = self.learner.model.state_dict()
        check_like(tensors, {n: own[n] for n in self.names})
        require(all(bool(torch.isfinite(t).all()) for t in tensors.values()), "aggregate holds non-finite values")
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor)
        self.tasks_learner.set_anchor(tensors, self.opts.prox)

    def on_send_failed(self, dst: str, failure: SendFailure) -> list[Send]:
        if failure.kind == MessageKind.MODEL_UPDATE:
            self._synced = True  # refused or lost: go on with the local weights
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learner's state and the anchor of the proximal term (``anchor.<name>``)."""
        return {**self.learner.state_dict(), **{f"anchor.{n}": t.cpu() for n, t in self.tasks_learner.anchor.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        anchor = {k[len("anchor.") :]: v for k, v in state.items() if k.startswith("anchor.")}
        self.learner.load_state_dict({k: v for k, v in state.items() if not k.startswith("anchor.")})
        if anchor:
            self.tasks_learner.set_anchor(anchor, self.opts.prox)


UNDELIVERED_KEY = "undelivered"  # a server checkpoint key; client states are "<client>/<name>"


class PFMSMTrecServer(CollectingServer):
    """Builds every client's personalised state from the round's uploads (see module doc)."""

    def __init__(
        self,
        node_id: str,
        clients: Sequence[str],
        template: dict[str, torch.Tensor],
        opts: PFMSMTrecOptions,
        participation: Participation | None = None,
    ) -> None:
        super().__init__(node_id, clients, participation)
        self.template = {n: t.clone() for n, t in template.items()}
        self.opts = opts
        self.sent = {c: dict(self.template) for c in self.clients}
        # Clients whose state in `sent` is newer than what they hold: computed in a round
        # after which they were not sampled. Checkpointed (UNDELIVERED_KEY), so a restarted
        # server still hands each its state the next time it is sampled.
        self._undelivered: set[str] = set()
        self.groups: dict[str, list[str]] = defaultdict(list)
        for name in self.template:
            self.groups[group_of(name)].append(name)
        self._updates: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
        self._diagnostics: dict[str, Any] = {}

    def start_round(self, round_index: int) -> list[Send]:
        self._updates = {}
        return super().start_round(round_index)

    def take(self, src: str, message: Message) -> None:
        count = example_count(message)
        check_like(message.tensors, self.template)
        bad = [n for n, t in message.tensors.items() if not bool(torch.isfinite(t).all())]
        require(not bad, f"non-finite values in {bad[:3]}")
        self._updates[src] = (message.tensors, count)

    def reply(self) -> list[Send]:
        senders = [c for c in self.clients if c in self._updates]
        uploads = [self._updates[c][0] for c in senders]
        counts = torch.tensor([float(self._updates[c][1]) for c in senders])
        by_examples = (counts / counts.sum()).expand(len(senders), -1)
        states: list[dict[str, torch.Tensor]] = [{} for _ in senders]
        self_weights: list[float] = []
        conflicts: list[float] = []
        for group, names in self.groups.items():
            plan = plan_for(group, self.opts)
            part = [{n: u[n] for n in names} for u in uploads]
            weights = cosine_softmax(torch.stack([_flat(p) for p in part]), self.opts.tau) if plan.personal else by_examples
            bases = [self.sent[c] for c in senders]
            if plan.personal:
                self_weights.append(float(weights.diagonal().mean()))
            if plan.coordinated:
                conflicts.append(conflict_share(torch.stack([_flat(p) - _flat({n: b[n] for n in names}) for p, b in zip(part, bases, strict=True)])))
            if group == "embeddings" and self.opts.embeddings == "touched":
                mixed = self._embeddings(part, bases, by_examples[0])
            else:
                coordinated = plan.coordinated
                mixed = aggregate_group(part, bases, weights, coordinated and self.opts.conflict, coordinated and self.opts.fedbn == "parameter")
            for k, tensors in enumerate(mixed):
                states[k].update(tensors)
        self.sent.update(zip(senders, states, strict=True))
        self._diagnostics = {
            "clients": len(senders),
            "mean_self_weight": sum(self_weights) / len(self_weights) if self_weights else None,
            "conflicting_pair_share": sum(conflicts) / len(conflicts) if conflicts else None,
        }
        self._undelivered |= set(senders)
        receivers = [c for c in self.receivers() if c in self._undelivered]
        self._undelivered -= set(receivers)
        return [Send(c, Message(MessageKind.MODEL_GLOBAL, self._round, self.sent[c])) for c in receivers]

    def diagnostics(self) -> dict[str, Any]:
        """The round's aggregation, for reports: the mean weight a client's personalised groups
        give its own upload (1/clients is a plain average) and the share of client pairs whose
        expert updates conflict (negative dot product), averaged over groups."""
        return self._diagnostics

    @staticmethod
    def _embeddings(part: list[dict[str, torch.Tensor]], bases: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Row-wise averages of the touched rows; every client gets the same tables. The base
        is the first sender's last table (all clients got the same one unless one missed a
        round, whose stale rows then count as its update)."""
        tables = {n: average_touched_rows([p[n] for p in part], bases[0][n], weights) for n in part[0]}
        return [dict(tables) for _ in part]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the server last sent each client (``<client>/<name>``): the bases of updates;
        and which clients have not received theirs yet (`UNDELIVERED_KEY`, one uint8 flag per
        client in client order)."""
        undelivered = torch.tensor([c in self._undelivered for c in self.clients], dtype=torch.uint8)
        return {**{f"{c}/{n}": t for c, state in self.sent.items() for n, t in state.items()}, UNDELIVERED_KEY: undelivered}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Everything is checked before anything changes. A checkpoint without
        `UNDELIVERED_KEY` (written before it existed) restores with nothing undelivered."""
        sent = {c: {n: state.get(f"{c}/{n}") for n in self.template} for c in self.clients}
        for client_state in sent.values():
            require(all(t is not None for t in client_state.values()), "checkpoint lacks a client's state")
            check_like(client_state, self.template)  # type: ignore[arg-type]
        flags = state.get(UNDELIVERED_KEY, torch.zeros(len(self.clients), dtype=torch.uint8))
        require(flags.dtype == torch.uint8 and tuple(flags.shape) == (len(self.clients),), f"{UNDELIVERED_KEY} must be uint8 [{len(self.clients)}]")
        require(bool((flags <= 1).all()), f"{UNDELIVERED_KEY} must hold 0 or 1")
        self.sent = sent  # type: ignore[assignment]
        self._undelivered = {c for c, flag in zip(self.clients, flags.tolist(), strict=True) if flag}


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors.values()])


def _model(template: bool) -> Callable[[ExperimentConfig, FeatureSpec], nn.Module]:
    def build(cfg: ExperimentConfig, features: FeatureSpec) -> nn.Module:
        return mmoe_model(cfg, features, template=template)

    return build


def _client(ctx: BuildContext[PFMSMTrecOptions], node: str) -> Method:
    opts = ctx.options
    learner = ctx.learner(node, _model(opts.template))
    if not isinstance(learner, MultiTaskLearner):
        raise TypeError(f"pf-msmtrec needs the multitask family's learner, got {type(learner).__name__}")
    return PFMSMTrecClient(node, learner, SERVER_ID, opts, ctx.cfg.run.local_epochs, ctx.participation)


def _server(ctx: BuildContext[PFMSMTrecOptions]) -> Method:
    opts = ctx.options
    model = ctx.template(_model(opts.template))
    state = float_state(model)
    return PFMSMTrecServer(SERVER_ID, ctx.clients, {n: state[n] for n in shared_names(model, opts)}, opts, ctx.participation)


PF_MSMTREC = register_method(
    MethodSpec(
        name="pf-msmtrec",
        summary="PF-MSMTrec: template experts (global/task/scenario parts), parameter FedBN, conflict projection, personalised aggregation",
        needs=frozenset({"multi_task"}),
        build_client=_client,
        build_server=_server,
        options=PFMSMTrecOptions,
        flag_prefix="pf",
    )
)
register_method(
    PF_MSMTREC.variant(
        "fedbn-mmoe",
        "FedBN-style MMoE baseline: every tensor averaged by the server but the experts' BatchNorm layers",
        fixed=PFMSMTrecOptions(template=False, fedbn="classic", conflict=False, personalised=False, prox=0.0, embeddings="mean"),
    )
)
