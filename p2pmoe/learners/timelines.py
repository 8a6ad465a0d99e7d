"""Learning on merged cross-domain timelines (SyNCRec's setting) and SyNCRec's evaluation.

Split, leave-one-out on each user's merged timeline: train on items ``[:-2]``, validate on
item ``n-1`` from ``[:-2]``, test on item ``n`` from ``[:-1]``. Each target is ranked against
``num_negatives`` items the user never touched, drawn once with a fixed seed (valid:
``negative_seed``, test: ``negative_seed + 1``), from the target's domain (default) or from
every item. Project decision: in-domain negatives, because a per-domain model never trains
other domains' item embeddings and would rank those negatives low for free. Metrics per domain of the target item
(``<domain>/mrr``, ...) and their unweighted mean over domains (``mrr``, ``hr@10``, ...).

The model (``p2pmoe.models.syncrec``) brings ``loss(TimelineBatch)`` and
``score_candidates(inputs, candidates, target_domains)``; the Adam loop, the optimiser
bookkeeping and checkpoints are ``NextItemLearner``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from p2pmoe.data.sequences import Timeline
from p2pmoe.eval.metrics import ranking_metrics, ranks_against_negatives
from p2pmoe.eval.negatives import sample_negatives
from p2pmoe.learners.base import shuffled_batches
from p2pmoe.learners.sequential import NextItemLearner
from p2pmoe.models.syncrec import TimelineBatch

TIMELINE_METRICS = ("mrr", "hr@1", "hr@5", "hr@10", "ndcg@1", "ndcg@5", "ndcg@10")


def next_same_domain(items: np.ndarray, domains: np.ndarray, pad: int) -> np.ndarray:
    """For each position, the next item of the same domain later in the sequence (``pad`` if none)."""
    out = np.full(len(items), pad, dtype=np.int64)
    seen: dict[int, int] = {}
    for t in range(len(items) - 1, -1, -1):
        out[t] = seen.get(int(domains[t]), pad)
        seen[int(domains[t])] = int(items[t])
    return out


def draw_negatives(num_items: int, targets: Tensor, n: int, seed: int, touched: Sequence[set[int]], item_domain: np.ndarray | None) -> Tensor:
    """``n`` negatives per target that its user never touched: from every item when
    ``item_domain`` is None, else from the target's domain (one draw per domain, seed ``seed + d``)."""
    if item_domain is None:
        return sample_negatives(num_items, targets, n, seed, exclude=touched)
    out = torch.empty((len(targets), n), dtype=torch.long)
    target_domain = item_domain[targets.numpy()]
    for d in np.unique(target_domain).tolist():
        members = np.flatnonzero(item_domain == d)
        local = {int(item): i for i, item in enumerate(members)}
        rows = np.flatnonzero(target_domain == d)
        exclude = [{local[i] for i in touched[int(r)] if i in local} for r in rows]
        drawn = sample_negatives(len(members), [local[int(targets[r])] for r in rows], n, seed + d, exclude=exclude)
        out[torch.from_numpy(rows)] = torch.from_numpy(members[drawn.numpy()])
    return out


def negative_pools(timelines: Sequence[Timeline], num_items: int, domains: Sequence[str], item_domain: np.ndarray | None) -> dict[str, int]:
    """For `check_negatives_fit`: per domain, the fewest negatives any valid or test target of
    that domain can draw, i.e. the items (of its domain, or of the catalogue when
    ``item_domain`` is None) that its user never touched."""
    sizes = np.bincount(item_domain[item_domain >= 0], minlength=len(domains)) if item_domain is not None else None
    pools: dict[str, int] = {}
    for t in timelines:
        touched = np.unique(t.items)
        per_domain = np.bincount(item_domain[touched], minlength=len(domains)) if item_domain is not None and sizes is not None else None
        for cut in (2, 1):
            d = int(t.domains[-cut])
            allowed = num_items - len(touched) if per_domain is None or sizes is None else int(sizes[d] - per_domain[d])
            pools[domains[d]] = min(pools.get(domains[d], allowed), allowed)
    return pools


def _left_pad(rows: Sequence[np.ndarray], width: int, pad: int) -> Tensor:
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for r, row in enumerate(rows):
        if len(row):
            out[r, width - len(row) :] = row
    return torch.from_numpy(out)


