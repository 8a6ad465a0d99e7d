"""FedAvg over the whole model: the byte-count baseline every other method is compared to.

The server is one more node: it waits for every live client's weights, averages them weighted
by the client's number of training examples and sends the average back to every client. Under
partial participation it averages exactly the sampled clients' weights and sends the average to
the clients sampled for the next round (`p2pmoe.methods.server`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from p2pmoe.methods import robust
from p2pmoe.methods.base import Learner, Method
from p2pmoe.methods.privacy import dp_mean, epsilon
from p2pmoe.methods.registry import BuildContext, MethodSpec, register_method
from p2pmoe.methods.robust import Rule
from p2pmoe.methods.server import CollectingServer, ServerClient, example_count
from p2pmoe.models.params import float_state, load_float_state
from p2pmoe.naming import SERVER_ID
from p2pmoe.options import Options, option
from p2pmoe.participation import Participation
from p2pmoe.seeds import node_stream
from p2pmoe.settings import ExperimentConfig
from p2pmoe.wire.codec import check_like
from p2pmoe.wire.messages import Message, MessageKind, Send


class FedAvgClient(ServerClient):
    """Trains locally, uploads its floating-point weights, adopts the server's average.

    `prefix` limits what is shared to the state entries whose names start with it (FedSASRec
    shares only ``encoder.``); everything else stays local.
    """

    def __init__(
        self,
        node_id: str,
        learner: Learner,
        server_id: str,
        local_epochs: int = 1,
        prefix: str = "",
        participation: Participation | None = None,
        finetune_epochs: int = 0,
    ) -> None:
        super().__init__(node_id, learner, server_id, local_epochs, participation, finetune_epochs)
        self.prefix = prefix

    def model_update(self, round_index: int) -> Message:
        return Message(
            MessageKind.MODEL_UPDATE,
            round_index,
            float_state(self.learner.model, self.prefix),
            {"num_examples": self.learner.num_train_examples},
        )

    def adopt(self, message: Message) -> None:
        load_float_state(self.learner.model, message.tensors, self.prefix)


MEAN = Rule("mean")


class FedAvgServer(CollectingServer):
    """Collects client weights for a round and broadcasts their weighted average."""

    def __init__(
        self,
        node_id: str,
        clients: Sequence[str],
        template: dict[str, torch.Tensor],
        participation: Participation | None = None,
        rule: Rule = MEAN,
        dp: tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(node_id, clients, participation)
        self.rule = rule
        self.dp = dp  # (clip S, noise multiplier sigma): DP-FedAvg, see p2pmoe/methods/privacy.py
        self._noise = torch.Generator().manual_seed(seed)
        self.global_state = {name: t.clone() for name, t in template.items()}
        self._updates: dict[str, tuple[dict[str, torch.Tensor], int]] = {}

    def start_round(self, round_index: int) -> list[Send]:
        self._updates = {}
        return super().start_round(round_index)

    def take(self, src: str, message: Message) -> None:
        count = example_count(message)
        check_like(message.tensors, self.global_state)
        self._updates[src] = (message.tensors, count)

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], counts: Sequence[int]) -> dict[str, torch.Tensor]:
        """The new global state from the round's uploads (in client order) and their example
        counts: FedAvg's weighted mean, or the robust rule of `--fedavg-aggregation` (issue 30).
        A subclass with another rule overrides only this (see examples/median_fedavg.py)."""
        if self.dp is not None:
            return dp_mean(states, self.global_state, *self.dp, self._noise)
        return robust.aggregate(self.rule, states, counts, self.global_state)

    def reply(self) -> list[Send]:
        states, counts = zip(*(self._updates[c] for c in sorted(self._updates)), strict=True)  # client order, not arrival
        self.global_state = self.aggregate(states, counts)
        message = Message(MessageKind.MODEL_GLOBAL, self._round, self.global_state)
        return [Send(client, message) for client in self.receivers()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.global_state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_like(state, self.global_state)
        self.global_state = dict(state)


@dataclass(frozen=True)
class FedAvgOptions(Options):
    """How the server aggregates: the mean (FedAvg) or a rule that no few clients can drag."""

    section: ClassVar[str] = "method"

    aggregation: str = option(
        "mean",
        "mean (FedAvg), median (coordinate-wise), trimmed:BETA (trimmed mean), krum:F or krum:F:M (multi-Krum, F tolerated attackers) "
        "or clip:TAU (centred clipping around the current model); see docs/methods.md",
    )

    dp_clip: float | None = option(
        None, "client-level DP (DP-FedAvg): clip each client's update to this norm S (needs dp_noise > 0 and aggregation mean)", above=0
    )
    dp_noise: float = option(0.0, "client-level DP: Gaussian noise multiplier sigma, the server adds N(0, (sigma S)^2) to the clipped sum", minimum=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        robust.parse_rule(self.aggregation)
        if (self.dp_clip is None) != (self.dp_noise == 0):
            raise ValueError("[method] dp_clip and dp_noise go together (DP-FedAvg): set both or neither")
        if self.dp_clip is not None and self.aggregation != "mean":
            raise ValueError("[method] client-level DP is accounted for the mean only: leave aggregation at mean")


@dataclass(frozen=True)
class FineTuneOptions(FedAvgOptions):
    """FedAvg-FT, the personalised-FL baseline "FedAvg + local fine-tuning": every client
    evaluates the global model after k local epochs on its own data. Project decision: the
    fine-tuned copy is dropped after evaluation, so training is FedAvg's exactly and only what
    is scored differs (the fine-tuning's examples are counted in the run's compute)."""

    section: ClassVar[str] = "method"

    finetune_epochs: int = option(1, "local epochs on a copy of the model before each evaluation", minimum=1)


def build_client(ctx: BuildContext[Any], node: str, finetune_epochs: int = 0) -> Method:
    """A FedAvg client (FedAvg-FT's with its fine-tuning epochs); plugins with another server rule reuse it."""
    return FedAvgClient(node, ctx.learner(node), SERVER_ID, ctx.cfg.run.local_epochs, participation=ctx.participation, finetune_epochs=finetune_epochs)


def _finetuning_client(ctx: BuildContext[FineTuneOptions], node: str) -> Method:
    return build_client(ctx, node, ctx.options.finetune_epochs)


AggregatingOptions = TypeVar("AggregatingOptions", bound=FedAvgOptions)


def _server(ctx: BuildContext[AggregatingOptions]) -> Method:
    opts = ctx.options
    dp = (opts.dp_clip, opts.dp_noise) if opts.dp_clip is not None else None
    rule = robust.parse_rule(opts.aggregation)
    return FedAvgServer(
        SERVER_ID, ctx.clients, float_state(ctx.template()), ctx.participation, rule, dp, seed=node_stream(ctx.cfg.run.seed, "attack", len(ctx.clients))
    )


def privacy_spent(opts: FedAvgOptions, cfg: ExperimentConfig) -> dict[str, Any]:
    """summary.json's `privacy`: ε at δ = 1/n after the run's rounds (none without DP)."""
    if opts.dp_clip is None:
        return {}
    delta = 1 / cfg.run.nodes
    # no amplification by subsampling is claimed: the round's sample is a public function of
    # the run's seed (every node computes it), not a secret draw, so each round counts in full
    spent = epsilon(opts.dp_noise, 1.0, cfg.run.rounds, delta)
    return {"privacy": {"epsilon": spent, "delta": delta, "noise_multiplier": opts.dp_noise, "clip": opts.dp_clip, "accountant": "RDP (dp-accounting)"}}


register_method(
    MethodSpec(
        name="fedavg",
        summary="the whole model averaged by a server, weighted by training examples (the byte baseline)",
        needs=frozenset({"whole_model"}),
        options=FedAvgOptions,
        flag_prefix="fedavg",
        build_client=build_client,
        build_server=_server,
        summary_extra=privacy_spent,
    )
)
register_method(
    MethodSpec(
        name="fedavg-ft",
        summary="FedAvg, each client scoring the global model after k local epochs on its own data (personalised-FL baseline)",
        needs=frozenset({"whole_model"}),
        options=FineTuneOptions,
        flag_prefix="fedavg",
        build_client=_finetuning_client,
        build_server=_server,
        summary_extra=privacy_spent,
    )
)
