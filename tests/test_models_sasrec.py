"""SASRec encoder and model: causality, left padding, extra masks, scoring."""

from __future__ import annotations

import pytest
import torch

from p2pmoe.models import SASRec, SASRecEncoder

D = 16


@pytest.fixture
def encoder() -> SASRecEncoder:
    torch.manual_seed(0)
    return SASRecEncoder(max_len=8, hidden=D, heads=2, blocks=2, dropout=0.2).eval()


def no_pad(b: int, n: int) -> torch.Tensor:
    return torch.zeros(b, n, dtype=torch.bool)


def test_encoder_is_causal(encoder: SASRecEncoder) -> None:
    x = torch.randn(3, 8, D)
    changed = x.clone()
    changed[:, 5] = torch.randn(3, D)
    out, out_changed = encoder(x, no_pad(3, 8)), encoder(changed, no_pad(3, 8))
    torch.testing.assert_close(out[:, :5], out_changed[:, :5])
    assert not torch.allclose(out[:, 5:], out_changed[:, 5:])


def test_left_padding_matches_unpadded_and_pads_are_zero(encoder: SASRecEncoder) -> None:
    real = torch.randn(2, 5, D)
    garbage = torch.randn(2, 3, D) * 100  # whatever sits in padding slots must not leak
    padded = torch.cat([garbage, real], dim=1)
    pad_mask = torch.tensor([[True] * 3 + [False] * 5] * 2)
    out = encoder(padded, pad_mask)
    torch.testing.assert_close(out[:, 3:], encoder(real, no_pad(2, 5)), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :3], torch.zeros(2, 3, D))


def test_all_padding_row_is_finite_in_training(encoder: SASRecEncoder) -> None:
    encoder.train()
    x = torch.randn(2, 8, D, requires_grad=True)
    pad_mask = torch.zeros(2, 8, dtype=torch.bool)
    pad_mask[0] = True  # an empty sequence
    pad_mask[1, :6] = True
    out = encoder(x, pad_mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.equal(out[0], torch.zeros(8, D))


def test_extra_key_mask_hides_positions(encoder: SASRecEncoder) -> None:
    x = torch.randn(2, 6, D)
    hide = torch.zeros(2, 6, dtype=torch.bool)
    hide[:, 2] = True
    changed = x.clone()
    changed[:, 2] = torch.randn(2, D)
    out = encoder(x, no_pad(2, 6), hide)
    out_changed = encoder(changed, no_pad(2, 6), hide)
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out[:, others], out_changed[:, others])
    pairwise = hide[:, None, :].expand(2, 6, 6)  # the [B, L, L] form says the same
    torch.testing.assert_close(encoder(x, no_pad(2, 6), pairwise), out)


def test_encoder_rejects_too_long_input(encoder: SASRecEncoder) -> None:
    with pytest.raises(ValueError, match="max_len"):
        encoder(torch.randn(1, 9, D), no_pad(1, 9))


@pytest.fixture
def sasrec() -> SASRec:
    torch.manual_seed(0)
    return SASRec(num_items=50, max_len=8, hidden=D, heads=2, blocks=1, dropout=0.1).eval()


def test_sasrec_causal_and_padding_invariant(sasrec: SASRec) -> None:
    seqs = torch.randint(0, 50, (2, 5))
    padded = torch.cat([torch.full((2, 3), sasrec.pad_index), seqs], dim=1)
    out = sasrec(seqs)
    torch.testing.assert_close(sasrec(padded)[:, 3:], out, atol=1e-5, rtol=1e-5)
    changed = seqs.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 50
    torch.testing.assert_close(sasrec(changed)[:, :3], out[:, :3])


def test_scores_line_up_with_item_ids(sasrec: SASRec) -> None:
    h = sasrec(torch.randint(0, 50, (3, 4)))
    full = sasrec.all_scores(h)
    assert full.shape == (3, 4, 50)
    targets = torch.randint(0, 50, (3, 4))
    expected = full.gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(sasrec.score(h, targets), expected)
    last, candidates = h[:, -1], torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(sasrec.score(last, candidates), full[:, -1].gather(-1, candidates))
    with pytest.raises(ValueError):
        sasrec.score(last, torch.zeros(3, 1, 1, dtype=torch.long))


def test_sasrec_rejects_too_long_input(sasrec: SASRec) -> None:
    with pytest.raises(ValueError, match="max_len"):
        sasrec(torch.zeros(1, 9, dtype=torch.long))


def test_sasrec_trains_without_touching_padding_row(sasrec: SASRec) -> None:
    sasrec.train()
    seqs = torch.randint(0, 50, (4, 8))
    seqs[:, :2] = sasrec.pad_index
    h = sasrec(seqs)
    logits = sasrec.all_scores(h[:, 2:]).flatten(0, 1)
    torch.nn.functional.cross_entropy(logits, seqs[:, 2:].flatten()).backward()
    grad = sasrec.item_emb.weight.grad
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[sasrec.pad_index], torch.zeros(D))
