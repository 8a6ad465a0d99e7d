"""FMoE-CDSR client model: frozen experts, stop-gradient mixture, masking, graph layer, VAE, KL."""

from __future__ import annotations

import random

import pytest
import torch

from p2pmoe.data.sequences import DomainSequences
from p2pmoe.learners.sequential import NextItemLearner, SequenceBatcher
from p2pmoe.models.fmoe_cdsr import FMoECDSR, graph_product, nt_xent, transition_adjacency

N, K, L, D = 20, 3, 5, 8


def domain(seed: int = 0) -> DomainSequences:
    rng = random.Random(seed)

    def draw(n: int, lo: int) -> list[list[int]]:
        return [[rng.randrange(N) for _ in range(rng.randint(lo, 7))] for _ in range(n)]

    train, valid, test = draw(24, 2), draw(5, 3), draw(5, 3)
    return DomainSequences("toy", N, train, valid, test, [0] * 24, [0] * 5, [0] * 5)


def model(data: DomainSequences | None = None, c: int = 0, **options) -> FMoECDSR:
    data = data or domain()
    torch.manual_seed(0)
    return FMoECDSR(N, K, c, transition_adjacency(data.train, N), max_len=L, hidden=D, heads=2, blocks=1, gate_hidden=(16, 8), **options)


def batch(data: DomainSequences):
    return SequenceBatcher(N, L).training([s for s in data.train if len(s) > 1])


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, module.parameters(), strict=True))


def test_foreign_experts_stay_frozen_through_local_training():
    data = domain()
    m = model(data)
    m.set_expert_state(1, model(domain(1), c=1).expert_state(1))
    learner = NextItemLearner(m, data, max_len=L, batch_size=8, num_negatives=5)
    held = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert not held & {id(p) for i in (1, 2) for p in m.experts[i].parameters()}
    before = {name: params(module) for name, module in [("own", m.experts[0]), ("e1", m.experts[1]), ("b1", m.branches[1])]}
    learner.train(2)
    assert same(before["e1"], m.experts[1])
    assert not same(before["own"], m.experts[0])
    assert not same(before["b1"], m.branches[1])  # adaptation parameters of a foreign branch do train


def test_mixture_loss_trains_only_the_gate():
    data = domain()
    m = model(data)
    m.set_expert_state(2, m.expert_state(2))
    m.experts[2].requires_grad_(True)  # even a trainable expert must get nothing from CE(ℓ_moe)
    m.loss_terms(batch(data))["ce_moe"].backward()
    for part in (*m.experts, *m.branches):
        assert all(p.grad is None or not p.grad.any() for p in part.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.gate.parameters())


def test_unavailable_branch_gets_zero_weight_and_changes_nothing():
    data = domain()
    m = model(data).eval()
    m.set_expert_state(1, m.expert_state(1))
    inputs = SequenceBatcher(N, L).evaluation(data.test)[0]
    weights = m.gate_weights(inputs)
    assert torch.all(weights[:, 2] == 0) and torch.all(weights[:, :2] > 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(inputs)))
    candidates = torch.arange(N).repeat(len(inputs), 1)
    before = m.score_candidates(inputs, candidates)
    with torch.no_grad():
        m.branches[2].head.weight.fill_(1e3)
        m.experts[2].mu.final_norm.bias.fill_(1e3)
    torch.testing.assert_close(m.score_candidates(inputs, candidates), before)
    assert set(m.loss_terms(batch(data))) == {"ce", "ce_moe", "contrastive"}  # no KL term by default
    assert set(model(data, vae=True).loss_terms(batch(data))) == {"ce", "ce_moe", "kl", "contrastive"}


def test_uniform_gate_and_batch_pooling():
    data = domain()
    inputs = SequenceBatcher(N, L).evaluation(data.test)[0]
    uniform = model(data, gate="uniform")
    uniform.set_expert_state(1, uniform.expert_state(1))
    assert uniform.gate is None
    torch.testing.assert_close(uniform.gate_weights(inputs), torch.tensor([[0.5, 0.5, 0.0]]))
    uniform.loss(batch(data))
    pooled = model(data, gate_pooling="batch").eval()
    assert pooled.gate_weights(inputs).shape == (1, K)
    for pooling in ("batch", "position"):
        loss, _ = model(data, gate_pooling=pooling).loss(batch(data))
        assert torch.isfinite(loss)


