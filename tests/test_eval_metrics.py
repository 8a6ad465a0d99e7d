"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from p2pmoe.eval import (
    accuracy,
    auc,
    full_ranks,
    mean_over_domains,
    ranking_metrics,
    ranks_against_negatives,
)


def test_ranks_count_strictly_higher_negatives():
    pos = torch.tensor([0.9, 0.5, 0.1])
    neg = torch.tensor([[0.1, 0.2, 0.3], [0.6, 0.4, 0.7], [0.2, 0.3, 0.4]])
    assert ranks_against_negatives(pos, neg).tolist() == [1, 3, 4]


def test_tie_rules_positive_tied_with_two_negatives():
    pos = torch.tensor([0.5])
    neg = torch.tensor([[0.5, 0.1, 0.5]])
    assert ranks_against_negatives(pos, neg).tolist() == [1]
    assert ranks_against_negatives(pos, neg, ties="pessimistic").tolist() == [3]
    average = ranks_against_negatives(pos, neg, ties="average")
    assert average.dtype == torch.float64 and average.tolist() == [2.0]
    with pytest.raises(ValueError, match="ties"):
        ranks_against_negatives(pos, neg, ties="random")


def test_nan_scores_are_rejected_not_ranked_first():
    with pytest.raises(ValueError, match="NaN"):
        ranks_against_negatives(torch.tensor([float("nan")]), torch.tensor([[0.1, 0.2]]))


def test_ranks_shape_mismatch():
    with pytest.raises(ValueError):
        ranks_against_negatives(torch.zeros(2), torch.zeros(3, 4))


def test_full_ranks_with_and_without_exclusion():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.5], [0.3, 0.3, 0.3, 0.3, 0.3]])
    targets = torch.tensor([2, 0])
    # Row 0: items 1 (0.9) and 3 (0.7) beat the target; item 4 ties with it.
    assert full_ranks(scores, targets).tolist() == [3, 1]
    assert full_ranks(scores, targets, ties="pessimistic").tolist() == [4, 5]
    assert full_ranks(scores, targets, ties="average").tolist() == [3.5, 3.0]
    history = torch.zeros(2, 5, dtype=torch.bool)
    history[0, 1] = True  # the history item no longer competes
    history[0, 2] = True  # the target stays ranked even when it is in the history
    history[1, 3] = True
    assert full_ranks(scores, targets, exclude=history).tolist() == [2, 1]
    assert full_ranks(scores, targets, exclude=history, ties="pessimistic").tolist() == [3, 4]


def test_full_ranks_target_out_of_range():
    with pytest.raises(ValueError, match="targets"):
        full_ranks(torch.zeros(1, 3), torch.tensor([3]))


def test_ranking_metrics_hand_computed():
    got = ranking_metrics(torch.tensor([1, 2, 3, 11]))
    expected = {
        "mrr": (1 + 1 / 2 + 1 / 3 + 1 / 11) / 4,
        "hr@1": 1 / 4,
        "hr@5": 3 / 4,
        "hr@10": 3 / 4,
        "ndcg@1": 1 / 4,
        "ndcg@5": (1 + 1 / math.log2(3) + 1 / 2 + 0) / 4,
        "ndcg@10": (1 + 1 / math.log2(3) + 1 / 2 + 0) / 4,
    }
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_ranking_metrics_custom_ks_and_float_ranks():
    got = ranking_metrics([2.0, 3.5], ks=(3,))
    expected = {"mrr": (1 / 2 + 1 / 3.5) / 2, "hr@3": 1 / 2, "ndcg@3": (1 / math.log2(3)) / 2}
    assert got == pytest.approx(expected)


def test_ranking_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        ranking_metrics(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="1-based"):
        ranking_metrics([0, 1])
    with pytest.raises(ValueError, match="positive integer"):
        ranking_metrics([1], ks=(0,))


def test_auc_with_ties_hand_computed():
    # Pairs (pos, neg): (0.8, 0.8) tie = 1/2, (0.8, 0.1) = 1, (0.3, 0.8) = 0, (0.3, 0.1) = 1.
    assert auc([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.1]) == pytest.approx(5 / 8, abs=1e-15)


def test_auc_extremes_and_constant_scores():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc(torch.tensor([1, 0, 0, 1, 0]), torch.full((5,), 0.7)) == 0.5


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 10, 300).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auc(labels, scores) == pytest.approx(brute, abs=1e-12)


def test_auc_one_class_and_bad_labels():
    with pytest.raises(ValueError, match="both classes.*positive"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both classes.*negative"):
        auc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        auc([0, 1], [0.1])


def test_accuracy_from_logits_and_predictions():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        accuracy(torch.zeros(3), torch.zeros(4))


def test_mean_over_domains_is_unweighted():
    per_domain = {
        "Food": {"mrr": 0.2, "hr@10": 0.4},
        "Kitchen": {"mrr": 0.1, "hr@10": 0.3},
        "Beauty": {"mrr": 0.3, "hr@10": 0.2},
    }
    assert mean_over_domains(per_domain) == pytest.approx({"mrr": 0.2, "hr@10": 0.3})


def test_mean_over_domains_rejects_mismatched_or_empty():
    with pytest.raises(ValueError, match="different metrics"):
        mean_over_domains({"a": {"mrr": 0.1}, "b": {"hr@10": 0.2}})
    with pytest.raises(ValueError):
        mean_over_domains({})
