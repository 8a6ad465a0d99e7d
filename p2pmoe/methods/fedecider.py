"""FeDecider (METHODS §3): direction-only LoRA sharing with personalised integration, and the
LoRA-sharing baselines it is compared to, on the text task family.

For each LoRA-adapted layer with update ``ΔW = B A`` a FeDecider client uploads only the
direction ``D = ΔW / m`` (``m``: column-wise norm by default) as low-rank factors ``B' A' = D``;
the magnitude never leaves it. The server relays every client's upload to the others. Each
client then learns per-layer weights α over the others' directions with the backbone, its own
LoRA and every direction frozen, and continues training its own LoRA under the integrated
update ``m ⊙ (D_own + Σ_j α_j D_j)`` (`LoraTextEncoder` applies it in every forward pass).

Baselines and ablations under the same rounds and task:
- ``local`` (the shared baseline): own LoRA only;
- ``lora-fedavg``: A and B averaged by the server (FedAvg weighted by training pairs);
- ``lora-fedavg-dw``: the exact average of ΔW = B A. The server relays the factors; each client
  sets its LoRA to the averaged factors and keeps ``mean(B A) − mean(B)·mean(A)`` as a frozen
  residual (project decision, FedEx-LoRA's way of making the average exact at rank r);
- ``lora-similarity``: the paper's Fig. 2 baseline; per layer, the others' LoRA weighted by the
  cosine similarity of their ΔW to the client's own (negative similarities count zero, the own
  weight is 1; project decision), A and B aggregated separately;
- ``fedecider-nodecomp``: whole updates shared and mixed (``ΔW_own + Σ_j α_j ΔW_j``);
- ``fedecider-uniform``: directions shared, α fixed to 1/J (no personalisation).

Under partial participation the sampled clients upload and the relay (or average) goes to the
clients sampled for the next round (`p2pmoe.methods.server`); α restarts uniform whenever the
number of relayed clients changes (a project decision; the paper has every client each round).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from p2pmoe.learners.text import TextRecLearner
from p2pmoe.methods.base import Method
from p2pmoe.methods.fedavg import FedAvgServer
from p2pmoe.methods.registry import BuildContext, MethodSpec, register_method
from p2pmoe.methods.server import CollectingServer, ServerClient, example_count
from p2pmoe.models.params import weighted_average
from p2pmoe.models.text_lora import NORMS, LoraTextEncoder, direction_factors
from p2pmoe.naming import SERVER_ID
from p2pmoe.options import Options, option
from p2pmoe.participation import Participation
from p2pmoe.wire.codec import check_like, require
from p2pmoe.wire.messages import Message, MessageKind, Send

Factors = dict[str, tuple[Tensor, Tensor]]
SHARINGS = ("directions", "updates", "average", "average-dw", "similarity")
"""What a client uploads and does with what comes back (see the module docstring)."""


@dataclass(frozen=True)
class FeDeciderOptions(Options):
    """FeDecider's choices where the paper leaves them open (all project decisions)."""

    section: ClassVar[str] = "method"

    norm: str = option("column", "magnitude of ΔW: column (DoRA's per-output-unit norm) or frobenius (one scalar per layer)", choices=NORMS)
    sharing: str = option(
        "directions",
        "what clients share: directions (FeDecider), updates (whole LoRA updates mixed), average (FedAvg of A and B), "
        "average-dw (FedAvg of Delta W = B A) or similarity (layer-wise cosine-similarity weights)",
        choices=SHARINGS,
    )
    alpha: str = option(
        "softmax",
        "parameterisation of the personalised weights alpha (uniform: fixed, not learned)",
        choices=("softmax", "sigmoid", "unconstrained", "uniform"),
    )
    alpha_epochs: int = option(1, "epochs learning alpha (LoRA frozen) before the LoRA epochs of a round", minimum=0)
    alpha_lr: float = option(0.05, "Adam learning rate of alpha", above=0)


def as_tensors(factors: Factors) -> dict[str, Tensor]:
    """Factors as named CPU tensors for the wire: ``<layer>.B`` and ``<layer>.A``."""
    out = {}
    for name, (b, a) in factors.items():
        out[f"{name}.B"] = b.detach().to("cpu", copy=True).contiguous()
        out[f"{name}.A"] = a.detach().to("cpu", copy=True).contiguous()
    return out


