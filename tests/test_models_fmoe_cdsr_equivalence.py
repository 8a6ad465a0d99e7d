"""The fast FMoE-CDSR step computes what the straightforward one computed (issue 15 item 4).

`reference_loss` is the implementation before the speed-up, kept here as the specification:
per live branch, one μ pass over the sequences and a second over their permuted views, every
branch's logit table formed, then scaled by the gate and summed. The model's loss, every
gradient and the evaluation scores must match it on a fixed batch. Dropout is 0 so that both
see the same function; the permutation comes from the same seeded draw.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from p2pmoe.learners.sequential import SequenceBatch, SequenceBatcher
from p2pmoe.models.fmoe_cdsr import FMoECDSR, nt_xent, transition_adjacency

N, K, L, D = 30, 3, 6, 16


def sequences(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(N) for _ in range(rng.randint(2, L + 1))] for _ in range(count)]


def reference_loss(m: FMoECDSR, batch: SequenceBatch) -> torch.Tensor:
    keep = ~batch.pad_mask
    targets = batch.targets[keep]
    permuted = m._permuted(batch.inputs, batch.pad_mask) if m.contrastive_weight else None
    total = torch.zeros(())
    logits, reps = {}, {}
    for i in m.live_branches():
        branch, expert = m.branches[i], m.experts[i]
        table = branch.item_table(m.adjacency)
        mu = expert.mu(branch.embed(table, batch.inputs, 0.0), batch.pad_mask)
        z = mu[keep]
        branch_logits = branch.scores(z)
        total = total + F.cross_entropy(branch_logits, targets)
        logits[i] = branch_logits.detach()
        reps[i] = z if m.gate_pooling == "position" else mu[:, -1]
        if m.vae:
            logvar = expert.logvar(branch.embed(table, batch.inputs, 0.0), batch.pad_mask)[keep]
            total = total + m.kl_weight() * -0.5 * (1 + logvar - z.pow(2) - logvar.exp()).sum(dim=-1).mean()
        if permuted is not None:
            view = expert.mu(branch.embed(table, permuted, 0.0), batch.pad_mask)[:, -1]
            total = total + m.contrastive_weight * nt_xent(mu[:, -1], view, m.temperature)
    weights = m._gate_weights(reps)
    if m.gate is not None and m.gate_pooling == "sequence":
        weights = weights[keep.nonzero()[:, 0]]
    return total + F.cross_entropy(sum(weights[:, i : i + 1] * logits[i] for i in logits), targets)


def reference_scores(m: FMoECDSR, inputs: torch.Tensor) -> torch.Tensor:
    reps = {}
    for i in m.live_branches():
        branch = m.branches[i]
        reps[i] = m.experts[i].mu(branch.embed(branch.item_table(m.adjacency), inputs, 0.0), inputs == N)[:, -1]
    weights = m._gate_weights(reps)
    return sum(weights[:, i : i + 1] * m.branches[i].scores(reps[i]) for i in reps)


def client(frozen: bool, **options) -> FMoECDSR:
    train = sequences(0, 40)
    torch.manual_seed(0)
    m = FMoECDSR(
        N,
        K,
        1,
        transition_adjacency(train, N),
        max_len=L,
        hidden=D,
        heads=2,
        blocks=2,
        dropout=0.0,
        gate_hidden=(24, 12),
        **{"contrastive_weight": 0.3, **options},
    )
    m.set_expert_state(
        2, FMoECDSR(N, K, 2, transition_adjacency(train, N), max_len=L, hidden=D, heads=2, blocks=2, vae=options.get("vae", False)).expert_state(2)
    )
    m.experts[2].requires_grad_(not frozen)
    m.step.fill_(4000)  # KL weight 0.4
    return m


def gradients(m: FMoECDSR, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


OPTIONS = [
    {},
    {"gate_pooling": "position"},
    {"gate_pooling": "batch"},
    {"gate": "uniform"},
    {"head": "tied"},
    {"vae": True},
    {"vae": True, "gate_pooling": "batch", "head": "tied"},
    {"contrastive_weight": 0.0},
    {"init": "official"},
]


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_loss_gradients_and_scores_match_the_reference(options: dict, frozen: bool) -> None:
    m = client(frozen, **options)
    batch = SequenceBatcher(N, L).training(sequences(1, 12))
    assert bool(batch.pad_mask.any()) and not bool(batch.pad_mask.all(dim=1).any())
    torch.manual_seed(7)
    expected_loss = reference_loss(m, batch)
    expected = gradients(m, expected_loss)
    torch.manual_seed(7)
    loss, stats = m.loss(batch)
    got = gradients(m, loss)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == expected.keys()
    assert not any(n.startswith("experts.0.") for n in got)  # branch 0's expert never arrived
    assert any(n.startswith("experts.2.") for n in got) == (not frozen)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    m.eval()
    inputs, targets = SequenceBatcher(N, L).evaluation(sequences(2, 9))
    candidates = torch.cat([targets[:, None], torch.arange(5).repeat(len(targets), 1)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(m.score_candidates(inputs, candidates), reference_scores(m, inputs).gather(1, candidates))
