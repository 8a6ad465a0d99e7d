"""SyNCRec ("Pacer and Runner", arXiv 2407.11245) and the two SASRec baselines it is judged by.

All three read a user's merged cross-domain timeline (left-padded item ids, padding id
``num_items``) and know each item's domain. Each position plays two tasks:
- the **single-domain task** of the position's own domain d: from the user's d-items up to
  here (other-domain items hidden in attention: a project decision, unlike the official code,
  which only masks the input), predict the next d-item;
- the **cross-domain task**: from the whole timeline up to here, predict the next item.
Every model is trained with SASRec's BCE against one uniformly sampled negative per position
and scores an evaluation target of domain d from the single-domain representation at the
input's last d-item (SyNCRec can also use the cross-domain one: ``score_with``).

``SyNCRec.moe`` is an ``ExpertSlots`` layer (ACMoE): K distinct SASRec encoders by slot and a
gating matrix, so FedMoE-DA can share its experts as it does the image model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p2pmoe.models.moe import ExpertSlots
from p2pmoe.models.sasrec import SASRec, SASRecEncoder, _dropout

__all__ = ["ACMoE", "CrossSASRec", "SingleSASRec", "SyNCRec", "SyNCRecConfig", "TimelineBatch", "info_nce", "ntg_weights"]

SCORE_MODES = ("single", "cross", "sum")


@dataclass(frozen=True)
class TimelineBatch:
    """Left-padded windows of merged timelines, all ``[B, L]``; padding = ``num_items``.

    ``targets[b, t]`` is the item after ``inputs[b, t]`` (the cross-domain task);
    ``single_targets[b, t]`` the next item of the same domain as ``inputs[b, t]`` (padding
    where there is none in the window).
    """

    inputs: Tensor
    targets: Tensor
    single_targets: Tensor

    def to(self, device: torch.device) -> TimelineBatch:
        return TimelineBatch(self.inputs.to(device), self.targets.to(device), self.single_targets.to(device))


def info_nce(anchors: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """InfoNCE of row i of ``anchors`` against row i of ``positives`` (the other rows are the
    negatives), on cosine similarities divided by ``temperature``; mean over rows."""
    logits = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchors), device=anchors.device))


def ntg_weights(gaps: Tensor, temperature: float) -> Tensor:
    """LC-NTG's weights of the domains' cross-task losses: ``softmax_d(gap_d / T)``."""
    return torch.softmax(gaps / temperature, dim=0)


def bce_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """SASRec's objective: ``-log σ(pos) - log(1 - σ(neg))``, mean over entries."""
    return F.softplus(-pos).mean() + F.softplus(neg).mean()


def last_positions(mask: Tensor) -> Tensor:
    """Index of the last True of each row ``[B, L] -> [B]``; the last column where none is."""
    width = mask.shape[1]
    idx = torch.arange(width, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, -1)).max(dim=1).values % width