def from_tensors(tensors: dict[str, Tensor], layers: Sequence[str]) -> Factors:
    return {name: (tensors[f"{name}.B"], tensors[f"{name}.A"]) for name in layers}


class LoraSharingClient(ServerClient):
    """A client of any LoRA-sharing method; `sharing` picks which (one of `SHARINGS`)."""

    def __init__(
        self,
        node_id: str,
        learner: TextRecLearner,
        server_id: str,
        sharing: str,
        opts: FeDeciderOptions,
        alpha_kind: str | None = None,
        local_epochs: int = 1,
        participation: Participation | None = None,
    ) -> None:
        super().__init__(node_id, learner, server_id, local_epochs, participation)
        if sharing not in SHARINGS:
            raise ValueError(f"sharing must be one of {SHARINGS}")
        self.text = learner
        self.sharing, self.opts = sharing, opts
        self.alpha_kind = alpha_kind or opts.alpha
        self.model: LoraTextEncoder = learner.encoder
        self.template = as_tensors({n: (b.detach(), a.detach()) for n, (b, a) in self.model.factors().items()})
        self.alpha_optimizer: torch.optim.Adam | None = None

    # -- local work -------------------------------------------------------------------------
    def train_local(self, round_index: int) -> dict[str, float]:
        """α first (everything else frozen), then the own LoRA (α frozen). The compute is every
        pass over the training pairs, α's included (`sample_epochs`, as every method reports)."""
        stats: dict[str, float] = {}
        passes = self.local_epochs
        if self.model.alpha.numel() and self.alpha_kind != "uniform" and self.opts.alpha_epochs:
            passes += self.opts.alpha_epochs
            lora = self.model.lora_parameters()
            for p in lora:
                p.requires_grad_(False)
            self.model.set_alpha_trainable(True)
            if self.alpha_optimizer is None or self.alpha_optimizer.param_groups[0]["params"][0] is not self.model.alpha:
                self.alpha_optimizer = torch.optim.Adam([self.model.alpha], lr=self.opts.alpha_lr)
            alpha_stats = self.text.train(self.opts.alpha_epochs, self.alpha_optimizer)
            stats["alpha_loss"] = alpha_stats.get("train_loss", float("nan"))
            self.model.set_alpha_trainable(False)
            for p in lora:
                p.requires_grad_(True)
        stats.update(self.text.train(self.local_epochs))
        return {**stats, "sample_epochs": float(self.text.num_train_examples * passes)}

    def upload(self) -> Factors:
        """What leaves this client (on the CPU): direction factors (FeDecider), or the LoRA factors."""
        own = {n: (b.detach().cpu(), a.detach().cpu()) for n, (b, a) in self.model.factors().items()}
        if self.sharing == "directions":
            return {n: direction_factors(b, a, self.opts.norm) for n, (b, a) in own.items()}
        return own

    def model_update(self, round_index: int) -> Message:
        meta = {"num_examples": self.text.num_train_examples}
        return Message(MessageKind.MODEL_UPDATE, round_index, as_tensors(self.upload()), meta)

    # -- what comes back --------------------------------------------------------------------
    def adopt(self, message: Message) -> None:
        layers = self.model.layer_names
        if self.sharing == "average":
            check_like(message.tensors, self.template)
            self.model.set_lora(from_tensors(message.tensors, layers))
        else:
            others, counts = self._relayed(message)
            foreign = [from_tensors(t, layers) for t in others]
            if self.sharing in ("directions", "updates"):
                self.model.integrate(foreign, self.alpha_kind, self.sharing == "directions", self.opts.norm)
            elif self.sharing == "average-dw":
                self._average_updates(foreign, counts)
            else:
                self._similarity_average(foreign)

    def _relayed(self, message: Message) -> tuple[list[dict[str, Tensor]], list[int]]:
        """The other clients' uploads in the relay's order, each checked against the own shapes."""
        clients: Any = message.meta.get("clients")
        counts: Any = message.meta.get("num_examples")
        require(isinstance(clients, list) and all(isinstance(c, str) for c in clients), "meta.clients must be a list of names")
        require(len(set(clients)) == len(clients) and self.node_id not in clients, "meta.clients must be distinct other clients")
        require(
            isinstance(counts, list) and len(counts) == len(clients) and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts),
            "meta.num_examples must hold one positive integer per client",
        )
        expected = {f"{c}/{name}": t for c in clients for name, t in self.template.items()}
        check_like(message.tensors, expected)
        others = [{name: message.tensors[f"{c}/{name}"] for name in self.template} for c in clients]
        return others, counts

    def _average_updates(self, foreign: list[Factors], counts: list[int]) -> None:
        """LoRA := the averaged factors; residual += mean(ΔW) − mean(B)·mean(A), so the layer's
        update is exactly the (example-weighted) mean of every client's update."""
        own = self.upload()
        weights = [self.text.num_train_examples, *counts]
        everyone = [own, *foreign]
        mean_b = weighted_average([{n: b for n, (b, _) in f.items()} for f in everyone], weights)
        mean_a = weighted_average([{n: a for n, (_, a) in f.items()} for f in everyone], weights)
        mean_dw = weighted_average([{n: b @ a for n, (b, a) in f.items()} for f in everyone], weights)
        residual = self.model.residual()
        self.model.set_residual({n: residual[n] + mean_dw[n].to(residual[n].device) - (mean_b[n] @ mean_a[n]).to(residual[n].device) for n in own})
        self.model.set_lora({n: (mean_b[n], mean_a[n]) for n in own})

    def _similarity_average(self, foreign: list[Factors]) -> None:
        """Per layer: weights max(0, cos(ΔW_own, ΔW_j)) for the others, 1 for the own; A and B
        averaged with them."""
        own = self.upload()
        merged = {}
        for name, (b, a) in own.items():
            delta = (b @ a).flatten()
            sims = [max(0.0, float(F.cosine_similarity(delta, (fb @ fa).flatten(), dim=0))) for fb, fa in (f[name] for f in foreign)]
            weights = torch.tensor([1.0, *sims]) / (1.0 + sum(sims))
            everyone = [own, *foreign]
            merged[name] = (
                torch.stack([f[name][0] for f in everyone]).mul(weights[:, None, None]).sum(0),
                torch.stack([f[name][1] for f in everyone]).mul(weights[:, None, None]).sum(0),
            )
        self.model.set_lora(merged)

    def diagnostics(self) -> dict[str, object]:
        """The mean α per other client (over layers), when directions or updates are mixed."""
        if not self.model.alpha.numel():
            return {}
        return {"alpha_mean": [round(float(v), 4) for v in self.model.weights().detach().mean(0)]}

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """The learner's state plus α, its Adam moments, what was integrated and the residual."""
        state = dict(self.text.state_dict())
        state["fed.alpha"] = self.model.alpha.detach().to("cpu", copy=True)
        for j, factors in enumerate(self.model.foreign()):
            state.update({f"fed.foreign.{j}/{k}": v for k, v in as_tensors(factors).items()})
        state.update({f"fed.residual.{n}": r.detach().to("cpu", copy=True) for n, r in self.model.residual().items()})
        if self.alpha_optimizer is not None:
            for key, value in self.alpha_optimizer.state.get(self.model.alpha, {}).items():
                state[f"fed.alpha_optim.{key}"] = value.detach().to("cpu", copy=True)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith("fed.")}
        require("fed.alpha" in state, "state has no fed.alpha")
        alpha = state["fed.alpha"]
        layers = self.model.layer_names
        count = alpha.shape[1] if alpha.dim() == 2 else -1
        require(alpha.dim() == 2 and alpha.shape[0] == len(layers), "fed.alpha does not fit the model")
        foreign_tensors = [{k: state[f"fed.foreign.{j}/{k}"] for k in self.template if f"fed.foreign.{j}/{k}" in state} for j in range(count)]
        for tensors in foreign_tensors:
            check_like(tensors, self.template)
        self.text.load_state_dict(own)
        self.model.integrate([from_tensors(t, layers) for t in foreign_tensors], self.alpha_kind, self.sharing == "directions", self.opts.norm, alpha)
        residual = {n: state[f"fed.residual.{n}"] for n in layers if f"fed.residual.{n}" in state}
        if len(residual) == len(layers):
            self.model.set_residual(residual)
        moments = {k.removeprefix("fed.alpha_optim."): v for k, v in state.items() if k.startswith("fed.alpha_optim.")}
        self.alpha_optimizer = torch.optim.Adam([self.model.alpha], lr=self.opts.alpha_lr) if count > 0 else None
        if moments and self.alpha_optimizer is not None:
            self.alpha_optimizer.state[self.model.alpha] = {k: v.to(self.model.alpha.device) if k != "step" else v for k, v in moments.items()}


