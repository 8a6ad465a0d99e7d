"""Run a whole experiment in one process and write its run folder."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from p2pmoe.config import RunConfig
from p2pmoe.experiment import build_experiment, resolve_config
from p2pmoe.ledger import ByteLedger
from p2pmoe.runs import RunFolder, make_summary, summarise_metrics
from p2pmoe.sim.bus import InMemoryBus
from p2pmoe.sim.links import round_comm_time
from p2pmoe.wire.compression import parse_compression


class ModelSelection:
    """Early-stopping style selection: when nodes report `valid_mrr`, the run's result is every
    node's metrics at the evaluated round with the best mean validation MRR over nodes (the
    FedDCSR/FMoE-CDSR protocol); otherwise the last evaluation is the result."""

    key = "valid_mrr"

    def __init__(self) -> None:
        self.round: int | None = None
        self.metrics: dict[str, dict[str, float]] | None = None
        self._best = float("-inf")

    def offer(self, round_index: int, per_node: dict[str, dict[str, float]]) -> None:
        values = [m[self.key] for m in per_node.values() if self.key in m]
        if values and sum(values) / len(values) > self._best:
            self._best = sum(values) / len(values)
            self.round = round_index
            self.metrics = {node: dict(m) for node, m in per_node.items()}


def run_simulation(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run `cfg` on the in-memory bus; return the summary that was written to summary.json."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    cfg = resolve_config(cfg)
    experiment = build_experiment(cfg)
    ledger = ByteLedger()
    bus = InMemoryBus(experiment.nodes, ledger, compression=parse_compression(cfg.compression))
    folder = RunFolder(cfg.out)
    last_eval: dict[str, dict[str, float]] = {}
    selected = ModelSelection()
    rounds = tqdm(range(cfg.rounds), desc=f"{cfg.method} on {cfg.data}", unit="round", disable=not progress)
    comm_seconds: list[float] = []
    for r in rounds:
        first_entry = len(ledger.entries)
        train_stats = bus.run_round(r)
        comm_seconds.append(round_comm_time(ledger.entries[first_entry:], experiment.graph, (cfg.link_bandwidth, cfg.link_latency)))
        evaluate = (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1
        for node in experiment.clients:
            metrics = experiment.nodes[node].evaluate() if evaluate else {}
            if evaluate:
                last_eval[node] = metrics
            traffic = ledger.node_traffic(node, r)
            folder.log({"round": r, "node": node, **train_stats[node], **metrics, "bytes_sent": traffic["sent"], "bytes_received": traffic["received"], "sim_comm_seconds": comm_seconds[-1]})
        if evaluate and last_eval:
            selected.offer(r, last_eval)
            means, _ = summarise_metrics(last_eval)
            rounds.set_postfix({name: f"{value:.4f}" for name, value in means.items() if "@" not in name})
    summary = make_summary(cfg, selected.metrics or last_eval, ledger, experiment.clients, time.perf_counter() - started)
    if selected.round is not None:
        summary["selected_round"] = selected.round
    summary["sim_seconds"] = {"comm_total": sum(comm_seconds), "comm_per_round": sum(comm_seconds) / len(comm_seconds)}
    folder.log_messages(ledger.entries)
    folder.finish(summary)
    return summary
