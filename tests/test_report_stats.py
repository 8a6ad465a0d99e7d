"""Comparisons over seeds: paired differences, the two-standard-error rule, rank correlation
and the Jensen-Shannon divergence."""

import math

import pytest

from p2pmoe.report.stats import js_divergence, paired, spearman, spread


def test_a_consistent_gain_over_three_seeds_is_called_and_a_noisy_one_is_not():
    base = {0: 0.80, 1: 0.85, 2: 0.83}
    steady = paired({s: v + 0.02 + 0.001 * s for s, v in base.items()}, base)
    assert steady.verdict == "better" and steady.by_seed.mean == pytest.approx(0.021)
    noisy = paired({0: 0.82, 1: 0.84, 2: 0.86}, base)  # +0.02, -0.01, +0.03
    assert noisy.by_seed.se == pytest.approx(0.0120185, rel=1e-4) and noisy.verdict == "not shown"
    assert paired({0: 0.7, 1: 0.7, 2: 0.7}, base).verdict == "worse"


def test_two_seeds_never_suffice_whatever_the_gap():
    assert paired({0: 0.9, 1: 0.91}, {0: 0.5, 1: 0.5}).verdict == "not shown"
    with pytest.raises(ValueError, match="no seed in common"):
        paired({0: 1.0}, {1: 1.0})


def test_per_node_pairs_use_only_nodes_both_runs_scored():
    result = paired({0: 0.0}, {0: 0.0}, {0: {"a": 0.9, "b": 0.5, "c": 0.1}}, {0: {"a": 0.8, "b": 0.7}})
    assert result.per_pair is not None and result.per_pair.n == 2 and result.per_pair.mean == pytest.approx(-0.05)
    low, high = result.pair_interval()
    assert low < -0.05 < high


def test_spread_of_one_value_has_no_standard_deviation():
    one = spread([0.5])
    assert one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.se)


def test_spearman_is_rank_based_and_handles_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)  # scipy's value with average ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_js_divergence_is_zero_for_equal_shapes_and_one_for_disjoint_supports():
    assert js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert js_divergence([5, 0], [0, 7]) == pytest.approx(1.0)
    assert 0 < js_divergence([3, 1], [1, 3]) < 1
    with pytest.raises(ValueError):
        js_divergence([0, 0], [1, 1])


def _summary(accuracy: float, round_index: int) -> dict:
    return {
        "metrics": {"accuracy": accuracy},
        "per_node": {"node-00": {"accuracy": accuracy}},
        "bytes": {"per_node_per_round": {"total": 10.0}},
        "selection": {"round": round_index},
    }


def test_a_seed_table_says_each_seed_s_round_and_pairs_only_seeds_in_common():
    from p2pmoe.report.seeds import seed_table

    runs = {
        "a": {0: _summary(0.6, 4), 1: _summary(0.62, 9), 2: _summary(0.61, 9)},
        "b": {0: _summary(0.5, 3), 1: _summary(0.52, 9), 2: _summary(0.5, 2)},
        "c": {5: _summary(0.4, 0)},  # a run of another seed only: nothing to pair
    }
    rows = {r["method"]: r for r in seed_table(runs, "accuracy", "a", "a")}
    assert rows["a"]["selected round"] == "5/10/10" and rows["b"]["verdict"] == "better"
    assert rows["b"]["a − this"] == pytest.approx(0.1033, abs=1e-4)
    assert rows["c"]["verdict"] == "no seed in common" and "a − this" not in rows["c"]


def test_a_seed_table_column_named_node_slash_metric_is_that_node_s_value_over_seeds():
    from p2pmoe.report.seeds import seed_table

    runs = {"a": {0: _summary(0.6, 1), 1: _summary(0.7, 1)}, "b": {0: {**_summary(0.5, 1), "per_node": {}}}}
    rows = {r["method"]: r for r in seed_table(runs, "accuracy", "a", "a", ["node-00/accuracy", "node-07/accuracy"])}
    assert rows["a"]["node-00/accuracy"] == pytest.approx(0.65)
    assert math.isnan(rows["a"]["node-07/accuracy"]) and math.isnan(rows["b"]["node-00/accuracy"])  # no such node: no value
