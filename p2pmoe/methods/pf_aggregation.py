"""PF-MSMTrec's server arithmetic, as pure functions over per-client tensors (METHODS.md §4).

- `project_conflicts`: PCGrad-style conflict coordination of client updates;
- `normalise` / `denormalise`: federated batch normalisation of parameters;
- `cosine_softmax`: personalised aggregation weights;
- `aggregate_group`: the three applied to one group of tensors (an expert's template part).

Clients are rows in a fixed order (the server's configuration order), so every result is
deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

EPS = 1e-8

__all__ = ["Stats", "aggregate_group", "average_touched_rows", "conflict_share", "cosine_softmax", "denormalise", "normalise", "project_conflicts", "stats"]


def project_conflicts(updates: torch.Tensor) -> torch.Tensor:
    """Rows ``[n, d]`` of client updates with every pairwise conflict projected away.

    For client i and every other client j in order, when the (already projected) ``g_i`` has a
    negative dot product with the original ``g_j``, the component of ``g_i`` along ``g_j`` is
    removed: ``g_i -= (g_i . g_j) / ||g_j||^2 g_j`` (PCGrad, Yu et al. 2020). Project decision:
    a fixed order (PCGrad shuffles), so the server is deterministic.
    """
    out = updates.clone()
    norms = (updates * updates).sum(dim=1)
    for i in range(len(updates)):
        for j in range(len(updates)):
            if i == j or norms[j] <= EPS:
                continue
            dot = torch.dot(out[i], updates[j])
            if dot < 0:
                out[i] -= dot / norms[j] * updates[j]
    return out


def conflict_share(updates: torch.Tensor) -> float:
    """Share of client pairs (rows of ``[n, d]``) whose updates have a negative dot product."""
    n = len(updates)
    if n < 2:
        return 0.0
    dots = updates @ updates.T
    return float((dots < 0).sum()) / (n * (n - 1))


@dataclass(frozen=True)
class Stats:
    """Scalar mean and standard deviation of one tensor's entries."""

    mean: float
    std: float


def stats(tensor: torch.Tensor) -> Stats:
    flat = tensor.reshape(-1).to(torch.float64)
    return Stats(float(flat.mean()), float(flat.std(unbiased=False)))


def normalise(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Stats]:
    """Each client's tensor standardised with the cross-client (pooled) mean and std."""
    pooled = stats(torch.stack(list(tensors)))
    scale = max(pooled.std, EPS)
    return [(t - pooled.mean) / scale for t in tensors], pooled


def denormalise(normalised: torch.Tensor, own: Stats) -> torch.Tensor:
    """Back to a client's scale with its own statistics (the inverse of `normalise` for a
    client whose statistics are the pooled ones)."""
    return normalised * own.std + own.mean


def cosine_softmax(vectors: torch.Tensor, tau: float) -> torch.Tensor:
    """``w[k, j] = softmax_j(cos(v_k, v_j) / tau)`` over the rows of ``vectors`` ``[n, d]``."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(EPS)
    return (unit @ unit.T / tau).softmax(dim=1)


def aggregate_group(
    uploads: Sequence[Mapping[str, torch.Tensor]],
    bases: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    conflict: bool,
    fedbn: bool,
) -> list[dict[str, torch.Tensor]]:
    """Client k's new tensors ``sum_j weights[k, j] * theta_j`` for one group of names.

    1. ``conflict``: the clients' updates (upload minus what the server last sent that client)
       go through `project_conflicts` as one flat vector per client; the projected update is
       added back to the base.
    2. ``fedbn``: every tensor is normalised with the cross-client statistics, aggregated,
       then de-normalised with the client's own statistics (of its projected upload).
    """
    names = list(uploads[0])
    thetas = [{n: u[n].to(torch.float32) for n in names} for u in uploads]
    if conflict:
        flat = torch.stack([torch.cat([(t[n] - b[n]).reshape(-1) for n in names]) for t, b in zip(thetas, bases, strict=True)])
        projected = project_conflicts(flat)
        thetas = [_unflatten(row, b, names) for row, b in zip(projected, bases, strict=True)]
    out: list[dict[str, torch.Tensor]] = [{} for _ in thetas]
    for name in names:
        column = [t[name] for t in thetas]
        if fedbn:
            normed, _ = normalise(column)
            own = [stats(t) for t in column]
        stacked = torch.stack(normed if fedbn else column)
        for k in range(len(thetas)):
            mixed = torch.tensordot(weights[k].to(stacked.dtype), stacked, dims=1)
            out[k][name] = (denormalise(mixed, own[k]) if fedbn else mixed).to(uploads[k][name].dtype)
    return out


def _unflatten(update: torch.Tensor, base: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name in names:
        size = base[name].numel()
        out[name] = base[name].to(torch.float32) + update[start : start + size].reshape(base[name].shape)
        start += size
    return out


def average_touched_rows(uploads: Sequence[torch.Tensor], base: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An embedding table: each row moves by the weighted mean update of the clients whose
    upload changed that row (``weights`` ``[n]``); rows no client changed keep ``base``.

    A client's untouched rows come back exactly as it received them (its optimiser gave them
    no gradient), so they would otherwise pull every other client's update towards zero:
    with users private to one scenario, a plain average divides their rows' learning by the
    number of clients.
    """
    updates = torch.stack([u.to(torch.float32) - base.to(torch.float32) for u in uploads])  # [n, rows, d]
    touched = (updates != 0).any(dim=-1).to(torch.float32) * weights.reshape(-1, 1)  # [n, rows]
    total = touched.sum(dim=0)
    mean = (updates * touched.unsqueeze(-1)).sum(dim=0) / total.clamp_min(EPS).unsqueeze(-1)
    return (base.to(torch.float32) + mean).to(base.dtype)
