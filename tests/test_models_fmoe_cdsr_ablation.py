"""Why freezing or fine-tuning the foreign experts can give the same test MRR (issue 11).

No loss term of the own branch involves a foreign expert (the mixture loss reaches only the
gate), and freezing changes no random draw, so the own branch and the own expert train to the
very same weights in both variants; only the gate and the foreign branches differ. Whenever
the gate puts (almost) all its weight on the own branch, the mixture is the own branch's
output in both, and so is every rank.
"""

from __future__ import annotations

import random

import torch

from p2pmoe.data.sequences import DomainSequences
from p2pmoe.learners.sequential import NextItemLearner
from p2pmoe.models.fmoe_cdsr import FMoECDSR, transition_adjacency

N, K, L, D = 25, 2, 6, 16


def trained(frozen: bool) -> FMoECDSR:
    rng = random.Random(0)
    train = [[rng.randrange(N) for _ in range(rng.randint(2, 7))] for _ in range(48)]
    data = DomainSequences("toy", N, train, train[:8], train[8:16], [0] * 48, [0] * 8, [0] * 8)
    torch.manual_seed(0)
    foreign = FMoECDSR(N, K, 1, transition_adjacency(train, N), max_len=L, hidden=D, heads=2, blocks=1, gate_hidden=(16, 8))
    m = FMoECDSR(N, K, 0, transition_adjacency(train, N), max_len=L, hidden=D, heads=2, blocks=1, gate_hidden=(16, 8))
    m.set_expert_state(1, foreign.expert_state(1))
    m.experts[1].requires_grad_(not frozen)
    NextItemLearner(m, data, max_len=L, batch_size=16, num_negatives=5).train(2)
    return m


def test_own_branch_and_expert_train_identically_frozen_or_not():
    frozen, tuned = trained(True), trained(False)
    for part in ("branches.0.", "experts.0."):
        names = [n for n in frozen.state_dict() if n.startswith(part)]
        assert names and all(torch.equal(frozen.state_dict()[n], tuned.state_dict()[n]) for n in names)
    assert not torch.equal(frozen.experts[1].mu.final_norm.weight, tuned.experts[1].mu.final_norm.weight)
    assert not torch.equal(frozen.gate[0].weight, tuned.gate[0].weight)
