"""Evaluation metrics shared by every method, so all tables are scored the same way.

Ranking follows the FedDCSR / FMoE-CDSR protocol: the rank of the positive is
``1 + number of competitors scoring strictly higher``, so ties favour the positive
("optimistic"). That choice flatters models that collapse to constant scores, so
"pessimistic" and "average" tie rules are offered for anyone who wants to check how much a
result depends on it. Any NaN score raises instead of ranking, because a NaN compares false
with everything and would silently give a diverged model rank 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

TIE_RULES = ("optimistic", "pessimistic", "average")


def _reject_nan(*tensors: Tensor) -> None:
    for t in tensors:
        if torch.isnan(t).any():
            raise ValueError("scores contain NaN; a NaN cannot be ranked (did training diverge?)")


def _rank_from_counts(higher: Tensor, equal: Tensor, ties: str) -> Tensor:
    if ties == "optimistic":
        return 1 + higher
    if ties == "pessimistic":
        return 1 + higher + equal
    if ties == "average":
        return 1.0 + higher.double() + equal.double() / 2
    raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")


def ranks_against_negatives(pos_scores: Tensor, neg_scores: Tensor, ties: str = "optimistic") -> Tensor:
    """Rank of each positive among its own sampled negatives (1 = best).

    ``pos_scores`` is ``[B]``, ``neg_scores`` is ``[B, N]``. With the default
    ``ties="optimistic"`` the rank is 1 + the number of negatives scoring strictly higher, as
    in FedDCSR and FMoE-CDSR. ``"pessimistic"`` also counts negatives that tie, and
    ``"average"`` counts half of them and returns float64 ranks; the other two return int64.
    """
    if pos_scores.dim() != 1 or neg_scores.dim() != 2 or neg_scores.shape[0] != pos_scores.shape[0]:
        raise ValueError(f"expected pos_scores [B] and neg_scores [B, N], got {tuple(pos_scores.shape)} and {tuple(neg_scores.shape)}")
    _reject_nan(pos_scores, neg_scores)
    pos = pos_scores.unsqueeze(1)
    higher = (neg_scores > pos).sum(dim=1)
    equal = (neg_scores == pos).sum(dim=1)
    return _rank_from_counts(higher, equal, ties)


def full_ranks(
    scores: Tensor,
    targets: Tensor,
    exclude: Tensor | None = None,
    ties: str = "optimistic",
) -> Tensor:
    """Rank of each target among all items (full-sort evaluation), same tie rules.

    ``scores`` is ``[B, num_items]``, ``targets`` is ``[B]``. ``exclude`` is an optional
    ``[B, num_items]`` boolean mask of items that do not compete (e.g. the user's history).
    The target itself is always ranked even if ``exclude`` marks it: the mask only removes
    competitors, so repeat-consumption targets are not pushed to the bottom.
    """
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"expected scores [B, num_items] and targets [B], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if exclude is not None and exclude.shape != scores.shape:
        raise ValueError(f"exclude must have shape {tuple(scores.shape)}, got {tuple(exclude.shape)}")
    targets = targets.long()
    if targets.numel() and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"targets must lie in [0, {scores.shape[1]})")
    _reject_nan(scores)
    competes = torch.ones_like(scores, dtype=torch.bool) if exclude is None else ~exclude.bool()
    competes = competes.scatter(1, targets.unsqueeze(1), False)
    pos = scores.gather(1, targets.unsqueeze(1))
    higher = ((scores > pos) & competes).sum(dim=1)
    equal = ((scores == pos) & competes).sum(dim=1)
    return _rank_from_counts(higher, equal, ties)


def ranking_metrics(ranks: Tensor | ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """MRR, HR@k and NDCG@k from 1-based ranks of a single relevant item per query.

    Names follow RecBole ("mrr", "hr@10", "ndcg@10"). With one relevant item the ideal DCG is
    1, so NDCG@k is ``1 / log2(rank + 1)`` when ``rank <= k`` and 0 otherwise.
    """
    r = torch.as_tensor(ranks).detach().to(torch.float64).flatten()
    if r.numel() == 0:
        raise ValueError("ranking_metrics needs at least one rank")
    if torch.isnan(r).any() or (r < 1).any():
        raise ValueError("ranks must be >= 1 (ranks are 1-based)")
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"every k must be a positive integer, got {list(ks)}")
    out = {"mrr": (1.0 / r).mean().item()}
    for k in ks:
        out[f"hr@{k}"] = (r <= k).double().mean().item()
    for k in ks:
        gain = torch.where(r <= k, 1.0 / torch.log2(r + 1), torch.zeros_like(r))
        out[f"ndcg@{k}"] = gain.mean().item()
    return out


def random_ranking_metrics(candidates: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """What ranking at random scores in expectation with ``candidates`` per target (the
    positive and its sampled negatives): every rank 1..candidates is equally likely, so the
    expectation is `ranking_metrics` over exactly those ranks (MRR = H_C / C, HR@k = k / C)."""
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    return ranking_metrics(torch.arange(1, candidates + 1), ks)


def _as_numpy(x: Tensor | ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def auc(labels: Tensor | ArrayLike, scores: Tensor | ArrayLike) -> float:
    """ROC-AUC as the Mann-Whitney U statistic with average ranks for tied scores.

    Average ranks make a tied (positive, negative) pair count 1/2, so constant scores give
    exactly 0.5. Runs in O(n log n) with one sort, fine for millions of examples.
    """
    y = _as_numpy(labels).ravel()
    s = _as_numpy(scores).ravel().astype(np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1 (or boolean)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; AUC is undefined")
    pos = y.astype(bool)
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "positive" if n_neg == 0 else "negative"
        raise ValueError(f"AUC needs both classes, but all {y.size} labels are {only}")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    before = np.cumsum(counts) - counts
    avg_rank = before + (counts + 1) / 2.0
    rank_sum = avg_rank[inverse.ravel()][pos].sum()
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy(logits_or_preds: Tensor | ArrayLike, labels: Tensor | ArrayLike) -> float:
    """Fraction of correct predictions; logits with one more dimension than labels are argmaxed."""
    pred = torch.as_tensor(logits_or_preds)
    y = torch.as_tensor(labels, device=pred.device)
    if pred.dim() == y.dim() + 1:
        pred = pred.argmax(dim=-1)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} do not match labels {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("accuracy needs at least one example")
    return (pred == y).double().mean().item()


def mean_over_domains(per_domain: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric across domains, as the FedDCSR tables report.

    Every domain must report the same metrics: averaging over different subsets of domains
    would make the means incomparable.
    """
    if not per_domain:
        raise ValueError("mean_over_domains needs at least one domain")
    domains = list(per_domain)
    names = list(per_domain[domains[0]])
    for d in domains[1:]:
        if set(per_domain[d]) != set(names):
            raise ValueError(f"domains report different metrics: {domains[0]!r} has {sorted(names)}, {d!r} has {sorted(per_domain[d])}")
    return {m: float(np.mean([per_domain[d][m] for d in domains])) for m in names}
