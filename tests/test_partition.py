import numpy as np
import pytest

from p2pmoe.data.partition import class_shares, parse_scheme, partition_clients


def _labels(per_class: int, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


def test_iid_gives_every_client_an_equal_share_of_each_class():
    splits = partition_clients(_labels(100), _labels(20), 5, "iid", seed=0)
    for split in splits:
        assert np.bincount(_labels(100)[split.train], minlength=10).tolist() == [20] * 10
        assert np.bincount(_labels(20)[split.test], minlength=10).tolist() == [4] * 10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "shards:2"])
def test_every_example_goes_to_exactly_one_client(scheme):
    train, test = _labels(60), _labels(10)
    splits = partition_clients(train, test, 6, scheme, seed=3)
    all_train = np.concatenate([s.train for s in splits])
    assert sorted(all_train.tolist()) == list(range(len(train)))
    all_test = np.concatenate([s.test for s in splits])
    assert sorted(all_test.tolist()) == list(range(len(test)))


def test_test_split_follows_the_train_label_distribution():
    train, test = _labels(1000), _labels(500)
    for split in partition_clients(train, test, 4, "dirichlet:0.5", seed=1):
        p_train = np.bincount(train[split.train], minlength=10) / len(split.train)
        p_test = np.bincount(test[split.test], minlength=10) / max(len(split.test), 1)
        assert np.abs(p_train - p_test).max() < 0.02


def test_small_alpha_skews_labels_more_than_large_alpha():
    def mean_max_share(alpha: float) -> float:
        return float(class_shares(10, 20, f"dirichlet:{alpha}", seed=0).max(axis=1).mean())

    assert mean_max_share(0.1) > mean_max_share(10.0) + 0.2


def test_shards_give_each_client_at_most_n_classes():
    train = _labels(100)
    for split in partition_clients(train, _labels(10), 10, "shards:2", seed=0):
        assert 1 <= len(np.unique(train[split.train])) <= 2


def test_same_seed_same_partition_and_other_seed_differs():
    a = partition_clients(_labels(50), _labels(5), 3, "dirichlet:0.5", seed=4)
    b = partition_clients(_labels(50), _labels(5), 3, "dirichlet:0.5", seed=4)
    c = partition_clients(_labels(50), _labels(5), 3, "dirichlet:0.5", seed=5)
    assert all(np.array_equal(x.train, y.train) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:0", "dirichlet:-1", "shards:1.5", "iid:3", "zipf:2"])
def test_bad_schemes_are_explained(bad):
    with pytest.raises(ValueError, match="expected 'iid'"):
        parse_scheme(bad)
