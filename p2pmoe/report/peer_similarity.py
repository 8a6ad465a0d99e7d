"""Does FedMoE-DA's gate correlation find peers with similar data? Read from a run's rows.

FedMoE-DA picks the peer experts a node aggregates by the cosine similarity of gate columns
(Eq. 8-10). The paper's premise is that similar gates mean similar data ("domains"). This
module checks the premise on a run: with each client's training label histogram (known to the
analysis, never to the nodes), it compares, per node,
- the label distribution of the peers whose experts it fetched (weighted by the mass its plan
  gives each peer) against its own, as a Jensen-Shannon divergence, beside the mean JS to
  every peer it could have picked (what a random choice would give);
- over all (node, peer) pairs of the round, the gate similarity (mean over the node's experts
  of the best cosine with any of the peer's expert proxies: the quantity the selection ranks)
  against the label similarity (1 - JS), as Spearman's rank correlation.
Project decision: the paper reports no such check; a correlation near zero means the gate
does not find similar peers, whatever the accuracy says.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from p2pmoe.report.stats import js_divergence, spearman

Row = dict[str, Any]


def plan_round(rows: Sequence[Row]) -> int | None:
    """The last round whose rows carry FedMoE-DA plans (`plan_weights` diagnostics)."""
    rounds = [row["round"] for row in rows if "plan_weights" in row.get("diagnostics", {})]
    return max(rounds) if rounds else None


def peer_mass(diagnostics: Mapping[str, Any], node: str) -> dict[str, float]:
    """How much of a node's plan goes to each peer: the weights its experts give the peer's
    columns, averaged over its experts (each expert's row sums to 1, the own columns included)."""
    weights = np.asarray(diagnostics["plan_weights"], dtype=float)
    mass: dict[str, float] = {}
    for column, (source, _slot) in enumerate(diagnostics["plan_sources"]):
        if source != node and weights[:, column].sum() > 0:
            mass[source] = mass.get(source, 0.0) + float(weights[:, column].mean())
    return mass


def gate_similarity(own: np.ndarray, peer: np.ndarray) -> float:
    """Mean over own expert proxies of the best cosine with any of the peer's proxies."""
    a = own / np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-12)
    b = peer / np.maximum(np.linalg.norm(peer, axis=1, keepdims=True), 1e-12)
    return float((a @ b.T).max(axis=1).mean())


def selection_vs_labels(rows: Sequence[Row], labels: Mapping[str, Sequence[int]], round_index: int | None = None) -> dict[str, Any]:
    """Per node and overall, whether the plan of `round_index` (default: the last planned round)
    picked label-similar peers. `labels` maps each client to its training label counts."""
    chosen = plan_round(rows) if round_index is None else round_index
    if chosen is None:
        raise ValueError("no row carries a FedMoE-DA plan (plan_weights diagnostics): not a FedMoE-DA run, or diagnostics were not logged")
    diags = {row["node"]: row["diagnostics"] for row in rows if row["round"] == chosen and "plan_weights" in row.get("diagnostics", {})}
    gates = {node: np.asarray(d["gate"], dtype=float) for node, d in diags.items()}
    nodes: dict[str, dict[str, Any]] = {}
    pair_gate, pair_label = [], []
    for node, diag in sorted(diags.items()):
        mass = peer_mass(diag, node)
        candidates = sorted({source for source, _ in diag["plan_sources"] if source != node})
        divergence = {peer: js_divergence(labels[node], labels[peer]) for peer in candidates}
        entry: dict[str, Any] = {"labels": list(labels[node]), "peers": mass, "js_random_peer": statistics.fmean(divergence.values()) if divergence else None}
        if mass:
            total = sum(mass.values())
            mixture = np.sum([np.asarray(labels[p], dtype=float) / sum(labels[p]) * (m / total) for p, m in mass.items()], axis=0)
            entry["fetched_labels"] = mixture.tolist()
            entry["js_fetched"] = js_divergence(labels[node], mixture.tolist())
        nodes[node] = entry
        for peer in candidates:
            if peer in gates:
                pair_gate.append(gate_similarity(gates[node], gates[peer]))
                pair_label.append(1.0 - divergence[peer])
    fetched = [e["js_fetched"] for e in nodes.values() if "js_fetched" in e]
    random_pick = [e["js_random_peer"] for e in nodes.values() if "js_fetched" in e]
    return {
        "round": chosen,
        "nodes": nodes,
        "spearman_gate_vs_label_similarity": spearman(pair_gate, pair_label) if len(pair_gate) >= 2 else float("nan"),
        "pairs": len(pair_gate),
        "mean_js_fetched": statistics.fmean(fetched) if fetched else float("nan"),
        "mean_js_random_peer": statistics.fmean(random_pick) if random_pick else float("nan"),
        "nodes_closer_than_random": sum(f < r for f, r in zip(fetched, random_pick, strict=True)),
        "nodes_fetching": len(fetched),
    }
