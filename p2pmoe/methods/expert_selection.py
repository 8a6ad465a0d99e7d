"""FedMoE-DA's expert selection (Eq. 8–10 of arXiv 2411.02115), as pure tensor functions.

The proxy of expert e of node k is row e of its gate's weight (column e of Π_k). Each own
expert keeps the candidates whose cosine similarity is at least the (P+1)-th largest of its
row — itself (similarity 1) and its P most correlated experts, ties at the threshold included
— and weighs them by a softmax with temperature τ over the kept entries.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def correlation(own: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """[E, M] cosine similarities between own proxies [E, d] and candidate proxies [M, d]."""
    return F.normalize(own.double(), dim=1) @ F.normalize(candidates.double(), dim=1).T


def selection_weights(similarity: torch.Tensor, p: int, tau: float, available: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregation weights [E, M]: top-(P+1) per row (ties kept), softmax(r / τ) over them.

    The first E columns must be the node's own experts in slot order. `available` ([M]
    bool) masks candidates that cannot be used (a lost peer); rows are renormalised over what
    is left. P larger than the candidates there are keeps them all. P = 0 keeps only the own
    expert even when a peer's proxy ties with it (the paper's "no aggregation").
    """
    if p < 0 or tau <= 0:
        raise ValueError(f"need P >= 0 and tau > 0, got P={p}, tau={tau}")
    if p == 0:
        return torch.eye(*similarity.shape, dtype=similarity.dtype)
    scores = similarity.clone()
    if available is not None:
        scores[:, ~available] = float("-inf")
    usable = int(torch.isfinite(scores[0]).sum())
    k = min(p + 1, usable)
    threshold = scores.topk(k, dim=1).values[:, -1:]
    # A small tolerance so that float noise does not split ties the maths calls equal.
    keep = scores >= threshold - 1e-12
    logits = torch.where(keep, similarity / tau, torch.full_like(similarity, float("-inf")))
    return torch.softmax(logits, dim=1)


def fetch_set(weights: torch.Tensor, sources: list[tuple[str, int]], own: str) -> dict[str, list[int]]:
    """Per peer, the slots whose expert some own slot gives a non-zero weight; each once."""
    wanted: dict[str, set[int]] = {}
    for column in torch.nonzero(weights.sum(dim=0) > 0).flatten().tolist():
        node, slot = sources[column]
        if node != own:
            wanted.setdefault(node, set()).add(slot)
    return {node: sorted(slots) for node, slots in sorted(wanted.items())}
