"""Low-rank adapters (LoRA) on frozen linear layers, for FeDecider.

FeDecider splits each adapter's update ``delta_weight() = scaling * B @ A`` into magnitude and
direction, so the update must be readable as one matrix; the factors stay separate
parameters because directions travel as low-rank factors, never as ``d_out x d_in``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoRALinear", "apply_lora"]


class LoRALinear(nn.Module):
    """``y = base(x) + scaling * B(A(dropout(x)))`` with ``scaling = alpha / rank``.

    ``base`` is frozen in place (its parameters get ``requires_grad=False``). ``lora_A``
    ``[rank, d_in]`` starts Kaiming-uniform and ``lora_B`` ``[d_out, rank]`` at zero, so the
    wrapped layer starts out equal to ``base``. Parameter names: ``base.weight``,
    ``base.bias``, ``lora_A``, ``lora_B``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = dropout
        weight = base.weight
        self.lora_A = nn.Parameter(weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> Tensor:
        """The update added to ``base.weight``: ``scaling * B @ A``, ``[d_out, d_in]``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0.0 else x
        return self.base(x) + self.scaling * F.linear(F.linear(h, self.lora_A), self.lora_B)


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    module: nn.Module,
    target_names: Sequence[str],
    rank: int,
    alpha: float = 1.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap, in place, every ``nn.Linear`` in ``module`` whose dotted name ends with a target.

    A target matches whole name components (``"query"`` matches ``layer.0.attention.query``,
    not ``layer.0.subquery``). Only the wrapped layers are frozen; freezing the rest of the
    backbone is the caller's choice. Returns the wrapped names in module order, and raises
    ``ValueError`` when nothing matched, which almost always means a misspelt target.
    """
    found = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and name and _matches(name, target_names)]
    if not found:
        raise ValueError(f"no nn.Linear in the module matches {list(target_names)}")
    for name in found:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return found