def compact(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's True positions gathered to the right, in order: ``(index [B, W], valid [B, W])``
    with ``W`` the most Trues of any row (at least 1); ``index`` fills the left of shorter rows
    with distinct False positions, marked not ``valid``."""
    width = max(int(mask.sum(dim=1).max()), 1)
    index = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, -width:]
    return index, torch.gather(mask, 1, index)


@dataclass(frozen=True)
class SyNCRecConfig:
    """SyNCRec's knobs (METHODS §5); the task's options document each default."""

    experts: int = 5
    cross_expert_ratio: float = 0.8
    own_mass: float = 0.8
    gate_noise: float = 1.0
    stop_gradient: bool = True
    lc_ntg: bool = True
    ntg_alpha: float = 0.9
    ntg_beta: float = 1.0
    ntg_temperature: float = 1.0
    mim_weight: float = 0.1
    mim_temperature: float = 0.2
    score_with: str = "single"

    def __post_init__(self) -> None:
        single = self.single_experts
        if not 1 <= single < self.experts:
            raise ValueError(
                f"{self.experts} experts at cross_expert_ratio {self.cross_expert_ratio} leave {single} single-domain experts; need at least one of each group"
            )
        if self.score_with not in SCORE_MODES:
            raise ValueError(f"score_with must be one of {SCORE_MODES}, got {self.score_with!r}")

    @property
    def single_experts(self) -> int:
        """j: the first j slots are single-domain experts, the rest cross-domain ones."""
        return self.experts - round(self.experts * self.cross_expert_ratio)


class ACMoE(ExpertSlots):
    """K distinct SASRec encoders (single-domain group first) and one noisy gate per task.

    Task ``t < D`` is domain t's single-domain task, task ``D`` the cross-domain one. A task's
    gate puts ``own_mass`` on a softmax over its own group's experts and the rest on a
    softmax over the other group's, with Gaussian noise of std ``gate_noise`` on the logits
    while training. With ``stop_gradient`` a task's loss does not reach the other group's
    experts (their outputs are detached for its rows); the gate still learns how much of them
    to use. The gating matrix (FedMoE-DA's expert proxies) stacks every task's gate column of
    an expert: ``[K, (D + 1) * d]``.
    """

    def __init__(self, hidden: int, max_len: int, tasks: int, cfg: SyNCRecConfig, heads: int, blocks: int, dropout: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.single = cfg.single_experts
        self.experts = nn.ModuleList(SASRecEncoder(max_len, hidden, heads, blocks, dropout) for _ in range(cfg.experts))
        self.gates = nn.Parameter(torch.randn(tasks, cfg.experts, hidden) * 0.02)

    def gating_matrix(self) -> Tensor:
        return self.gates.transpose(0, 1).reshape(self.num_experts, -1)

    def mix_weights(self, x: Tensor, task: Tensor, cross: Tensor) -> Tensor:
        """Gate weights ``[N, L, K]`` of rows ``x`` ``[N, L, d]`` playing ``task`` ``[N]``."""
        logits = torch.einsum("nld,nkd->nlk", x, self.gates[task])
        if self.training and self.cfg.gate_noise > 0:
            logits = logits + torch.randn_like(logits) * self.cfg.gate_noise
        is_single = torch.arange(self.num_experts, device=x.device) < self.single
        own = (is_single[None, :] != cross[:, None])[:, None, :]  # [N, 1, K]
        neg = torch.finfo(logits.dtype).min
        own_w = torch.softmax(logits.masked_fill(~own, neg), dim=-1) * own
        other_w = torch.softmax(logits.masked_fill(own, neg), dim=-1) * ~own
        return self.cfg.own_mass * own_w + (1 - self.cfg.own_mass) * other_w

    def forward(self, x: Tensor, pad_mask: Tensor, hide: Tensor | None, task: Tensor, cross: Tensor) -> Tensor:
        weights = self.mix_weights(x, task, cross)
        out = torch.zeros_like(x)
        for slot, expert in enumerate(self.experts):
            y = expert(x, pad_mask, hide)
            if self.cfg.stop_gradient:
                other = cross if slot < self.single else ~cross
                y = torch.where(other[:, None, None], y.detach(), y)
            out = out + weights[..., slot : slot + 1] * y
        return out


class _Embedder(nn.Module):
    """Item and positional embeddings (``embedder.*``: what FedMoE-DA calls phi)."""

    def __init__(self, num_items: int, max_len: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.item = nn.Embedding(num_items + 1, hidden, padding_idx=num_items)
        self.pos = nn.Embedding(max_len, hidden)
        self.dropout = dropout
        for emb in (self.item, self.pos):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[num_items].zero_()

    def forward(self, seqs: Tensor) -> Tensor:
        positions = torch.arange(seqs.shape[1] - 1, -1, -1, device=seqs.device)
        return _dropout(self.item(seqs) + self.pos(positions), self.dropout, self.training)


class _TimelineModel(nn.Module):
    """What the three models share: the item-domain table, the sampled-negative BCE and the
    evaluation read-out at the input's last item of the target's domain."""

    item_domain: Tensor

    def __init__(self, item_domain: Tensor, num_domains: int) -> None:
        super().__init__()
        self.num_items = len(item_domain)
        self.pad_index = self.num_items
        self.num_domains = num_domains
        self.register_buffer("item_domain", torch.cat([item_domain.long(), item_domain.new_full((1,), -1).long()]), persistent=False)

    def domains_of(self, seqs: Tensor) -> Tensor:
        return self.item_domain[seqs]

    def pair_loss(self, h: Tensor, targets: Tensor, keep: Tensor, emb: nn.Embedding) -> Tensor:
        """BCE of ``h[keep]`` against its targets and one uniform negative each (0 if none kept)."""
        if not bool(keep.any()):
            return h.sum() * 0
        h, pos = h[keep], targets[keep]
        neg = torch.randint(self.num_items, pos.shape, device=pos.device)
        return bce_loss((h * emb(pos)).sum(-1), (h * emb(neg)).sum(-1))

    def readout(self, single: Tensor | None, cross: Tensor | None, seqs: Tensor, domains: Tensor) -> list[Tensor]:
        """Representations that score a target of domain ``domains[b]``: the single-domain one at
        the input's last item of that domain (the last position if it has none), the cross one
        at the last position."""
        rows = torch.arange(len(seqs), device=seqs.device)
        out = []
        if single is not None:
            out.append(single[rows, last_positions(self.domains_of(seqs) == domains[:, None])])
        if cross is not None:
            out.append(cross[:, -1])
        return out

    def candidate_scores(self, hs: list[Tensor], candidates: Tensor, emb: nn.Embedding) -> Tensor:
        vectors = emb(candidates)
        return sum(torch.einsum("bd,bcd->bc", h, vectors) for h in hs)  # type: ignore[return-value]


class SyNCRec(_TimelineModel):
    """SyNCRec: shared embeddings (``embedder.*``), ACMoE (``moe.*``), one tower per domain for
    the single-domain task and one for the cross-domain task (``towers.<d>``, ``towers.<D>``),
    LC-NTG's moving gaps (buffer ``ntg_gap``) and SC-MIM.

    Loss: single-task BCE (mean over positions) + the cross-task BCE of each target domain
    weighted by ``softmax(gap / T)`` (uniform without LC-NTG) + ``mim_weight`` × SC-MIM, where
    SC-MIM is InfoNCE between the single- and cross-task representations at each user's last
    item of domain d, the other users of the batch with a d-item as negatives, averaged over
    domains. Gap update after each step: ``gap_d ← α·gap_d + β·(L_single,d − L_cross,d)``.
    """

    def __init__(
        self,
        item_domain: Tensor,
        num_domains: int,
        max_len: int,
        hidden: int,
        cfg: SyNCRecConfig,
        heads: int = 2,
        blocks: int = 1,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(item_domain, num_domains)
        self.ntg_gap: Tensor
        self.cfg = cfg
        self.embedder = _Embedder(self.num_items, max_len, hidden, dropout)
        self.moe = ACMoE(hidden, max_len, num_domains + 1, cfg, heads, blocks, dropout)
        self.towers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_domains + 1))
        self.register_buffer("ntg_gap", torch.zeros(num_domains))

    def _tower(self, t: int, h: Tensor) -> Tensor:
        return h + self.towers[t](h)

    def encode(self, seqs: Tensor) -> tuple[Tensor, Tensor]:
        """(single, cross) representations ``[B, L, d]``. Position t's single-domain one comes from
        the view of its own item's domain d and d's tower. That view reads only the d-items,
        gathered to the right with their timeline positions (the same outputs as hiding the other
        items in attention, at a fraction of the cost)."""
        b, n = seqs.shape
        dom = self.domains_of(seqs)
        pad = seqs == self.pad_index
        x = self.embedder(seqs)
        single = torch.zeros_like(x)
        for d in range(self.num_domains):
            index, valid = compact(dom == d)
            if not bool(valid.any()):
                continue
            xs = torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
            task = torch.full((b,), d, device=seqs.device)
            y = self._tower(d, self.moe(xs, ~valid, None, task, torch.zeros(b, dtype=torch.bool, device=seqs.device)))
            single = single.scatter(1, index[..., None].expand_as(y), torch.where(valid[..., None], y, single.gather(1, index[..., None].expand_as(y))))
        task = torch.full((b,), self.num_domains, device=seqs.device)
        cross = self.moe(x, pad, None, task, torch.ones(b, dtype=torch.bool, device=seqs.device))
        return single, self._tower(self.num_domains, cross)

    def domain_losses(self, batch: TimelineBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(single, cross) BCE per domain ``[D]``, which domains the batch has ``[D]`` bool,
        and SC-MIM."""
        single, cross = self.encode(batch.inputs)
        dom = self.domains_of(batch.inputs)
        target_dom = self.domains_of(batch.targets)
        has_single = batch.single_targets != self.pad_index
        ls, lc, present, mims = [], [], [], []
        for d in range(self.num_domains):
            ls.append(self.pair_loss(single, batch.single_targets, (dom == d) & has_single, self.embedder.item))
            lc.append(self.pair_loss(cross, batch.targets, target_dom == d, self.embedder.item))
            present.append(bool(((dom == d) & has_single).any() and (target_dom == d).any()))
            users = (dom == d).any(dim=1)
            if int(users.sum()) >= 2:
                at = last_positions(dom == d)[users]
                rows = users.nonzero().squeeze(1)
                mims.append(info_nce(single[rows, at], cross[rows, at], self.cfg.mim_temperature))
        mim = torch.stack(mims).mean() if mims else single.sum() * 0
        return torch.stack(ls), torch.stack(lc), torch.tensor(present, device=single.device), mim

    def loss(self, batch: TimelineBatch) -> tuple[Tensor, dict[str, float]]:
        ls, lc, present, mim = self.domain_losses(batch)
        gaps = self.ntg_gap if self.cfg.lc_ntg else torch.zeros_like(self.ntg_gap)
        weights = ntg_weights(gaps, self.cfg.ntg_temperature) * present
        weights = weights / weights.sum().clamp(min=1e-12)
        single = ls[present].mean() if bool(present.any()) else ls.sum() * 0
        total = single + (weights * lc).sum() + self.cfg.mim_weight * mim
        if self.training:
            with torch.no_grad():
                moved = self.cfg.ntg_alpha * self.ntg_gap + self.cfg.ntg_beta * (ls - lc).detach()
                self.ntg_gap.copy_(torch.where(present, moved, self.ntg_gap))
        return total, {"single": float(single.detach()), "cross": float((weights * lc).sum().detach()), "mim": float(mim.detach())}

    def score_candidates(self, inputs: Tensor, candidates: Tensor, domains: Tensor) -> Tensor:
        single, cross = self.encode(inputs)
        mode = self.cfg.score_with
        hs = self.readout(single if mode != "cross" else None, cross if mode != "single" else None, inputs, domains)
        return self.candidate_scores(hs, candidates, self.embedder.item)


class CrossSASRec(_TimelineModel):
    """SASRec on the merged timeline (the cross-domain baseline): every position predicts the
    next item whatever its domain."""

    def __init__(self, item_domain: Tensor, num_domains: int, max_len: int, hidden: int, heads: int = 2, blocks: int = 1, dropout: float = 0.2) -> None:
        super().__init__(item_domain, num_domains)
        self.sasrec = SASRec(self.num_items, max_len, hidden, heads, blocks, dropout)

    def loss(self, batch: TimelineBatch) -> tuple[Tensor, dict[str, float]]:
        h = self.sasrec(batch.inputs)
        loss = self.pair_loss(h, batch.targets, batch.inputs != self.pad_index, self.sasrec.item_emb)
        return loss, {"cross": float(loss.detach())}

    def score_candidates(self, inputs: Tensor, candidates: Tensor, domains: Tensor) -> Tensor:
        return self.candidate_scores(self.readout(None, self.sasrec(inputs), inputs, domains), candidates, self.sasrec.item_emb)


class SingleSASRec(_TimelineModel):
    """One SASRec per domain (the single-domain baseline): model d reads only the user's d-items
    (others hidden in attention, as in SyNCRec's single-domain task) and predicts the next
    d-item. Its item table spans the catalogue but only d-items ever train it."""

    def __init__(self, item_domain: Tensor, num_domains: int, max_len: int, hidden: int, heads: int = 2, blocks: int = 1, dropout: float = 0.2) -> None:
        super().__init__(item_domain, num_domains)
        self.models = nn.ModuleList(SASRec(self.num_items, max_len, hidden, heads, blocks, dropout) for _ in range(num_domains))

    def _sasrec(self, d: int) -> SASRec:
        model = self.models[d]
        assert isinstance(model, SASRec)
        return model

    def _domain_views(self, seqs: Tensor) -> list[Tensor]:
        dom = self.domains_of(seqs)
        return [model(seqs, attn_mask_extra=dom != d) for d, model in enumerate(self.models)]

    def loss(self, batch: TimelineBatch) -> tuple[Tensor, dict[str, float]]:
        dom = self.domains_of(batch.inputs)
        keep = batch.single_targets != self.pad_index
        views = self._domain_views(batch.inputs)
        loss = sum(
            (self.pair_loss(h, batch.single_targets, keep & (dom == d), self._sasrec(d).item_emb) for d, h in enumerate(views)),
            start=torch.zeros((), device=batch.inputs.device),
        )
        return loss, {"single": float(loss.detach())}

    def score_candidates(self, inputs: Tensor, candidates: Tensor, domains: Tensor) -> Tensor:
        views = self._domain_views(inputs)
        scores = torch.zeros(candidates.shape, device=candidates.device)
        for d, h in enumerate(views):
            rows = domains == d
            if bool(rows.any()):
                (single,) = self.readout(h[rows], None, inputs[rows], domains[rows])
                scores[rows] = self.candidate_scores([single], candidates[rows], self._sasrec(d).item_emb)
        return scores