class RelayServer(CollectingServer):
    """Keeps each client's latest upload of the round and sends every client the others'.

    Uploads are checked against the factor shapes of the model template; the reply names each
    tensor ``<client>/<layer>.B|A`` and lists the clients and their training-pair counts in
    its meta, in configuration order.
    """

    def __init__(self, node_id: str, clients: Sequence[str], template: dict[str, Tensor], participation: Participation | None = None) -> None:
        super().__init__(node_id, clients, participation)
        self.template = template
        self._uploads: dict[str, tuple[dict[str, Tensor], int]] = {}

    def start_round(self, round_index: int) -> list[Send]:
        self._uploads = {}
        return super().start_round(round_index)

    def take(self, src: str, message: Message) -> None:
        count = example_count(message)
        check_like(message.tensors, self.template)
        self._uploads[src] = (message.tensors, count)

    def reply(self) -> list[Send]:
        sends = []
        for client in self.receivers():
            others = [c for c in self.clients if c in self._uploads and c != client]
            tensors = {f"{c}/{name}": t for c in others for name, t in self._uploads[c][0].items()}
            meta = {"clients": others, "num_examples": [self._uploads[c][1] for c in others]}
            sends.append(Send(client, Message(MessageKind.MODEL_GLOBAL, self._round, tensors, meta)))
        return sends


