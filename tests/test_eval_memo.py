"""Scores of identical models: computed once, and equal to a recomputation."""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from torch import nn

from p2pmoe.eval.memo import ScoreMemo, model_fingerprint


def test_fingerprint_sees_every_weight_buffer_and_the_class():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    b = copy.deepcopy(a)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-7
    assert model_fingerprint(a) != model_fingerprint(b)
    c = copy.deepcopy(a)
    c[1].running_mean += 1  # a buffer, not a parameter
    assert model_fingerprint(a) != model_fingerprint(c)
    d = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    d.load_state_dict(a.state_dict())
    assert model_fingerprint(d) == model_fingerprint(a)

    class Other(nn.Sequential):
        pass

    e = Other(nn.Linear(4, 3), nn.BatchNorm1d(3))
    e.load_state_dict(a.state_dict())
    assert model_fingerprint(e) != model_fingerprint(a)


def test_memo_computes_once_per_distinct_model_and_forgets_the_oldest():
    torch.manual_seed(0)
    models = [nn.Linear(3, 2) for _ in range(3)]
    x = torch.randn(50, 3)
    calls = []

    def scorer(model):
        def compute():
            calls.append(model)
            with torch.inference_mode():
                return float(model(x).sum())

        return compute

    memo = ScoreMemo(capacity=2)
    first = memo.score(models[0], scorer(models[0]))
    twin = copy.deepcopy(models[0])
    assert memo.score(twin, scorer(twin)) == first and len(calls) == 1 and memo.hits == 1
    memo.score(models[1], scorer(models[1]))
    memo.score(models[2], scorer(models[2]))  # evicts models[0], the least recently used
    assert len(calls) == 3
    assert memo.score(models[0], scorer(models[0])) == first and len(calls) == 4
    with pytest.raises(ValueError):
        ScoreMemo(capacity=0)


def test_learners_sharing_a_memo_score_equal_models_once_with_the_same_result():
    from p2pmoe.learners.vision import ImageClassifierLearner

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (120, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (120,), generator=gen)
    glob = (images[80:], labels[80:])

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

    def learner(memo, rows):
        return ImageClassifierLearner(net(), (images[rows], labels[rows]), (images[rows], labels[rows]), global_test=glob, global_memo=memo)

    memo = ScoreMemo()
    shared = [learner(memo, slice(0, 40)), learner(memo, slice(40, 80))]
    alone = [learner(None, slice(0, 40)), learner(None, slice(40, 80))]
    for group in (shared, alone):
        group[1].model.load_state_dict(group[0].model.state_dict())  # as after a FedAvg round
    assert [lrn.evaluate() for lrn in shared] == [lrn.evaluate() for lrn in alone]
    assert memo.hits == 1
    shared[1].train(1)  # now different weights: scored anew
    alone[1].train(1)
    assert shared[1].evaluate() == alone[1].evaluate() and memo.hits == 1


def test_a_memo_shared_by_threads_keeps_scores_right_and_evaluations_parallel() -> None:
    """With workers several nodes evaluate at once: their scores run side by side (the lock
    guards the table, never a computation: both computations below must meet at the barrier),
    and interleaved lookups and evictions (a tiny switch interval makes them interleave often)
    still give every call its own model's score."""
    models = [torch.nn.Linear(2, 1) for _ in range(2)]
    memo = ScoreMemo(capacity=1)
    meet = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def hammer(i: int) -> None:
        try:
            assert memo.score(models[i], lambda: (meet.wait(), float(i))[1]) == float(i)
            for k in range(1000):
                j = (k + i) % len(models)
                assert memo.score(models[j], lambda j=j: float(j)) == float(j)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and not any(t.is_alive() for t in threads)
