"""Sampled-softmax next-item loss: each prediction against a few items instead of the catalogue.

The papers this project replicates train with cross-entropy over every item of the domain, and
that ``[positions, items]`` logit table, its softmax and their gradients are most of a step's
cost on FKCB (14-35k items a domain, hidden 64), and FMoE-CDSR forms one table per branch.
A sampled softmax keeps the loss's form and swaps the catalogue for the target plus ``n``
items drawn uniformly without replacement once per step and shared by every position of the
batch (one ``[positions, n]`` product, no ``[positions, n, d]`` gather). With a uniform proposal the usual
log-Q correction is one constant for every candidate and cancels. A negative that is the row's
own target is masked out of that row.

Project decision, not in any of the papers: this is an option (``[task] train_negatives``, off
by default), for catalogues where the full softmax does not fit the compute a user has.
Evaluation is unchanged (FedDCSR's fixed sampled candidates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["draw_train_negatives", "sampled_cross_entropy", "sampled_logits"]


def draw_train_negatives(num_items: int, n: int, device: torch.device) -> Tensor:
    """``n`` distinct item ids of ``0..num_items-1`` from torch's global CPU RNG (the node's own
    stream under the driver, so runs and resumes are reproducible, on CUDA too: the ids are
    drawn on the CPU and moved)."""
    if not 0 < n < num_items:
        raise ValueError(f"{n} training negatives need 1 <= n < {num_items} items")
    return torch.randperm(num_items)[:n].to(device)


def sampled_logits(z: Tensor, weight: Tensor, targets: Tensor, negatives: Tensor, bias: Tensor | None = None) -> Tensor:
    """Logits ``[P, 1 + n]`` of hidden states ``z`` ``[P, d]`` against a score table ``weight``
    ``[items, d]`` (and ``bias`` ``[items]``): column 0 each row's target, then the shared
    ``negatives`` ``[n]``. Collisions with the target are left in: mask them with
    `sampled_cross_entropy` (a gated sum of several tables must see finite values)."""
    positive = (z * weight[targets]).sum(-1, keepdim=True)
    negative = z @ weight[negatives].T
    if bias is not None:
        positive = positive + bias[targets, None]
        negative = negative + bias[negatives]
    return torch.cat([positive, negative], dim=1)


def sampled_cross_entropy(logits: Tensor, targets: Tensor, negatives: Tensor) -> Tensor:
    """Mean cross-entropy of `sampled_logits` output with the target in column 0, where a
    negative equal to the row's target does not count against it."""
    collides = negatives[None, :] == targets[:, None]
    masked = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(collides, float("-inf"))], dim=1)
    return F.cross_entropy(masked, torch.zeros_like(targets))
