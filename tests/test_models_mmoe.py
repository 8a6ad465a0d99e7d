"""MMoE: shapes, parameter layout, and that every expert learns."""

from __future__ import annotations

import pytest
import torch

from p2pmoe.models import MMoE


def make_mmoe(num_numerical: int = 3) -> MMoE:
    torch.manual_seed(0)
    return MMoE([5, 7], num_numerical, embed_dim=4, num_experts=3, expert_hidden=[16, 8], num_tasks=2, tower_hidden=6)


def batch(n: int = 10, num_numerical: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    categorical = torch.stack([torch.randint(0, 5, (n,)), torch.randint(0, 7, (n,))], dim=1)
    return categorical, torch.randn(n, num_numerical)


def test_logits_per_task_and_gradients_reach_every_expert() -> None:
    model = make_mmoe()
    logits = model(*batch())
    assert logits.shape == (10, 2)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(10, 2)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_each_task_has_its_own_gate_and_tower() -> None:
    model = make_mmoe()
    categorical, numerical = batch()
    before = model(categorical, numerical).detach()
    with torch.no_grad():
        model.towers[1].linears[-1].bias.add_(1.0)
    after = model(categorical, numerical).detach()
    torch.testing.assert_close(after[:, 0], before[:, 0])
    torch.testing.assert_close(after[:, 1], before[:, 1] + 1.0)


def test_parameter_layout() -> None:
    names = {n for n, _ in make_mmoe().named_parameters()}
    assert {"embeddings.0.weight", "embeddings.1.weight", "gates.1.proj.weight", "experts.2.linears.1.weight", "towers.0.linears.1.bias"} <= names
    assert not any(n.startswith("experts.") and "linears.2" in n for n in names)  # no output layer


def test_categorical_only_and_bad_numerical() -> None:
    model = make_mmoe(num_numerical=0)
    categorical, _ = batch()
    assert model(categorical).shape == (10, 2)
    with pytest.raises(ValueError):
        make_mmoe()(categorical, torch.randn(10, 2))