class TimelineLearner(NextItemLearner):
    """Adam training on the newest ``max_len + 1`` training items of each user (one window per
    user and epoch, SASRec's practice) and SyNCRec's leave-one-out evaluation.

    It keeps ``NextItemLearner``'s training loop, optimiser bookkeeping and checkpoints, and
    builds its own data instead of calling the parent's ``__init__`` (which batches one
    domain's ``DomainSequences``)."""

    def __init__(
        self,
        model: nn.Module,
        timelines: Sequence[Timeline],
        num_items: int,
        domains: Sequence[str],
        max_len: int,
        batch_size: int = 128,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        num_negatives: int = 100,
        negative_seed: int = 0,
        item_domain: np.ndarray | None = None,
        seed: int = 0,
        eval_batch_size: int = 256,
        device: torch.device | str = "cpu",
    ) -> None:
        short = [t.user for t in timelines if len(t) < 4]
        if short or not timelines:
            raise ValueError(f"every timeline needs 4 items (2 to train on, a valid and a test target); users {short[:5]} have fewer")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.pad = num_items
        self.domains = tuple(domains)
        self.max_len = max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.lr, self.betas = lr, betas
        self._shuffle = torch.Generator().manual_seed(seed)
        windows = [(t.items[:-2][-(max_len + 1) :], t.domains[:-2][-(max_len + 1) :]) for t in timelines]
        self.windows = TimelineBatch(
            _left_pad([w[:-1] for w, _ in windows], max_len, num_items),
            _left_pad([w[1:] for w, _ in windows], max_len, num_items),
            _left_pad([next_same_domain(w, d, num_items)[:-1] for w, d in windows], max_len, num_items),
        )
        self.num_train_examples = len(timelines)
        touched = [set(t.items.tolist()) for t in timelines]
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.target_domains: dict[str, Tensor] = {}
        for offset, (split, cut) in enumerate((("valid", 2), ("test", 1))):
            inputs = _left_pad([t.items[:-cut][-max_len:] for t in timelines], max_len, num_items)
            targets = torch.tensor([int(t.items[-cut]) for t in timelines])
            negatives = draw_negatives(num_items, targets, num_negatives, negative_seed + offset, touched, item_domain)
            self.splits[split] = (inputs, torch.cat([targets[:, None], negatives], dim=1))
            self.target_domains[split] = torch.tensor([int(t.domains[-cut]) for t in timelines])
        self.optimizer = self._new_optimizer()

    def batches(self) -> Iterator[TimelineBatch]:  # type: ignore[override]
        """One shuffled pass, each batch cut to its longest window."""
        data = self.windows
        for rows in shuffled_batches(self.num_train_examples, self.batch_size, self._shuffle):
            width = int((data.inputs[rows] != self.pad).sum(dim=1).max())
            cut = slice(self.max_len - width, None)
            yield TimelineBatch(data.inputs[rows, cut], data.targets[rows, cut], data.single_targets[rows, cut]).to(self.device)

    @torch.no_grad()
    def ranks(self, split: str) -> Tensor:
        inputs, candidates = self.splits[split]
        domains = self.target_domains[split]
        self.model.eval()
        out = []
        for start in range(0, len(inputs), self.eval_batch_size):
            rows = slice(start, start + self.eval_batch_size)
            width = int((inputs[rows] != self.pad).sum(dim=1).max())
            scores = self.model.score_candidates(  # type: ignore[operator]
                inputs[rows, self.max_len - width :].to(self.device), candidates[rows].to(self.device), domains[rows].to(self.device)
            ).cpu()
            out.append(ranks_against_negatives(scores[:, 0], scores[:, 1:]))
        return torch.cat(out)

    def evaluate(self) -> dict[str, float]:
        """Test metrics per target domain (``kids/mrr``) and their mean (``mrr``); validation means
        (``valid_mrr``, ...) for model selection."""
        metrics: dict[str, float] = {}
        for split, prefix in (("test", ""), ("valid", "valid_")):
            ranks, domains = self.ranks(split), self.target_domains[split]
            per_domain = {name: ranking_metrics(ranks[domains == d], ks=(1, 5, 10)) for d, name in enumerate(self.domains) if bool((domains == d).any())}
            for name in TIMELINE_METRICS:
                metrics[prefix + name] = float(np.mean([values[name] for values in per_domain.values()]))
                if not prefix:
                    metrics.update({f"{domain.lower()}/{name}": values[name] for domain, values in per_domain.items()})
        return metrics
