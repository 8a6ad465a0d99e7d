"""SASRec: a causal self-attention encoder over item sequences (Kang & McAuley 2018).

``SASRecEncoder`` has no embeddings of its own, because FMoE-CDSR keeps item and positional
embeddings among each branch's local adaptation parameters and ships only the encoder as the
expert; SyNCRec stacks several encoders over shared embeddings. ``SASRec`` is the
self-contained model (embeddings + encoder + tied output scores).

Sequences are LEFT-padded: the newest item sits in the last slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SASRecEncoder", "SASRec"]


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout from a uniform draw: about twice as fast as ``F.dropout`` on CPU."""
    if not training or p == 0.0:
        return x
    return x * (torch.rand_like(x) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))`` then ``x + FFN(LN(x))`` (FFN width = d)."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, hidden)
        self.ffn_out = nn.Linear(hidden, hidden)

    def _drop(self, x: Tensor) -> Tensor:
        return _dropout(x, self.dropout, self.training)

    def forward(self, x: Tensor, allowed: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=allowed is None,
        )
        x = x + self._drop(self.out(a.transpose(1, 2).reshape(b, n, d)))
        return x + self._drop(self.ffn_out(self._drop(F.relu(self.ffn_in(self.ffn_norm(x))))))


class SASRecEncoder(nn.Module):
    """Causal pre-LN self-attention blocks and a final LayerNorm: ``[B, L, d] -> [B, L, d]``.

    Position ``i`` sees positions ``j <= i`` that are neither padding nor hidden by
    ``attn_mask_extra``, and always itself, so no attention row is empty (no NaN for
    all-padding prefixes). Outputs at padding positions are exactly zero.
    """

    causal: Tensor  # a registered (non-persistent) buffer

    def __init__(self, max_len: int, hidden: int, heads: int = 4, blocks: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.max_len = max_len
        self.hidden = hidden
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(hidden)
        causal = torch.ones(max_len, max_len, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def _allowed(self, pad_mask: Tensor, extra: Tensor | None) -> Tensor | None:
        """``[B, 1, L, L]`` bool, True = may attend; None when plain causal masking suffices."""
        if extra is None and not bool(pad_mask.any()):
            return None
        n = pad_mask.shape[1]
        hidden = pad_mask[:, None, :]
        if extra is not None:
            hidden = hidden | (extra[:, None, :] if extra.dim() == 2 else extra)
        allowed = self.causal[:n, :n] & ~hidden
        # Torch < 2.5 returns NaN for a query with no visible key; seeing itself avoids that.
        allowed |= torch.eye(n, dtype=torch.bool, device=allowed.device)
        return allowed.unsqueeze(1)

    def forward(self, x: Tensor, pad_mask: Tensor, attn_mask_extra: Tensor | None = None) -> Tensor:
        """Encode ``x`` ``[B, L, d]``; ``pad_mask`` ``[B, L]`` is True at padding.

        ``attn_mask_extra`` (bool, True = hide) hides more keys: ``[B, L]`` hides key positions
        from every query (SyNCRec's other-domain items), ``[B, L, L]`` hides (query, key) pairs.
        Hidden non-padding positions still get an output; the caller decides whether to use it.
        """
        if x.shape[1] > self.max_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_len {self.max_len}")
        allowed = self._allowed(pad_mask, attn_mask_extra)
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x) * (~pad_mask).unsqueeze(-1).to(x.dtype)


class SASRec(nn.Module):
    """Item and positional embeddings, embedding dropout, ``SASRecEncoder``, tied scoring.

    Item ids are ``0 .. num_items - 1`` as in the data files; the padding id is ``num_items``
    (``pad_index``), so score columns line up with item ids. The positional embedding indexes
    the distance from the newest slot (the last one), so a left-padded sequence gets the same
    positions whatever length it is padded to.
    Parameter names: ``item_emb.weight`` (``[num_items + 1, d]``, last row = padding),
    ``pos_emb.weight``, ``encoder.*``.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        hidden: int = 64,
        heads: int = 4,
        blocks: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.pad_index = num_items
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=num_items)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.dropout = dropout
        self.encoder = SASRecEncoder(max_len, hidden, heads, blocks, dropout)
        for emb in (self.item_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[self.pad_index].zero_()

    def forward(self, seqs: Tensor, attn_mask_extra: Tensor | None = None) -> Tensor:
        """Hidden states ``[B, L, d]`` for left-padded ``seqs`` ``[B, L]``; zero at padding."""
        n = seqs.shape[1]
        if n > self.encoder.max_len:  # checked here too: pos_emb would fail with an IndexError
            raise ValueError(f"sequence length {n} exceeds max_len {self.encoder.max_len}")
        positions = torch.arange(n - 1, -1, -1, device=seqs.device)
        x = _dropout(self.item_emb(seqs) + self.pos_emb(positions), self.dropout, self.training)
        return self.encoder(x, seqs == self.pad_index, attn_mask_extra)

    def score(self, h: Tensor, items: Tensor) -> Tensor:
        """Dot products of hidden states with item embeddings.

        ``items`` has either ``h``'s leading dims (one item per state: ``[B, L, d]`` with
        ``[B, L]`` gives ``[B, L]``) or one more trailing dim of candidates (``[B, d]`` with
        ``[B, C]`` gives ``[B, C]``).
        """
        emb = self.item_emb(items)
        if items.dim() == h.dim() - 1:
            return (h * emb).sum(-1)
        if items.dim() == h.dim():
            return torch.einsum("...d,...cd->...c", h, emb)
        raise ValueError(f"items {tuple(items.shape)} do not fit hidden states {tuple(h.shape)}")

    def all_scores(self, h: Tensor) -> Tensor:
        """Scores of every item: ``[..., d] -> [..., num_items]`` (column ``j`` = item ``j``)."""
        return F.linear(h, self.item_emb.weight[: self.num_items])
