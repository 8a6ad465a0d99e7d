"""A gated mixture of experts and the per-node FedMoE-DA classifier built on it.

Experts are addressed by slot so that a method can ship one expert at a time: a peer asks for
``(node, slot)``, gets ``expert_state(slot)`` and the receiver checks it against its own
expert before ``load_expert_state`` touches anything.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from p2pmoe.models.experts import MLPExpert
from p2pmoe.models.gates import Gate, make_gate

__all__ = ["ExpertSlots", "MixtureOfExperts", "MoEClassifier", "slot_candidate_losses"]


class ExpertSlots(nn.Module):
    """The MoE-layer contract FedMoE-DA works on: experts addressed by slot in ``experts`` and
    a gating matrix whose row ``e`` is expert ``e``'s proxy. Any model whose ``moe`` is one
    (the image classifier's ``MixtureOfExperts``, SyNCRec's ACMoE) can share its experts."""

    experts: nn.ModuleList

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def gating_matrix(self) -> Tensor:
        """The expert proxies ``[E, d']``, one row per slot."""
        raise NotImplementedError

    def expert(self, slot: int) -> nn.Module:
        return self.experts[slot]

    def expert_state(self, slot: int) -> dict[str, Tensor]:
        """A detached CPU copy of expert ``slot``'s state: later training cannot change it."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.experts[slot].state_dict().items()}

    def load_expert_state(self, slot: int, state: Mapping[str, Tensor]) -> None:
        """Overwrite expert ``slot`` in place, all or nothing.

        Raises ``ValueError`` if names or shapes differ from the expert's own, before any
        tensor is written, so a bad peer message leaves the model untouched. Values are cast to
        the expert's dtype.
        """
        own = self.experts[slot].state_dict()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"expert {slot} state: missing {missing}, unexpected {extra}")
        for name, tensor in own.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"expert {slot} state {name!r}: shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state[name])


class MixtureOfExperts(ExpertSlots):
    """``y = sum_e p_e(x) * f_e(x)`` with ``p = gate(x)``.

    Features may carry any leading dims (``[..., d]``); the gate sees them flattened to rows.
    An expert whose weight is zero for a row is not evaluated on that row, and one that no row
    selected is not evaluated at all, so sparse gates save compute.
    ``last_weights`` keeps the gate output of the latest forward (detached, ``[N, E]``) for
    load-balancing statistics.
    """

    def __init__(self, gate: Gate, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(experts) != gate.num_experts:
            raise ValueError(f"gate routes to {gate.num_experts} experts, got {len(experts)}")
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        self.last_weights: Tensor | None = None

    def gating_matrix(self) -> Tensor:
        """The gate's expert proxies ``[E, d]`` (see ``Gate.gating_matrix``)."""
        return self.gate.gating_matrix()

    def forward(self, features: Tensor) -> Tensor:
        lead = features.shape[:-1]
        x = features.reshape(-1, features.shape[-1])
        weights = self.gate(x)
        self.last_weights = weights.detach()
        active = weights > 0
        rows_per_expert = active.sum(dim=0).tolist()
        out: Tensor | None = None
        for slot, (expert, n_rows) in enumerate(zip(self.experts, rows_per_expert, strict=True)):
            if n_rows == x.shape[0]:  # first, so an empty batch still yields [0, d_out]
                y = weights[:, slot, None] * expert(x)
                out = y if out is None else out + y
                continue
            if n_rows == 0:
                continue
            rows = active[:, slot].nonzero().squeeze(1)
            y = weights[rows, slot, None] * expert(x[rows])
            if out is None:
                out = y.new_zeros(x.shape[0], y.shape[-1])
            out = out.index_add(0, rows, y)
        if out is None:  # no expert active on any row: gate weights that are not numbers (NaN)
            # No assert on a data path: a poisoned model must give a loss the node can see and
            # roll back from (`LearnerMethod`), not kill the process.
            out = sum((weights[:, slot, None] * expert(x) for slot, expert in enumerate(self.experts)), start=torch.zeros(()))
        return out.reshape(*lead, out.shape[-1])


@torch.no_grad()
def slot_candidate_losses(moe: MixtureOfExperts, features: Tensor, targets: Tensor, slot: int, candidates: Sequence[Mapping[str, Tensor]]) -> list[float]:
    """The mixture's cross-entropy on (features, targets) with expert `slot` replaced by each
    candidate state in turn, every other expert and the gate as they are. The other experts'
    share is computed once; each candidate costs one expert forward (on a scratch copy, so the
    model is never touched)."""
    weights = moe.gate(features)
    outputs = [expert(features) for expert in moe.experts]
    rest = sum(weights[:, j, None] * out for j, out in enumerate(outputs) if j != slot)
    scratch = copy.deepcopy(moe.experts[slot])
    losses = []
    for state in candidates:
        scratch.load_state_dict({k: v.to(features.device) for k, v in state.items()})
        logits = rest + weights[:, slot, None] * scratch(features)
        losses.append(float(nn.functional.cross_entropy(logits, targets)))
    return losses


class MoEClassifier(nn.Module):
    """The per-node FedMoE-DA model: ``logits = moe(embedder(x))``.

    Parameter names are stable for the wire and for aggregation: ``embedder.*`` (phi),
    ``moe.gate.proj.weight`` (the gating matrix, ``[E, embed_dim]``) and
    ``moe.experts.<slot>.linears.{0,1}.{weight,bias}`` (the ``MLPExpert`` heads).
    ``gate`` is ``"dense"``, ``"topk"`` (needs ``top_k``) or ``"noisy"``.
    """

    def __init__(
        self,
        embedder: nn.Module,
        embed_dim: int,
        num_experts: int,
        expert_hidden: int,
        num_classes: int,
        gate: str = "dense",
        top_k: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedder = embedder
        self.moe = MixtureOfExperts(
            make_gate(gate, embed_dim, num_experts, top_k),
            [MLPExpert(embed_dim, expert_hidden, num_classes) for _ in range(num_experts)],
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.moe(self.embedder(x))
