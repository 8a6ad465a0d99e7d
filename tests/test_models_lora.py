"""LoRA: starts as the base, its update is delta_weight, the base stays frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p2pmoe.models import LoRALinear, apply_lora


def test_zero_b_equals_base() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 6)
    assert torch.equal(lora(x), base(x))
    assert lora.lora_A.shape == (2, 6) and lora.lora_B.shape == (5, 2)
    assert lora.lora_A.abs().sum() > 0


def test_delta_weight_is_the_effective_weight_change() -> None:
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(6, 5), rank=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    delta = lora.delta_weight()
    torch.testing.assert_close(delta, 2.0 * lora.lora_B @ lora.lora_A)
    x = torch.randn(4, 6)
    torch.testing.assert_close(lora(x), F.linear(x, lora.base.weight + delta, lora.base.bias))


def test_base_is_frozen_and_factors_train() -> None:
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(6, 5), rank=2)
    with torch.no_grad():
        lora.lora_B.normal_()
    lora(torch.randn(4, 6)).sum().backward()
    assert lora.base.weight.grad is None and lora.base.bias.grad is None
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.subquery = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x) + self.key(x) + self.value(x) + self.subquery(x)


def test_apply_lora_wraps_named_layers_in_place() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Attention(), nn.ReLU(), Attention())
    x = torch.randn(2, 4)
    before = model(x)
    replaced = apply_lora(model, ["query", "value"], rank=2, alpha=2.0)
    assert replaced == ["0.query", "0.value", "2.query", "2.value"]
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in replaced)
    assert isinstance(model[0].subquery, nn.Linear) and isinstance(model[0].key, nn.Linear)
    assert model[0].key.weight.requires_grad  # only wrapped layers are frozen
    torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(model, ["ery"], rank=2)
