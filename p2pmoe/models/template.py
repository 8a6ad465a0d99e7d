"""PF-MSMTrec's parameter template: expert weights as global + task + scenario parts.

Every linear layer of a template expert holds three additive parts: ``glob`` (one for all
clients), ``task.<t>`` (one per task) and ``scen`` (this client's scenario). Task ``t`` runs
the expert with ``W = glob.W + task.<t>.W + scen.W`` (bias alike), so an MMoE built from
template experts computes one expert output per task. The task and scenario parts start at
zero: a fresh template expert computes exactly what a plain MLP with the ``glob`` weights
computes. A server tells the parts apart by name (`template_part`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TemplateExpert", "TemplateLinear", "template_part"]


class _Delta(nn.Module):
    """A zero-initialised additive weight and bias of a linear layer."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))


class TemplateLinear(nn.Module):
    """A linear layer whose weights are ``glob + task(t) + scen`` (see the module doc)."""

    def __init__(self, d_in: int, d_out: int, num_tasks: int) -> None:
        super().__init__()
        self.glob = nn.Linear(d_in, d_out)
        self.task = nn.ModuleList(_Delta(d_in, d_out) for _ in range(num_tasks))
        self.scen = _Delta(d_in, d_out)

    def weights(self, task: int) -> tuple[Tensor, Tensor]:
        """(weight, bias) that task `task`'s forward pass uses: the sum of the three parts."""
        part = self.task[task]
        assert isinstance(part, _Delta)
        return self.glob.weight + part.weight + self.scen.weight, self.glob.bias + part.bias + self.scen.bias

    def forward(self, x: Tensor, task: int) -> Tensor:
        return F.linear(x, *self.weights(task))


class TemplateExpert(nn.Module):
    """``d_in -> hidden[0] -> ... -> hidden[-1]`` with ReLU after every layer, per task."""

    def __init__(self, d_in: int, hidden: Sequence[int], num_tasks: int) -> None:
        super().__init__()
        sizes = [d_in, *hidden]
        self.layers = nn.ModuleList(TemplateLinear(a, b, num_tasks) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.out_features = sizes[-1]

    def forward(self, x: Tensor, task: int) -> Tensor:
        for layer in self.layers:
            x = F.relu(layer(x, task))
        return x


def template_part(name: str) -> tuple[str, int | None]:
    """Which template part a state entry belongs to: ("glob", None), ("task", t),
    ("scen", None), or ("other", None) for anything that is not a template expert weight."""
    pieces = name.split(".")
    for i, piece in enumerate(pieces[:-1]):
        if piece in ("glob", "scen") and i > 0 and pieces[i - 1].isdigit() and "layers" in pieces[:i]:
            return piece, None
        if piece == "task" and "layers" in pieces[:i] and pieces[i + 1].isdigit():
            return "task", int(pieces[i + 1])
    return "other", None