def test_graph_layer_on_a_hand_example():
    adjacency = transition_adjacency([[0, 1], [0, 2], [1, 2]], num_items=3)
    expected = torch.tensor([[0, 0.5, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(adjacency.to_dense(), expected)
    m = FMoECDSR(3, 2, 0, adjacency, max_len=L, hidden=2, heads=1, blocks=1, gate_hidden=(4, 4))
    branch = m.branches[0]
    with torch.no_grad():
        branch.item_emb.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [2, 2], [0, 0]]))
        branch.graph_bias.copy_(torch.tensor([1.0, -1]))
    # H = (E + A·E + b) / 2, and the encoder input takes H + E.
    h = torch.tensor([[1.5, 0.25], [1.5, 1], [1.5, 0.5], [0.5, -0.5]])
    torch.testing.assert_close(branch.item_table(m.adjacency), h + branch.item_emb.weight)


def test_vae_off_has_no_sigma_stack():
    lean, full = model(vae=False), model(vae=True)
    assert lean.experts[0].logvar is None
    assert all(name.startswith("mu.") for name in lean.expert_state(0))
    assert {n for n in full.expert_state(0) if n.startswith("logvar.")}
    count = lambda m: sum(t.numel() for t in m.expert_state(0).values())  # noqa: E731
    assert count(full) == 2 * count(lean)
    assert "kl" not in lean.loss_terms(batch(domain())) and lean.kl_weight() == 0.0


def test_kl_weight_anneals_to_the_cap_counting_training_steps():
    assert model().kl_weight() == 0.0 and model(vae=True).vae  # the default has no KL term
    m = model(vae=True, kl_anneal_steps=100)
    assert m.kl_weight() == 0.0
    b = batch(domain())
    m.loss(b)
    m.loss(b)
    assert int(m.step) == 2 and m.kl_weight() == pytest.approx(0.02)
    m.eval()
    m.loss(b)
    assert int(m.step) == 2  # evaluation does not count
    m.step.fill_(50)
    assert m.kl_weight() == pytest.approx(0.5)
    m.step.fill_(10_000)
    assert m.kl_weight() == 1.0
    assert model(vae=True, kl_cap=0.2, kl_anneal_steps=100).kl_weight() == 0.0
    capped = model(vae=True, kl_cap=0.2, kl_anneal_steps=100)
    capped.step.fill_(90)
    assert capped.kl_weight() == pytest.approx(0.2)


def test_set_expert_state_checks_everything_before_changing_anything():
    m = model()
    good = m.expert_state(1)
    before = params(m.experts[1])
    name = next(iter(good))
    for bad in (
        {**good, name: torch.zeros(3)},
        {**good, name: good[name].double()},
        {k: v for k, v in good.items() if k != name},
        {**good, "extra": torch.zeros(1)},
        {**good, name: torch.full_like(good[name], float("nan"))},
    ):
        with pytest.raises(ValueError):
            m.set_expert_state(1, bad)
    assert same(before, m.experts[1]) and not bool(m.available[1])


def test_contrastive_view_permutes_items_and_keeps_padding():
    m = model()
    b = batch(domain())
    permuted = m._permuted(b.inputs, b.pad_mask)
    assert torch.equal(permuted == N, b.pad_mask)
    assert torch.equal(permuted.sort(dim=1).values, b.inputs.sort(dim=1).values)


def test_nt_xent_is_symmetric_and_rewards_aligned_views():
    torch.manual_seed(0)
    a, b = torch.randn(6, D), torch.randn(6, D)
    torch.testing.assert_close(nt_xent(a, b), nt_xent(b, a))
    assert nt_xent(a, a * 2) < nt_xent(a, b)
    assert nt_xent(a[:1], b[:1]) == 0  # one pair: the partner is the only candidate


