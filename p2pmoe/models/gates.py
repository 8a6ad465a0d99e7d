"""Gates: map features ``[N, d]`` to expert weights ``[N, E]`` whose rows sum to 1.

Every gate scores experts with one linear map ``proj`` (``nn.Linear(d, E)``). Row ``e`` of
``proj.weight`` is the direction in feature space that routes to expert ``e``; FedMoE-DA uses
these rows as expert proxies (Eq. 8), so ``gating_matrix()`` is part of every gate's contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Gate", "DenseGate", "TopKGate", "NoisyGate", "make_gate", "GATE_KINDS"]


def _top_k_softmax(logits: Tensor, k: int) -> Tensor:
    """Softmax over the ``k`` largest logits of each row, exact zeros elsewhere.

    Scattering the kept values (rather than masking at the k-th value) keeps exactly ``k``
    non-zeros per row even when logits tie.
    """
    values, index = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, values.softmax(dim=-1))


class Gate(nn.Module):
    """Base class: owns the scoring ``proj`` and exposes its rows as expert proxies."""

    def __init__(self, in_features: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"a gate needs at least one expert, got {num_experts}")
        self.proj = nn.Linear(in_features, num_experts, bias=bias)

    @property
    def in_features(self) -> int:
        return self.proj.in_features

    @property
    def num_experts(self) -> int:
        return self.proj.out_features

    def gating_matrix(self) -> Tensor:
        """A detached copy of ``proj.weight`` ``[E, d]``: row ``e`` is expert ``e``'s proxy."""
        return self.proj.weight.detach().clone()

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"top-k must be in [1, {self.num_experts}], got {k}")
        return k


class DenseGate(Gate):
    """``softmax(proj(x) / temperature)``: every expert gets a non-zero weight."""

    def __init__(self, in_features: int, num_experts: int, temperature: float = 1.0, bias: bool = False) -> None:
        super().__init__(in_features, num_experts, bias)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        return (self.proj(x) / self.temperature).softmax(dim=-1)


class TopKGate(Gate):
    """Softmax renormalised over each row's ``k`` best experts; the others get exactly 0.

    The zeros let ``MixtureOfExperts`` skip experts that no row of the batch selected.
    """

    def __init__(self, in_features: int, num_experts: int, k: int, bias: bool = False) -> None:
        super().__init__(in_features, num_experts, bias)
        self.k = self._check_k(k)

    def forward(self, x: Tensor) -> Tensor:
        return _top_k_softmax(self.proj(x), self.k)


class NoisyGate(Gate):
    """Noisy (top-k) gating after Shazeer et al. 2017.

    In training, logits get Gaussian noise with a learned per-expert scale
    ``noise_std * softplus(noise_proj(x))``, which spreads load across experts early on; in
    eval the gate is deterministic. ``noise_proj`` starts at zero like the paper's ``W_noise``.
    ``k=None`` keeps all experts (a noisy dense softmax, as SyNCRec's group gates use).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        noise_std: float = 1.0,
        k: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__(in_features, num_experts, bias)
        if noise_std < 0:
            raise ValueError(f"noise_std must be non-negative, got {noise_std}")
        self.noise_std = noise_std
        self.k = None if k is None else self._check_k(k)
        self.noise_proj = nn.Linear(in_features, num_experts, bias=False)
        nn.init.zeros_(self.noise_proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.proj(x)
        if self.training and self.noise_std > 0:
            scale = self.noise_std * F.softplus(self.noise_proj(x))
            logits = logits + torch.randn_like(logits) * scale
        if self.k is None:
            return logits.softmax(dim=-1)
        return _top_k_softmax(logits, self.k)


GATE_KINDS = ("dense", "topk", "noisy")


def make_gate(kind: str, in_features: int, num_experts: int, top_k: int | None = None) -> Gate:
    """Build a gate from a config string, so configs name gates instead of classes."""
    if kind == "dense":
        if top_k is not None:
            raise ValueError("a dense gate keeps every expert; use kind='topk' for top_k")
        return DenseGate(in_features, num_experts)
    if kind == "topk":
        if top_k is None:
            raise ValueError("kind='topk' needs top_k")
        return TopKGate(in_features, num_experts, top_k)
    if kind == "noisy":
        return NoisyGate(in_features, num_experts, k=top_k)
    raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {kind!r}")
