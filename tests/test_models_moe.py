"""Gates, experts, the mixture, the FedMoE-DA classifier and its CNN embedder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from p2pmoe.models import (
    MLP,
    CNNEmbedder,
    DenseGate,
    MixtureOfExperts,
    MLPExpert,
    MoEClassifier,
    NoisyGate,
    TopKGate,
    make_gate,
)

D, E = 8, 4


def test_top_k_gate_keeps_exactly_k_best_experts() -> None:
    torch.manual_seed(0)
    gate = TopKGate(D, 6, k=2)
    x = torch.randn(32, D)
    w = gate(x)
    assert ((w > 0).sum(dim=1) == 2).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(32))
    best = gate.proj(x).topk(2, dim=1).indices.sort(dim=1).values
    assert torch.equal(w.nonzero()[:, 1].view(32, 2), best)


def test_dense_gate_temperature_flattens() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, D)
    sharp, flat = DenseGate(D, E), DenseGate(D, E, temperature=10.0)
    flat.load_state_dict(sharp.state_dict())
    ws, wf = sharp(x), flat(x)
    torch.testing.assert_close(ws.sum(dim=1), torch.ones(16))
    assert (ws > 0).all()
    assert (wf.max(dim=1).values < ws.max(dim=1).values).all()


def test_noisy_gate_adds_noise_only_in_training() -> None:
    torch.manual_seed(0)
    gate = NoisyGate(D, E, k=2)
    x = torch.randn(16, D)
    assert not torch.equal(gate(x), gate(x))
    assert ((gate(x) > 0).sum(dim=1) == 2).all()
    gate.eval()
    clean = torch.zeros(16, E).scatter(1, gate.proj(x).topk(2).indices, gate.proj(x).topk(2).values.softmax(1))
    torch.testing.assert_close(gate(x), clean)


@pytest.mark.parametrize("gate", [DenseGate(D, E), TopKGate(D, E, 2), NoisyGate(D, E)])
def test_gating_matrix_is_a_copy_of_the_proj_rows(gate: DenseGate) -> None:
    proxies = gate.gating_matrix()
    assert (gate.num_experts, gate.in_features) == (E, D)
    assert torch.equal(proxies, gate.proj.weight)
    proxies.zero_()
    assert gate.proj.weight.abs().sum() > 0


def test_make_gate_validates() -> None:
    assert isinstance(make_gate("topk", D, E, 1), TopKGate)
    for kind, k in [("topk", None), ("dense", 2), ("topk", E + 1), ("switch", None)]:
        with pytest.raises(ValueError):
            make_gate(kind, D, E, k)


def test_mlp_names_do_not_depend_on_dropout() -> None:
    plain, dropped = MLP(4, [8, 8], 2), MLP(4, [8, 8], 2, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    assert list(MLPExpert(4, 8, 2).state_dict()) == ["linears.0.weight", "linears.0.bias", "linears.1.weight", "linears.1.bias"]


def make_moe(gate: nn.Module) -> MixtureOfExperts:
    return MixtureOfExperts(gate, [MLPExpert(D, 16, 3) for _ in range(E)])


@pytest.mark.parametrize("k", [None, 1, 3])
def test_mixture_is_the_weighted_sum_of_experts(k: int | None) -> None:
    torch.manual_seed(0)
    moe = make_moe(DenseGate(D, E) if k is None else TopKGate(D, E, k))
    x = torch.randn(2, 5, D)  # leading dims are flattened and restored
    out = moe(x)
    w = moe.gate(x.view(10, D))
    expected = sum(w[:, e, None] * moe.expert(e)(x.view(10, D)) for e in range(E))
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out.view(10, 3), expected)
    torch.testing.assert_close(moe.last_weights, w.detach())


def test_unselected_experts_are_not_evaluated() -> None:
    gate = TopKGate(D, E, k=1)
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.weight[0] = 1.0  # positive features route to expert 0 only
    moe = make_moe(gate)
    calls = [0] * E
    for e in range(E):
        moe.expert(e).register_forward_hook(lambda *_, e=e: calls.__setitem__(e, calls[e] + 1))
    moe(torch.rand(6, D))
    assert calls == [1, 0, 0, 0]


def test_expert_state_round_trip_and_copy_semantics() -> None:
    torch.manual_seed(0)
    a, b = make_moe(DenseGate(D, E)), make_moe(DenseGate(D, E))
    x = torch.randn(4, D)
    expected = a.expert(1)(x).detach()
    state = a.expert_state(1)
    with torch.no_grad():
        a.expert(1).linears[0].weight.add_(1.0)  # later training must not change the copy
    b.load_expert_state(2, state)
    torch.testing.assert_close(b.expert(2)(x), expected)


@pytest.mark.parametrize("corrupt", ["shape", "missing", "extra"])
def test_load_expert_state_rejects_mismatch_and_changes_nothing(corrupt: str) -> None:
    moe = make_moe(DenseGate(D, E))
    before = moe.expert_state(0)
    state = {k: v + 1 for k, v in before.items()}
    if corrupt == "shape":
        state["linears.1.weight"] = torch.zeros(4, 16)
    elif corrupt == "missing":
        del state["linears.1.bias"]
    else:
        state["linears.2.weight"] = torch.zeros(1)
    with pytest.raises(ValueError):
        moe.load_expert_state(0, state)
    after = moe.expert_state(0)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mixture_rejects_wrong_expert_count() -> None:
    with pytest.raises(ValueError):
        MixtureOfExperts(DenseGate(D, E), [MLPExpert(D, 4, 2)])


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_moe_classifier_names_and_shapes(channels: int, size: int) -> None:
    model = MoEClassifier(CNNEmbedder(channels, 32, size), 32, E, 16, 10, gate="topk", top_k=2)
    logits = model(torch.randn(5, channels, size, size))
    assert logits.shape == (5, 10)
    names = [n for n, _ in model.named_parameters()]
    phi = {n.split(".")[1] for n in names if n.startswith("embedder.")}
    head = {n for n in names if not n.startswith("embedder.")}
    layers = [f"linears.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
    experts = {f"moe.experts.{e}.{layer}" for e in range(E) for layer in layers}
    assert phi == {"conv1", "conv2", "fc"}
    assert head == {"moe.gate.proj.weight"} | experts
    assert model.moe.gating_matrix().shape == (E, 32)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_cnn_evaluation_path_gives_bit_identical_features(channels: int, size: int, batch: int) -> None:
    """Without autograd the CNN pools through a channels-last copy (faster on one channel);
    the features must equal the training path's to the last bit, ties in the pooling windows
    (a quantised image has many) included."""
    torch.manual_seed(batch)
    embedder = CNNEmbedder(channels, 32, size)
    x = torch.randint(0, 4, (batch, channels, size, size)).float() / 3
    with_autograd = embedder(x).detach()
    with torch.inference_mode():
        without = embedder(x)
    assert torch.equal(with_autograd, without)
