"""Does the gate correlation find label-similar peers? The analysis on hand-made plans."""

import math

import numpy as np
import pytest

from p2pmoe.report.peer_similarity import gate_similarity, peer_mass, selection_vs_labels

# Two groups of nodes: a and b see classes 0-1, c and d see classes 2-3.
LABELS = {"a": [50, 50, 0, 0], "b": [40, 60, 0, 0], "c": [0, 0, 50, 50], "d": [0, 0, 60, 40]}
GATES = {"a": [[1.0, 0.0], [0.9, 0.1]], "b": [[0.95, 0.05], [1.0, 0.0]], "c": [[0.0, 1.0], [0.1, 0.9]], "d": [[0.05, 0.95], [0.0, 1.0]]}


def _rows(partner: dict[str, str], round_index: int = 3) -> list[dict]:
    """One planned round: each node gives half of each expert's weight to its partner's slot 0."""
    rows = []
    for node in LABELS:
        peers = sorted(set(LABELS) - {node})
        sources = [[node, 0], [node, 1]] + [[p, s] for p in peers for s in (0, 1)]
        weights = [[0.0] * len(sources) for _ in range(2)]
        for e in range(2):
            weights[e][e] = 0.5
            weights[e][sources.index([partner[node], 0])] = 0.5
        rows.append({"round": round_index, "node": node, "diagnostics": {"plan_sources": sources, "plan_weights": weights, "gate": GATES[node]}})
    return rows + [{"round": 0, "node": "a", "train": {}}]


def test_partners_from_the_same_group_are_closer_than_random_and_gates_rank_them():
    found = selection_vs_labels(_rows({"a": "b", "b": "a", "c": "d", "d": "c"}), LABELS)
    assert found["round"] == 3 and found["nodes_fetching"] == 4 and found["nodes_closer_than_random"] == 4
    assert found["mean_js_fetched"] < 0.05 < found["mean_js_random_peer"]
    assert found["spearman_gate_vs_label_similarity"] > 0.8 and found["pairs"] == 12
    assert found["nodes"]["a"]["peers"] == {"b": pytest.approx(0.5)}


def test_partners_across_groups_are_reported_as_farther_than_random():
    found = selection_vs_labels(_rows({"a": "c", "b": "d", "c": "a", "d": "b"}), LABELS)
    assert found["nodes_closer_than_random"] == 0 and found["mean_js_fetched"] == pytest.approx(1.0)


def test_a_run_without_plans_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="no row carries a FedMoE-DA plan"):
        selection_vs_labels([{"round": 0, "node": "a", "train": {}}], LABELS)


def test_peer_mass_and_gate_similarity():
    diag = _rows({"a": "b", "b": "a", "c": "d", "d": "c"})[0]["diagnostics"]
    assert peer_mass(diag, "a") == {"b": pytest.approx(0.5)}
    assert gate_similarity(np.array(GATES["a"]), np.array(GATES["a"])) == pytest.approx(1.0)
    assert not math.isnan(gate_similarity(np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]])))
