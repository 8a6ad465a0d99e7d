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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from p2pmoe.config import build_config, with_options
from p2pmoe.harness.folders import finished_summary
from p2pmoe.methods.base import LearnerMethod, fine_tuned_metrics
from p2pmoe.node.checkpoint import CheckpointError
from p2pmoe.settings import ExperimentConfig
from p2pmoe.sim.resume import restored_experiment
from p2pmoe.sim.runner import run_simulation

Key = TypeVar("Key")


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a label, the method, its `[method]` options, `[run]` changes and
    `[task]` changes (a model ablation)."""

    label: str
    method: str
    method_options: Mapping[str, Any] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)
    task: Mapping[str, Any] = field(default_factory=dict)

    def config(self, base: ExperimentConfig, seed: int, out: Path) -> ExperimentConfig:
        return with_options(base, method_options=self.method_options, task_options=self.task, method=self.method, seed=seed, out=str(out), **self.run)


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
    jobs: int = 1,
) -> list[RunResult]:
    """Every variant for every seed (seed-major, so a partial benchmark has whole seeds first),
    each in `root/<slug>/seed<k>`; finished runs of the same experiment are read back. With
    `only_finished`, nothing runs: the finished runs alone (tables of a benchmark under way).
    With `jobs` > 1 the missing runs go `jobs` at a time, one spawned process each, without
    progress bars; a run that fails does not stop the others, and once they are done one error
    names every failed run (the finished ones are in their folders, read back by the next
    call or by `only_finished`)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    folders = [slug(v.label) for v in variants]
    if len(set(folders)) != len(folders):
        raise ValueError(f"variant labels {[v.label for v in variants]} share a folder name: make them differ in letters or digits")
    planned = [(v, seed, root / slug(v.label) / f"seed{seed}") for seed in seeds for v in variants]
    configs = [v.config(base, seed, out) for v, seed, out in planned]
    summaries = [finished_summary(out, cfg) for (_, _, out), cfg in zip(planned, configs, strict=True)]
    missing = {} if only_finished else {i: cfg for i, cfg in enumerate(configs) if summaries[i] is None}
    if jobs == 1:
        for i, cfg in missing.items():
            variant, seed, out = planned[i]
            summaries[i] = finished_summary(out, cfg)  # another process sharing the root may have run it meanwhile
            if summaries[i] is None:
                print(f"running {variant.label}, seed {seed} -> {out}", file=sys.stderr, flush=True)
                summaries[i] = simulate_quietly(cfg, checkpoint_every, progress=True)
    else:
        print(f"queued {len(missing)} runs, {jobs} at a time, under {root}", file=sys.stderr, flush=True)
        failed = []
        for i, outcome in _in_pool(simulate_quietly, missing, jobs, checkpoint_every):
            if isinstance(outcome, Exception):
                failed.append(f"{planned[i][0].label}, seed {planned[i][1]}: {outcome}")
            else:
                summaries[i] = outcome
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(missing)} runs failed (the others are in their folders; --report-only tables them): " + "; ".join(failed)
            )
    return [RunResult(v.label, seed, out, summary) for (v, seed, out), summary in zip(planned, summaries, strict=True) if summary is not None]


def by_label(results: Iterable[RunResult], view: Callable[[RunResult], dict[str, Any]] | None = None) -> dict[str, dict[int, dict[str, Any]]]:
    """label -> seed -> summary, as the seed tables read runs; `view` replaces each summary by
    what a table needs of the run (the honest nodes' view of an attacked run, say)."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        runs.setdefault(r.label, {})[r.seed] = view(r) if view else r.summary
    return runs


def simulate_quietly(cfg: ExperimentConfig, checkpoint_every: int = 0, progress: bool = False) -> dict[str, Any]:
    """One benchmark run: no per-run report (the benchmark writes its own), checkpoints every
    `checkpoint_every` rounds and resumption from the folder's checkpoint when there is one; a
    progress bar only when asked (runs in worker processes would interleave theirs)."""
    return run_simulation(cfg, progress=progress, report=False, checkpoint_every=checkpoint_every, resume=checkpoint_every > 0)


def _in_pool(
    task: Callable[[ExperimentConfig, int], dict[str, Any]], configs: Mapping[Key, ExperimentConfig], jobs: int, checkpoint_every: int
) -> Iterator[tuple[Key, dict[str, Any] | Exception]]:
    """(key, `task`'s summary or the error that stopped it) as each run finishes, `jobs` at a
    time in spawned workers."""
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(task, cfg, checkpoint_every): key for key, cfg in configs.items()}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], error if isinstance(error, Exception) else future.result()


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
    """(key, summary with `cpu_seconds`, or the error that stopped it) as each run finishes: in
    this process for one job, else `jobs` spawned workers. One run's failure does not lose the
    others'."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    for key, cfg in configs.items() if jobs == 1 else ():
        try:
            yield key, timed_run(cfg, checkpoint_every)
        except Exception as exc:  # reported in the table; the other runs still go
            yield key, exc
    yield from _in_pool(timed_run, configs, jobs, checkpoint_every) if jobs > 1 else ()