def test_tied_head_scores_with_the_item_embeddings_and_trains_them():
    data = domain()
    m = model(data, head="tied")
    assert all(branch.head is None for branch in m.branches)
    inputs = SequenceBatcher(N, L).evaluation(data.valid)[0]
    candidates = torch.arange(N).repeat(len(inputs), 1)
    m.eval()
    with torch.no_grad():
        z = m.experts[0].mu(m.branches[0].embed(m.branches[0].item_table(m.adjacency), inputs, 0.0), inputs == N)[:, -1]
        assert torch.allclose(m.score_candidates(inputs, candidates), z @ m.branches[0].item_emb.weight[:N].T, atol=1e-5)
    m.train()
    before = params(m.branches[0].item_emb)
    learner = NextItemLearner(m, data, max_len=L, batch_size=8, num_negatives=5)
    learner.train(1)
    assert not same(before, m.branches[0].item_emb)
    with pytest.raises(ValueError, match="head"):
        model(data, head="mlp")


def test_gate_weights_are_reported_in_training_and_evaluation():
    data = domain()
    m = model(data, c=1)
    m.set_expert_state(2, m.expert_state(2))
    _, stats = m.loss(batch(data))
    assert stats["gate/0"] == 0.0 and stats["gate/own"] == stats["gate/1"] > 0
    assert stats["gate/1"] + stats["gate/2"] == pytest.approx(1.0)
    learner = NextItemLearner(m, data, max_len=L, batch_size=8, num_negatives=5)
    trained = learner.train(1)
    assert {"gate/0", "gate/1", "gate/2", "gate/own"} <= set(trained)
    metrics = learner.evaluate()
    inputs = SequenceBatcher(N, L).evaluation(data.test)[0]
    expected = m.gate_weights(inputs).mean(dim=0)
    for i in range(K):
        assert metrics[f"gate_mean/{i}"] == pytest.approx(float(expected[i]), abs=1e-6)
    assert metrics["gate_mean/own"] == metrics["gate_mean/1"] and metrics["gate_mean/0"] == 0.0
    uniform = model(data, gate="uniform")
    assert uniform.loss(batch(data))[1]["gate/own"] == 1.0  # only the own branch is live


def test_the_gathered_graph_product_matches_the_sparse_one():
    """The GPU form of A·E (gather + index_add) gives the sparse product's values and gradients."""
    data = domain()
    adjacency = transition_adjacency(data.train, data.num_items)
    torch.manual_seed(0)
    e = torch.randn(data.num_items + 1, 6, requires_grad=True)
    weights = torch.randn(data.num_items + 1, 6)
    results = []
    for gathered in (False, True):
        out = graph_product(adjacency, e, gathered=gathered)
        (grad,) = torch.autograd.grad((out * weights).sum(), e)
        results.append((out.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][0].abs().sum() > 0


def test_branch_ablations_drop_the_graph_layer_and_the_official_input() -> None:
    """``graph=False``: the item table is E itself and no graph bias exists; ``input_norm=False``:
    the encoder input is E[s] + P as in SASRec (no ·√d, no LayerNorm)."""
    seqs = torch.tensor([[5, 0, 1, 2], [3, 4, 1, 0]])
    adjacency = transition_adjacency([[0, 1, 2], [3, 4, 1, 0]], 5)
    torch.manual_seed(0)
    full = FMoECDSR(5, 2, 0, adjacency, max_len=4, hidden=8, heads=2, blocks=1, gate_hidden=(8, 8)).branch(0).eval()
    torch.manual_seed(0)
    bare = FMoECDSR(5, 2, 0, adjacency, max_len=4, hidden=8, heads=2, blocks=1, gate_hidden=(8, 8), graph=False, input_norm=False).branch(0).eval()
    assert {n for n, _ in full.named_parameters()} - {n for n, _ in bare.named_parameters()} == {"graph_bias", "norm.weight", "norm.bias"}
    table = bare.item_table(adjacency)
    assert torch.equal(table, bare.item_emb.weight)
    assert not torch.equal(full.item_table(adjacency), full.item_emb.weight)
    positions = torch.arange(3, -1, -1)
    torch.testing.assert_close(bare.embed(table, seqs, 0.3), bare.item_emb.weight[seqs] + bare.pos_emb.weight[positions])
    assert torch.allclose(full.embed(full.item_table(adjacency), seqs, 0.3).mean(dim=-1), torch.zeros(2, 4), atol=1e-5)  # LayerNorm-ed
