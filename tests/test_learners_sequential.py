"""Sequence batching, the next-item learner's training loop and FedDCSR's evaluation protocol."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import p2pmoe.learners.sequential as sequential
from p2pmoe.data.sequences import DomainSequences
from p2pmoe.eval.negatives import sample_negatives
from p2pmoe.learners.sequential import METRICS, NextItemLearner, SASRecNextItem, SequenceBatch, SequenceBatcher

N = 20
PAD = N


def domain(num_items: int = N, n_train: int = 24, seed: int = 0, valid=None, test=None) -> DomainSequences:
    rng = random.Random(seed)

    def draw(n: int, lo: int) -> list[list[int]]:
        return [[rng.randrange(num_items) for _ in range(rng.randint(lo, 7))] for _ in range(n)]

    train = draw(n_train, 2)
    valid = draw(6, 3) if valid is None else valid
    test = draw(6, 3) if test is None else test
    return DomainSequences("toy", num_items, train, valid, test, [0] * len(train), [0] * len(valid), [0] * len(test))


class FixedScores(nn.Module):
    """Scores an item by a fixed table, whatever the input: ranks can be worked out by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.unused = nn.Parameter(torch.zeros(1))

    def loss(self, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.unused.sum(), {}

    def score_candidates(self, inputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.table[candidates]


def test_left_pad_keeps_the_newest_max_len_items():
    batcher = SequenceBatcher(N, max_len=4)
    assert batcher.left_pad([[1, 2, 3, 4, 5, 6, 7], [8]]).tolist() == [[4, 5, 6, 7], [PAD, PAD, PAD, 8]]
    # Short batches are only as wide as their longest sequence.
    assert batcher.left_pad([[1, 2], [3]]).tolist() == [[1, 2], [PAD, 3]]


def test_training_batch_predicts_the_next_item_at_every_position():
    batch = SequenceBatcher(N, max_len=3).training([[1, 2, 3, 4, 5], [6, 7]])
    assert batch.inputs.tolist() == [[2, 3, 4], [PAD, PAD, 6]]
    assert batch.targets.tolist() == [[3, 4, 5], [PAD, PAD, 7]]
    assert batch.pad_mask.tolist() == [[False] * 3, [True, True, False]]
    with pytest.raises(ValueError, match="two items"):
        SequenceBatcher(N, 3).training([[1]])


def test_select_cuts_columns_of_pure_padding():
    batch = SequenceBatcher(N, max_len=5).training([[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]])
    sub = batch.select(torch.tensor([2, 1]))
    assert sub.inputs.tolist() == [[9, 10], [PAD, 7]]
    assert sub.targets.tolist() == [[10, 11], [PAD, 8]]


def test_evaluation_splits_input_and_target():
    inputs, targets = SequenceBatcher(N, max_len=2).evaluation([[1, 2, 3, 4], [5, 6]])
    assert inputs.tolist() == [[2, 3], [PAD, 5]] and targets.tolist() == [4, 6]


def test_ranks_and_metrics_match_hand_values():
    # 6 items and 5 negatives: every other item is a negative, so the draw cannot matter.
    # Score of item j is j: the target t is beaten by the 5 - t larger ids.
    data = domain(num_items=6, valid=[[0, 5], [1, 0], [2, 3]], test=[[0, 5], [1, 0], [2, 3]])
    learner = NextItemLearner(FixedScores(torch.arange(6.0)), data, max_len=5, num_negatives=5)
    assert learner.ranks("test").tolist() == [1, 6, 3]
    m = learner.evaluate()
    assert m["mrr"] == pytest.approx((1 + 1 / 6 + 1 / 3) / 3)
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@5"] == pytest.approx(2 / 3) and m["hr@10"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7) + 1 / math.log2(4)) / 3)
    assert set(m) == set(METRICS) | {f"valid_{name}" for name in METRICS}
    assert m["valid_mrr"] == m["mrr"]


def test_ties_count_in_favour_of_the_target():
    # Scores 0,0,1,1,2,2: target 2 ties with item 3 and is beaten only by items 4 and 5.
    data = domain(num_items=6, valid=[[0, 2]], test=[[0, 2]])
    learner = NextItemLearner(FixedScores(torch.arange(6) // 2 * 1.0), data, max_len=5, num_negatives=5)
    assert learner.ranks("test").tolist() == [3]


def test_negatives_are_drawn_once_with_the_seed_and_reused(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return sample_negatives(*args, **kwargs)

    monkeypatch.setattr(sequential, "sample_negatives", counting)
    data = domain()
    learner = NextItemLearner(FixedScores(torch.randn(N)), data, max_len=5, num_negatives=7, negative_seed=3)
    first = learner.evaluate()
    candidates = {split: c.clone() for split, (_, c) in learner.splits.items()}
    assert learner.evaluate() == first
    assert len(calls) == 2  # valid and test, at construction only
    for offset, split in enumerate(("valid", "test")):
        targets = torch.tensor([s[-1] for s in getattr(data, split)])
        assert torch.equal(candidates[split][:, 0], targets)
        assert torch.equal(candidates[split][:, 1:], sample_negatives(N, targets, 7, 3 + offset))
        assert torch.equal(learner.splits[split][1], candidates[split])


def test_too_many_negatives_for_the_domain_is_an_error():
    with pytest.raises(ValueError, match="negatives"):
        NextItemLearner(FixedScores(torch.zeros(N)), domain(), max_len=5, num_negatives=N)


def test_sasrec_loss_drops_padding_and_equals_masked_full_ce():
    torch.manual_seed(0)
    model = SASRecNextItem(N, max_len=5, hidden=8, heads=2, blocks=1, dropout=0.0).eval()
    batch = SequenceBatcher(N, 5).training([[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]])
    loss, stats = model.loss(batch)
    logits = model.all_scores(model(batch.inputs))
    expected = F.cross_entropy(logits.reshape(-1, N), batch.targets.reshape(-1), ignore_index=PAD)
    torch.testing.assert_close(loss, expected)
    assert stats == {"ce": pytest.approx(float(expected.detach()))}
    assert all(name.startswith(("item_emb.", "pos_emb.", "encoder.")) for name in model.state_dict())


def test_sasrec_learns_a_fixed_successor_pattern():
    torch.manual_seed(0)
    train = [[(s + i) % N for i in range(6)] for s in range(N)]
    data = DomainSequences("cycle", N, train, [[3, 4, 5]], [[7, 8, 9]], [0] * N, [0], [0])
    learner = NextItemLearner(SASRecNextItem(N, 5, 16, 2, 1, 0.0), data, max_len=5, batch_size=8, num_negatives=10, lr=1e-2)
    first = learner.train(1)["train_loss"]
    assert learner.train(20)["train_loss"] < first / 2
    assert learner.evaluate()["hr@1"] == 1.0


def test_refresh_optimizer_follows_trainable_parameters_and_keeps_moments():
    model = SASRecNextItem(N, 5, 8, 2, 1, 0.0)
    learner = NextItemLearner(model, domain(), max_len=5, num_negatives=5)
    learner.train(1)
    exp_avg = learner.optimizer.state[model.item_emb.weight]["exp_avg"].clone()
    model.encoder.requires_grad_(False)
    learner.refresh_optimizer()
    held = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert held == {id(model.item_emb.weight), id(model.pos_emb.weight)}
    assert torch.equal(learner.optimizer.state[model.item_emb.weight]["exp_avg"], exp_avg)
    before = [p.clone() for p in model.encoder.parameters()]
    learner.train(1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.encoder.parameters(), strict=True))
    optimiser = learner.optimizer
    learner.refresh_optimizer()  # nothing changed: same optimiser
    assert learner.optimizer is optimiser


def test_state_dict_resumes_training_exactly():
    torch.manual_seed(0)
    model = SASRecNextItem(N, 5, 8, 2, 1, 0.0)
    learner = NextItemLearner(model, domain(), max_len=5, batch_size=8, num_negatives=5)
    learner.train(1)
    saved = learner.state_dict()
    assert any(k.startswith("optim.") for k in saved) and "rng" in saved
    learner.train(1)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    learner.load_state_dict(saved)
    learner.train(1)
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        learner.load_state_dict({**saved, "model.item_emb.weight": torch.zeros(3, 8)})
