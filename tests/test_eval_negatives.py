"""Sampled negatives: correctness, determinism, uniformity and persistence."""

import numpy as np
import pytest
import torch

from p2pmoe.eval import load_negatives, sample_negatives, save_negatives


def _check_rows(negs: torch.Tensor, targets, exclude=None):
    for i, row in enumerate(negs.tolist()):
        assert len(set(row)) == len(row), f"duplicate in row {i}"
        assert targets[i] not in row, f"target in row {i}"
        if exclude is not None:
            assert not set(row) & exclude[i], f"excluded item in row {i}"


def test_shape_dtype_no_target_no_duplicates():
    targets = [0, 5, 99, 42, 5]
    negs = sample_negatives(100, targets, 30, seed=0)
    assert negs.shape == (5, 30) and negs.dtype == torch.int64
    assert negs.min() >= 0 and negs.max() < 100
    _check_rows(negs, targets)


def test_exclude_sets_respected():
    targets = torch.tensor([3, 7, 1])
    exclude = [{0, 1, 2, 4}, set(range(10, 40)), {1, 3}]
    negs = sample_negatives(50, targets, 15, seed=3, exclude=exclude)
    _check_rows(negs, targets.tolist(), exclude)


def test_takes_every_allowed_item_when_n_equals_allowed():
    # 10 items, target 2, exclude {0, 9}: exactly 7 allowed, so all must be drawn.
    negs = sample_negatives(10, [2], 7, seed=0, exclude=[{0, 9}])
    assert sorted(negs[0].tolist()) == [1, 3, 4, 5, 6, 7, 8]


def test_same_seed_same_draw_regardless_of_torch_rng():
    targets = list(range(20))
    torch.manual_seed(1)
    a = sample_negatives(500, targets, 50, seed=7)
    torch.manual_seed(2)
    torch.rand(100)
    b = sample_negatives(500, targets, 50, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_negatives(500, targets, 50, seed=8))


def test_too_few_candidates():
    with pytest.raises(ValueError, match="row 1 allows only 8"):
        sample_negatives(10, [0, 1], 9, seed=0, exclude=[set(), {2}])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        sample_negatives(10, [10], 3, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        sample_negatives(10, [1], 3, seed=0, exclude=[{-1}])
    with pytest.raises(ValueError, match="exclude has 1 sets"):
        sample_negatives(10, [1, 2], 3, seed=0, exclude=[set()])


def test_edge_sizes():
    assert sample_negatives(10, [], 5, seed=0).shape == (0, 5)
    assert sample_negatives(10, [1, 2], 0, seed=0).shape == (2, 0)


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize(
    ("num_items", "n", "exclude"),
    [
        (20, 5, None),  # rejection path
        (20, 5, {3, 11}),  # rejection path with exclusions
        (20, 15, None),  # random-keys path (n is most of what a row allows)
    ],
)
def test_draws_are_uniform_over_allowed_items(num_items, n, exclude):
    rows = 100_000
    sets = [exclude] * rows if exclude else None
    negs = sample_negatives(num_items, [0] * rows, n, seed=12345, exclude=sets)
    counts = np.bincount(negs.numpy().ravel(), minlength=num_items)
    forbidden = {0} | (exclude or set())
    assert all(counts[i] == 0 for i in forbidden)
    allowed = np.array([counts[i] for i in range(num_items) if i not in forbidden])
    # At most 18 degrees of freedom: an unbiased sampler exceeds 60 with p < 1e-5, while
    # giving one item 10 % more than its share adds about 260 at this many draws.
    assert _chi_square(allowed) < 60


def test_first_position_is_uniform_too():
    negs = sample_negatives(20, [0] * 20_000, 5, seed=99)
    counts = np.bincount(negs[:, 0].numpy(), minlength=20)[1:]
    assert _chi_square(counts) < 60


def test_save_load_round_trip(tmp_path):
    negs = sample_negatives(1000, list(range(50)), 99, seed=0)
    path = tmp_path / "fkcb_food_test_negatives.npy"
    save_negatives(path, negs)
    loaded = load_negatives(path)
    assert loaded.dtype == torch.int64 and torch.equal(loaded, negs)
    save_negatives(path, negs[:3])  # overwrite in place
    assert torch.equal(load_negatives(path), negs[:3])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_save_rejects_non_integer(tmp_path):
    with pytest.raises(ValueError):
        save_negatives(tmp_path / "x.npy", torch.zeros(2, 2))


def test_rows_that_run_short_are_redrawn_without_bias(monkeypatch):
    import p2pmoe.eval.negatives as negatives

    # Streams barely longer than n make most rows come up short and go round the retry loop.
    def barely_enough(allowed: np.ndarray, num_items: int, n: int) -> np.ndarray:
        return np.full(allowed.shape, n + 2)

    monkeypatch.setattr(negatives, "_draws_needed", barely_enough)
    rows = 20_000
    negs = sample_negatives(20, [0] * rows, 5, seed=5, exclude=[{7}] * rows)
    _check_rows(negs, [0] * rows, [{7}] * rows)
    counts = np.bincount(negs.numpy().ravel(), minlength=20)
    assert _chi_square(np.delete(counts, [0, 7])) < 60