def _factor_template(ctx: BuildContext[FeDeciderOptions]) -> dict[str, Tensor]:
    model = ctx.template()
    if not isinstance(model, LoraTextEncoder):
        raise TypeError(f"{ctx.cfg.run.method} needs a LoraTextEncoder template, got {type(model).__name__}")
    return as_tensors({n: (b.detach(), a.detach()) for n, (b, a) in model.factors().items()})


def _client(ctx: BuildContext[FeDeciderOptions], node: str) -> Method:
    learner = ctx.learner(node)
    if not isinstance(learner, TextRecLearner):
        raise TypeError(f"{ctx.cfg.run.method} needs the text family's learner, got {type(learner).__name__}")
    opts = ctx.options
    return LoraSharingClient(node, learner, SERVER_ID, opts.sharing, opts, None, ctx.cfg.run.local_epochs, ctx.participation)


def _server(ctx: BuildContext[FeDeciderOptions]) -> Method:
    build = FedAvgServer if ctx.options.sharing == "average" else RelayServer
    return build(SERVER_ID, ctx.clients, _factor_template(ctx), ctx.participation)


FEDECIDER = register_method(
    MethodSpec(
        name="fedecider",
        summary="FeDecider: LoRA directions shared, magnitudes kept, personalised alpha",
        needs=frozenset({"text_encoder"}),
        options=FeDeciderOptions,
        build_client=_client,
        build_server=_server,
        flag_prefix="fedecider",
    )
)
register_method(FEDECIDER.variant("fedecider-nodecomp", "FeDecider ablation: whole LoRA updates shared and mixed (no decomposition)", {"sharing": "updates"}))
register_method(FEDECIDER.variant("fedecider-uniform", "FeDecider ablation: directions mixed with fixed uniform alpha", {"alpha": "uniform"}))
# The baselines take no options: FeDecider's defaults, pinned, so a flag meant for FeDecider is refused rather than ignored.
register_method(FEDECIDER.variant("lora-fedavg", "FedAvg of the LoRA factors A and B", FeDeciderOptions(sharing="average")))
register_method(
    FEDECIDER.variant("lora-fedavg-dw", "FedAvg of the LoRA updates Delta W = B A (exact, with a frozen residual)", FeDeciderOptions(sharing="average-dw"))
)
register_method(
    FEDECIDER.variant(
        "lora-similarity", "LoRA aggregated with layer-wise cosine-similarity weights (FeDecider Fig. 2 baseline)", FeDeciderOptions(sharing="similarity")
    )
)
