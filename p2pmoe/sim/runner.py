"""Run a whole experiment in one process and write its run folder."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from p2pmoe.config import RunConfig
from p2pmoe.experiment import build_experiment
from p2pmoe.ledger import ByteLedger
from p2pmoe.runs import RunFolder
from p2pmoe.sim.bus import InMemoryBus


def summarise_metrics(per_node: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean over nodes of each metric, and its spread (std, min, max) over nodes."""
    names = sorted({name for metrics in per_node.values() for name in metrics})
    means, spread = {}, {}
    for name in names:
        values = [m[name] for m in per_node.values() if name in m]
        means[name] = statistics.fmean(values)
        spread[name] = {
            "std": statistics.pstdev(values),
            "min": min(values),
            "max": max(values),
        }
    return means, spread


def run_simulation(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run `cfg` on the in-memory bus; return the summary that was written to summary.json."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    experiment = build_experiment(cfg)
    ledger = ByteLedger()
    bus = InMemoryBus(experiment.nodes, ledger)
    folder = RunFolder(cfg.out)
    last_eval: dict[str, dict[str, float]] = {}
    rounds = tqdm(range(cfg.rounds), desc=f"{cfg.method} on {cfg.data}", unit="round", disable=not progress)
    for r in rounds:
        train_stats = bus.run_round(r)
        evaluate = (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1
        for node in experiment.clients:
            metrics = experiment.nodes[node].evaluate() if evaluate else {}
            if evaluate:
                last_eval[node] = metrics
            traffic = ledger.node_traffic(node, r)
            folder.log({"round": r, "node": node, **train_stats[node], **metrics, "bytes_sent": traffic["sent"], "bytes_received": traffic["received"]})
        if evaluate and last_eval:
            means, _ = summarise_metrics(last_eval)
            rounds.set_postfix({name: f"{value:.4f}" for name, value in means.items()})
    means, spread = summarise_metrics(last_eval)
    summary = {
        "method": cfg.method,
        "data": cfg.data,
        "nodes": cfg.nodes,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "metrics": means,
        "metrics_spread": spread,
        "bytes": {**ledger.totals(), "per_node_per_round": ledger.per_node_per_round(experiment.clients, cfg.rounds)},
        "wall_seconds": round(time.perf_counter() - started, 2),
        "setting": dataclasses.asdict(cfg),
    }
    folder.finish(summary, ledger)
    return summary
