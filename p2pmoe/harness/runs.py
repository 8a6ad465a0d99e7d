"""Running a benchmark's simulations: variants x seeds, each a simulator run folder.

A benchmark script names what is its own (the variants it compares, the setting) and leaves
the running here: every (variant, seed) is one `run_simulation` in
`<root>/<variant slug>/seed<k>`, so a killed benchmark picks up where it stopped. A run whose
folder holds a summary of the very same experiment is read back, not run again; one with a
checkpoint of it (`checkpoint_every`) resumes from there (`p2pmoe.sim.resume`).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pmoe.config import build_config, with_options
from p2pmoe.harness.folders import finished_summary
from p2pmoe.methods.base import LearnerMethod, fine_tuned_metrics
from p2pmoe.node.checkpoint import CheckpointError
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.resume import restored_experiment
from p2pmoe.sim.runner import run_simulation


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a label, the method, its `[method]` options and `[run]` changes."""

    label: str
    method: str
    method_options: Mapping[str, Any] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)

    def config(self, base: ExperimentConfig, seed: int, out: Path) -> ExperimentConfig:
        return with_options(base, method_options=self.method_options, method=self.method, seed=seed, out=str(out), **self.run)


@dataclass(frozen=True)
class RunResult:
    """A finished run: its variant's label, its seed, its folder and its summary."""

    label: str
    seed: int
    out: Path
    summary: dict[str, Any]


def slug(label: str) -> str:
    """A folder name for a variant's label."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label)


def run_seeds(
    base: ExperimentConfig,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    root: Path,
    checkpoint_every: int = 0,
    only_finished: bool = False,
) -> list[RunResult]:
    """Every variant for every seed (seed-major, so a partial benchmark has whole seeds first),
    each in `root/<slug>/seed<k>`; finished runs of the same experiment are read back. With
    `only_finished`, nothing runs: the finished runs alone (tables of a benchmark under way)."""
    results = []
    for seed in seeds:
        for variant in variants:
            out = root / slug(variant.label) / f"seed{seed}"
            cfg = variant.config(base, seed, out)
            summary = finished_summary(out, cfg)
            if summary is None and only_finished:
                continue
            if summary is None:
                print(f"running {variant.label}, seed {seed} -> {out}", file=sys.stderr, flush=True)
                summary = run_simulation(cfg, report=False, checkpoint_every=checkpoint_every, resume=checkpoint_every > 0)
            results.append(RunResult(variant.label, seed, out, summary))
    return results


def fine_tuned_final(result: RunResult, epochs: int) -> dict[str, dict[str, float]]:
    """Every client's metrics after `epochs` local epochs on a copy of its final model (after the
    last round's exchange), read from the run's last checkpoint: FedAvg-FT's scoring applied to
    any finished run without training it again. Needs a run made with `checkpoint_every`."""
    cfg = build_config(result.summary["setting"])
    experiment, round_index = restored_experiment(result.out, cfg, ": the run folder was made with other settings")
    if round_index != cfg.run.rounds - 1:
        raise CheckpointError(f"{result.out} has no checkpoint of its last round: run it with checkpoint_every")
    scores = {}
    for node in experiment.clients:
        method = experiment.nodes[node]
        if not isinstance(method, LearnerMethod):
            raise TypeError(f"{node} runs {type(method).__name__}, which has no learner to fine-tune")
        scores[node] = fine_tuned_metrics(method.learner, epochs)
    return scores


def timed_run(cfg: ExperimentConfig, checkpoint_every: int = 0) -> dict[str, Any]:
    """One simulation and its `cpu_seconds`: what it cost whatever ran beside it (this
    process's part only, for a run resumed from a checkpoint). With `checkpoint_every`, the
    run checkpoints and goes on from its folder's checkpoint of the same setting."""
    started = time.process_time()
    summary = run_simulation(cfg, progress=False, checkpoint_every=checkpoint_every, resume=checkpoint_every > 0)
    return {**summary, "cpu_seconds": round(time.process_time() - started, 1)}


def run_parallel(configs: Mapping[str, ExperimentConfig], jobs: int, checkpoint_every: int = 0) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """(key, summary or the error that stopped it) as each run finishes: in this process for
    one job, else `jobs` spawned workers. One run's failure does not lose the others'."""
    if jobs == 1:
        for key, cfg in configs.items():
            try:
                yield key, timed_run(cfg, checkpoint_every)
            except Exception as exc:  # reported in the table; the other runs still go
                yield key, exc
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(timed_run, cfg, checkpoint_every): key for key, cfg in configs.items()}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], error if isinstance(error, Exception) else future.result()
