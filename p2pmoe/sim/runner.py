"""`p2pmoe simulate`: a whole experiment in one process, written to a run folder."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from p2pmoe.driver.summary import Row, client_holdings, make_summary
from p2pmoe.experiment import Experiment, build_experiment, resolve_experiment
from p2pmoe.ledger import ByteLedger
from p2pmoe.methods.base import LearnerMethod
from p2pmoe.methods.registry import run_participation
from p2pmoe.report import write_report
from p2pmoe.report.tables import profile_lines
from p2pmoe.runs import RunFolder
from p2pmoe.settings import ExperimentConfig, parse_compute_time
from p2pmoe.sim.bus import GlobalRNGUsed, SimNetwork, random_module
from p2pmoe.sim.links import comm_time_by_round
from p2pmoe.sim.resume import CHECKPOINT_NAME, checkpoint_due, resume_network, save_network
from p2pmoe.tasks.base import resolve_device
from p2pmoe.trackers import open_trackers
from p2pmoe.wire.compression import parse_compression


class _Progress:
    """The progress bar: rounds done, the latest mean selection metric (kept through rounds
    that are not evaluated), bytes so far."""

    def __init__(self, total_rounds: int, clients: list[str], key: str | None, ledger: ByteLedger, label: str, enabled: bool) -> None:
        self.bar = tqdm(total=total_rounds, desc=label, unit="round", disable=not enabled)
        self.clients, self.key, self.ledger = set(clients), key, ledger
        self._rows: dict[int, list[Row]] = {}
        self._latest = ""

    def __call__(self, row: Row) -> None:
        if row["node"] not in self.clients:
            return
        rows = self._rows.setdefault(row["round"], [])
        rows.append(row)
        if len(rows) < len(self.clients):
            return
        del self._rows[row["round"]]
        post = {"MB": f"{sum(e.total for e in self.ledger.entries) / 1e6:.1f}"}
        key = self.key
        values = [r["metrics"][key] for r in rows if key and key in r.get("metrics", {})]
        if values:
            self._latest = f"{sum(values) / len(values):.4f}"
        if self._latest and key:
            post[key] = self._latest
        self.bar.set_postfix(post)
        self.bar.update(1)


def compute_seconds(cfg: ExperimentConfig, experiment: Experiment) -> list[float]:
    """Simulated training time of each round: its slowest sampled client's, from `compute_time`.

    Project decision: a round's simulated time is this compute time plus the links' time of
    its messages; the straggler sets the pace because every method here waits for its
    peers (or server) within a round. Under partial participation only the clients sampled
    for the round train, so only they can straggle.
    """
    kind, seconds = parse_compute_time(cfg.run.compute_time)
    if kind == "none" or not experiment.clients:
        return [0.0] * cfg.run.rounds
    if kind == "constant":
        return [seconds] * cfg.run.rounds
    client_nodes = {n: experiment.nodes[n] for n in experiment.clients}
    sizes = {n: node.learner.num_train_examples for n, node in client_nodes.items() if isinstance(node, LearnerMethod)}
    participation = run_participation(cfg, experiment.clients)
    return [seconds * cfg.run.local_epochs * max((sizes[n] for n in participation.among(sizes, r)), default=0) for r in range(cfg.run.rounds)]


def refuse_global_rng(cfg: ExperimentConfig, experiment: Experiment) -> None:
    """With workers, refuse before round 0 a node whose model draws from torch's global RNG."""
    for node, method in experiment.nodes.items():
        model = getattr(getattr(method, "learner", None), "model", None)
        found = random_module(model) if isinstance(model, nn.Module) else None
        if found:
            raise GlobalRNGUsed(
                f"--workers {cfg.run.workers}: {node}'s model draws from torch's global random generator in training (dropout in {found}), "
                "which nodes running at once share; run with --workers 1"
            )


