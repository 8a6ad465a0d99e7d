"""Evaluation: ranking and classification metrics and reusable sampled-negative sets."""

from p2pmoe.eval.metrics import (
    accuracy,
    auc,
    full_ranks,
    mean_over_domains,
    ranking_metrics,
    ranks_against_negatives,
)
from p2pmoe.eval.negatives import load_negatives, sample_negatives, save_negatives

__all__ = [
    "accuracy",
    "auc",
    "full_ranks",
    "load_negatives",
    "mean_over_domains",
    "ranking_metrics",
    "ranks_against_negatives",
    "sample_negatives",
    "save_negatives",
]
