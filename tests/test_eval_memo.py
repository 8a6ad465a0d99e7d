"""Scores of identical models: computed once, and equal to a recomputation."""

from __future__ import annotations

import copy

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
