"""Multi-gate mixture of experts (MMoE, Ma et al. 2018), the PF-MSMTrec client model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from p2pmoe.models.experts import MLP
from p2pmoe.models.gates import DenseGate
from p2pmoe.models.template import TemplateExpert

__all__ = ["MMoE"]


class MMoE(nn.Module):
    """Shared embeddings, ``E`` shared expert MLPs, one softmax gate and one tower per task.

    Input: categorical ids ``[B, Fc]`` (field ``i`` indexes ``embeddings.i``, ids in
    ``[0, cardinalities[i])``) and numerical features ``[B, Fn]`` (pre-scaled by the loader),
    concatenated into ``x`` of size ``Fc * embed_dim + Fn``. Task ``t``'s logit is
    ``towers.t(sum_e gates.t(x)_e * experts.e(x))``.

    Parameter names: ``embeddings.<field>.weight``, ``experts.<e>.linears.<layer>.*``,
    ``gates.<t>.proj.weight``, ``towers.<t>.linears.{0,1}.*``. Experts are plain ``MLP``
    modules so PF-MSMTrec can decompose their parameters into global, task and scenario parts.

    With ``template=True`` every expert is a `TemplateExpert` (``experts.<e>.layers.<l>.{glob,
    task.<t>,scen}.*``) and task ``t``'s gate mixes the experts run with task ``t``'s weights.
    With ``expert_norm=True`` each expert's output passes a BatchNorm (``norms.<e>.*``), the
    normalisation layers that classic FedBN keeps local.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_numerical: int,
        embed_dim: int,
        num_experts: int,
        expert_hidden: Sequence[int],
        num_tasks: int,
        tower_hidden: int,
        template: bool = False,
        expert_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_experts < 1 or num_tasks < 1:
            raise ValueError(f"need experts and tasks, got {num_experts} and {num_tasks}")
        if not expert_hidden:
            raise ValueError("expert_hidden needs at least one layer size")
        if not cardinalities and num_numerical == 0:
            raise ValueError("MMoE needs at least one categorical or numerical feature")
        self.embeddings = nn.ModuleList(nn.Embedding(c, embed_dim) for c in cardinalities)
        self.num_numerical = num_numerical
        d_in = len(cardinalities) * embed_dim + num_numerical
        self.template = template
        self.experts = nn.ModuleList((TemplateExpert(d_in, expert_hidden, num_tasks) if template else MLP(d_in, expert_hidden)) for _ in range(num_experts))
        self.norms = nn.ModuleList(nn.BatchNorm1d(expert_hidden[-1]) for _ in range(num_experts)) if expert_norm else None
        self.gates = nn.ModuleList(DenseGate(d_in, num_experts) for _ in range(num_tasks))
        self.towers = nn.ModuleList(MLP(expert_hidden[-1], [tower_hidden], 1) for _ in range(num_tasks))

    @property
    def num_tasks(self) -> int:
        return len(self.towers)

    def features(self, categorical: Tensor, numerical: Tensor | None = None) -> Tensor:
        """The shared input ``x`` ``[B, Fc * embed_dim + Fn]``."""
        parts = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        if self.num_numerical:
            if numerical is None or numerical.shape[-1] != self.num_numerical:
                raise ValueError(f"expected {self.num_numerical} numerical features")
            parts.append(numerical.to(next(self.gates.parameters()).dtype))
        return torch.cat(parts, dim=-1)

    def forward(self, categorical: Tensor, numerical: Tensor | None = None) -> Tensor:
        """Logits ``[B, T]`` (apply sigmoid for probabilities; train with BCE-with-logits)."""
        x = self.features(categorical, numerical)
        shared = None if self.template else self._expert_outputs(x, None)
        logits = [
            tower(torch.einsum("be,beh->bh", gate(x), self._expert_outputs(x, t) if shared is None else shared)).squeeze(-1)
            for t, (gate, tower) in enumerate(zip(self.gates, self.towers, strict=True))
        ]
        return torch.stack(logits, dim=-1)

    def _expert_outputs(self, x: Tensor, task: int | None) -> Tensor:
        """``[B, E, h]``: every expert on ``x`` (template experts with task `task`'s weights)."""
        outs = [expert(x, task) if self.template else expert(x) for expert in self.experts]
        if self.norms is not None:
            outs = [norm(out) for norm, out in zip(self.norms, outs, strict=True)]
        return torch.stack(outs, dim=1)
