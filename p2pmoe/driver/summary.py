"""One summariser for every driver: metrics rows and a ledger in, summary.json out.

`simulate` and `swarm` (and a LAN run's gathered folders) pass their rows here, so they apply
the same model-selection rule per task family and report the same fields. Rows keep training
statistics (`train`) apart from evaluation metrics (`metrics`).
"""

from __future__ import annotations

import statistics
from typing import Any

from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.attacks import attacker_nodes
from p2pmoe.methods.registry import get_method
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import Selection, Task

Row = dict[str, Any]


def metrics_row(
    node: str, round_index: int, train: dict[str, float], metrics: dict[str, float] | None, sent: int, received: int, diagnostics: dict[str, Any] | None = None
) -> Row:
    """One metrics.jsonl line: a node's round, its training statistics, its evaluation (when
    the round was evaluated), the bytes it sent and received that round, and the method's
    diagnostics (when it has any)."""
    row: Row = {"round": round_index, "node": node, "train": train, "bytes_sent": sent, "bytes_received": received}
    if metrics:  # a node without data (a server) has nothing to report
        row["metrics"] = metrics
    if diagnostics:
        row["diagnostics"] = diagnostics
    return row


def summarise_metrics(per_node: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean over nodes of each metric, and its spread (std, min, max) over nodes."""
    names = sorted({name for metrics in per_node.values() for name in metrics})
    means, spread = {}, {}
    for name in names:
        values = [m[name] for m in per_node.values() if name in m]
        means[name] = statistics.fmean(values)
        spread[name] = {"std": statistics.pstdev(values), "min": min(values), "max": max(values)}
    return means, spread


def select_round(rows: list[Row], clients: list[str], selection: Selection) -> tuple[int | None, dict[str, dict[str, float]]]:
    """The evaluated round that is the run's result and every client's metrics in it.

    With a selection key: the round with the best mean of the key over the clients that
    evaluated it (ties: the earliest). Without: the last evaluated round. Project decision: a
    round counts only for the clients that logged it, so a node that died does not erase the
    others' results.
    """
    by_round: dict[int, dict[str, dict[str, float]]] = {}
    members = set(clients)
    for row in rows:
        if row["node"] in members and "metrics" in row:
            by_round.setdefault(row["round"], {})[row["node"]] = row["metrics"]
    if not by_round:
        return None, {}
    if selection.key is None:
        best = max(by_round)
    else:
        key = selection.key
        scored = {r: statistics.fmean(m[key] for m in nodes.values()) for r, nodes in by_round.items() if all(key in m for m in nodes.values())}
        if not scored:
            best = max(by_round)
        else:
            sign = 1 if selection.higher else -1
            best = max(sorted(scored), key=lambda r: sign * scored[r])
    return best, dict(sorted(by_round[best].items()))


def training_compute(rows: list[Row], clients: list[str], rounds: int) -> dict[str, float]:
    """Examples x epochs the clients trained on over the run: local training (`sample_epochs`
    of the train statistics) plus fine-tuning done only to evaluate (`eval_sample_epochs`,
    FedAvg-FT), in total and per client and round."""
    members = set(clients)
    total = sum(row["train"].get("sample_epochs", 0.0) + row.get("metrics", {}).get("eval_sample_epochs", 0.0) for row in rows if row["node"] in members)
    return {"sample_epochs": total, "per_node_per_round": total / max(len(clients) * rounds, 1)}


def first_exchange_round(ledger: ByteLedger, clients: list[str]) -> int | None:
    """The first round in which a client received tensors from another node (None: never)."""
    members = set(clients)
    return min((e.round for e in ledger.entries if e.dst in members and e.src != e.dst and e.payload_bytes > 0), default=None)


def selection_warning(chosen: int | None, first_exchange: int | None) -> str | None:
    """Why a selected round says little about federation, or None.

    Issue 28: on a user's small data every FMoE-CDSR run selected round 0, whose models had
    not trained on anything another node sent (the gate sat on the own branch), and nothing
    said so. A run without any exchange (Local) gets no warning: it claims none.
    """
    if chosen is None or first_exchange is None or chosen > first_exchange:
        return None
    return (
        f"model selection picked round {chosen}, no later than the first round in which a client received another node's tensors "
        f"(round {first_exchange}): no node had yet trained on anything another node sent (what the models hold from others, "
        "an average or a peer's expert, came after their last training), so this result says little about what the exchange "
        "brings; look at the selection metric by round (metrics.jsonl, the report) and run more rounds"
    )


def client_holdings(task: Task, cfg: ExperimentConfig, clients: list[str]) -> dict[str, str]:
    """Which domain or scenario each client holds ({} when clients are anonymous parts)."""
    names = task.client_names(cfg)
    return dict(zip(clients, names, strict=True)) if names is not None else {}


def make_summary(
    cfg: ExperimentConfig, task: Task, rows: list[Row], ledger: ByteLedger, clients: list[str], wall_seconds: float, driver: str
) -> dict[str, Any]:
    """summary.json: the selected round's metrics over clients, training statistics of that
    round, byte totals, what the task says of its data (`data_profile`: cold-start shares, the
    random-ranking level; `holds`: each client's domain; `unused_run_options`: `[run]` options
    its family never reads, which a caption must not show) and the whole setting. Rounds are numbered from 0, as in
    metrics.jsonl and ledger.csv; `selection.warning` says when the selected round precedes
    any training on exchanged tensors."""
    chosen, per_node = select_round(rows, clients, task.selection)
    means, spread = summarise_metrics(per_node)
    train_rows = {row["node"]: row["train"] for row in rows if row["round"] == chosen and row["node"] in clients}
    train_means, _ = summarise_metrics(train_rows)
    first_exchange = first_exchange_round(ledger, clients)
    warning = selection_warning(chosen, first_exchange)
    return {
        "method": cfg.run.method,
        "data": cfg.run.data,
        "nodes": cfg.run.nodes,
        "rounds": cfg.run.rounds,
        "seed": cfg.run.seed,
        "driver": driver,
        "selection": {"key": task.selection.key, "round": chosen, "first_exchange_round": first_exchange, **({"warning": warning} if warning else {})},
        "metrics": means,
        "metrics_spread": spread,
        "per_node": per_node,
        "train": train_means,
        "bytes": {**ledger.totals(), "per_node_per_round": ledger.per_node_per_round(clients, cfg.run.rounds)},
        "compute": training_compute(rows, clients, cfg.run.rounds),
        "wall_seconds": round(wall_seconds, 2),
        "data_profile": task.profile(cfg),
        "holds": client_holdings(task, cfg, clients),
        "unused_run_options": sorted(task.unused_run_options),
        "setting": cfg.to_dict(),
        **_honest(cfg, clients, per_node),
        **_method_extra(cfg),
    }


def _method_extra(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the method adds to summary.json (FedAvg with DP: the privacy spent)."""
    spec = get_method(cfg.run.method)
    return spec.summary_extra(spec.options_of(cfg), cfg) if spec.summary_extra is not None else {}


def _honest(cfg: ExperimentConfig, clients: list[str], per_node: dict[str, dict[str, float]]) -> dict[str, Any]:
    """With attackers (issue 30): who they were and the selected round's metrics over the
    honest clients only, what an attack and a defence are judged by."""
    if not cfg.run.attack:
        return {}
    liars = sorted(attacker_nodes(cfg.run.seed, clients, cfg.run.attackers))
    honest, _ = summarise_metrics({node: values for node, values in per_node.items() if node not in liars})
    return {"attackers": liars, "honest_metrics": honest}