def run_simulation(cfg: ExperimentConfig, progress: bool = True, report: bool = True, checkpoint_every: int = 0, resume: bool = False) -> dict[str, Any]:
    """Run `cfg` on the in-memory network; return the summary written to summary.json. With
    `report`, also write the run's report (figures, index.html) into `<out>/report`.

    `checkpoint_every` N > 0 writes every node's state to `<out>/checkpoint.safetensors` after
    every N-th round and the last; `resume` goes on from that file when `<out>` has one (see
    `p2pmoe.sim.resume`) and starts at round 0 when it has none. A resumed run gives the
    metrics and bytes of one that was never interrupted."""
    if cfg.run.workers > 1 and resolve_device(cfg.run.device).type != "cpu":
        raise ValueError("workers > 1 runs on the CPU only (--device cpu): the check that no node draws from torch's global RNG sees the CPU generator")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be 0 (never) or a number of rounds, got {checkpoint_every}")
    threads = cfg.run.threads or (1 if cfg.run.workers > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    resolved = resolve_experiment(cfg)  # simulate's edge: everything below gets the resolved experiment
    experiment = build_experiment(resolved)
    cfg = resolved.cfg
    if cfg.run.workers > 1:
        refuse_global_rng(cfg, experiment)
    for line in profile_lines(experiment.task.profile(cfg)):
        print(line, file=sys.stderr, flush=True)
    out, rounds = Path(cfg.run.out), cfg.run.rounds
    ledger = ByteLedger()
    key = experiment.task.selection.key or experiment.task.metrics[0]
    bar = _Progress(rounds, experiment.clients, key, ledger, f"{cfg.run.method} on {cfg.run.data}", progress)
    seeds = {node: resolved.node_seed(node) for node in experiment.nodes}
    accounting = cfg.run.train == "none"
    on_round = bar if progress else None  # nobody reads a hidden bar's postfix, which sums the whole ledger each round
    network = SimNetwork(
        experiment.nodes,
        ledger,
        seeds,
        accounting,
        compression=parse_compression(cfg.run.compression),
        on_round=on_round,
        workers=cfg.run.workers,
        adversaries={node: a for node in experiment.nodes if (a := resolved.adversary(node)) is not None},
    )
    resumed = resume_network(out, network.runners, cfg) if resume else None
    first, earlier_wall = 0, 0.0
    if resumed is not None:
        first, earlier_wall = resumed.round + 1, resumed.wall_seconds
        ledger.extend(resumed.ledger)
        network.rows = [{k: v for k, v in row.items() if k != "diagnostics"} for row in resumed.rows]
        bar.bar.update(first)
        print(f"resuming {out} after round {resumed.round} (rounds 0..{rounds - 1}, numbered from 0) from {out / CHECKPOINT_NAME}", file=sys.stderr, flush=True)
    elif resume:
        print(f"no checkpoint in {out}: starting at round 0 (rounds 0..{rounds - 1}, numbered from 0)", file=sys.stderr, flush=True)
    holds = client_holdings(experiment.task, cfg, experiment.clients)
    trackers = open_trackers(cfg.run.tensorboard, cfg.run.mlflow, out.name, cfg.to_dict())
    folder = network.folder = RunFolder(out, append=resumed is not None, holds=holds, trackers=trackers)
    logged = len(ledger.entries)  # ledger entries already in ledger.csv

    async def drive() -> list[Row]:
        nonlocal logged
        start = first
        while start < rounds:
            stop = min(rounds, (start // checkpoint_every + 1) * checkpoint_every) if checkpoint_every else rounds
            await network.run(rounds, cfg.run.eval_every, first=start, stop=stop, eval_point=cfg.run.eval_point)
            if checkpoint_due(stop - 1, rounds, checkpoint_every):
                folder.log_messages(ledger.entries[logged:])
                logged = len(ledger.entries)
                save_network(out, stop - 1, network.runners, cfg, earlier_wall + time.perf_counter() - started)
            start = stop
        return network.rows

    try:
        rows = asyncio.run(drive())
    finally:
        bar.bar.close()
    wall = earlier_wall + time.perf_counter() - started
    summary = make_summary(cfg, experiment.task, rows, ledger, experiment.clients, wall, "simulate")
    per_round = comm_time_by_round(ledger.entries, experiment.graph, (cfg.run.link_bandwidth, cfg.run.link_latency))
    compute = compute_seconds(cfg, experiment)
    summary["sim_seconds"] = {
        "comm_total": sum(per_round.values()),
        "comm_per_round": sum(per_round.values()) / cfg.run.rounds,
        "compute_per_round": sum(compute) / cfg.run.rounds,
        "total": sum(per_round.values()) + sum(compute),
        "by_round": [per_round.get(r, 0.0) + compute[r] for r in range(cfg.run.rounds)],
    }
    folder.log_messages(ledger.entries[logged:])
    folder.finish(summary)
    if report:
        write_report([cfg.run.out], echo=False)
    return summary
