"""Checkpoints of a whole simulated network, so an interrupted `simulate` can go on.

A long simulation (FMoE-CDSR on FKCB takes minutes a round on a CPU) should survive a kill
or the end of a session. The simulator runs between checkpoints in stretches that end with
every node at the same finished round and nothing in flight (`SimNetwork.run` with `stop`),
and then writes one file, `<out>/checkpoint.safetensors`, with every node's state (method,
learner, optimiser, RNG stream: what a daemon checkpoints for itself), prefixed by node id.

The run folder's metrics.jsonl and ledger.csv are the run's record up to that round: on
resume, lines of later rounds (written before a crash) are dropped, atomically, and the
ledger is read back into memory, so the summary counts every byte of the whole run.
Project decision: the checkpoint names the experiment by its config hash (node-local keys
such as threads or workers may change between the stretches; nothing that changes results
may), and a mismatch is refused rather than mixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from p2pmoe.config import build_config, resolve
from p2pmoe.driver.runner import NodeRunner
from p2pmoe.driver.summary import Row
from p2pmoe.experiment import Experiment, build_experiment, resolve_experiment
from p2pmoe.ledger import LedgerEntry
from p2pmoe.node.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from p2pmoe.runs import cut_records
from p2pmoe.settings import NODE_LOCAL_KEYS, ExperimentConfig, canonical_config, config_differences, config_hash

CHECKPOINT_NAME = "checkpoint.safetensors"
SEPARATOR = "/"  # node ids never contain it (p2pmoe.naming), so the first one splits a key


@dataclass(frozen=True)
class Resumed:
    """What a run folder holds after round `round`: the rows (diagnostics included, as in
    metrics.jsonl) and the ledger, both cut at that round, and the wall time spent so far."""

    round: int
    rows: list[Row]
    ledger: list[LedgerEntry]
    wall_seconds: float


def checkpoint_due(round_index: int, rounds: int, every: int) -> bool:
    """After every `every`-th round and after the last (so `--resume` of a finished run only
    rewrites its summary); never with `every` 0."""
    return every > 0 and ((round_index + 1) % every == 0 or round_index == rounds - 1)


def save_network(folder: Path, round_index: int, runners: Mapping[str, NodeRunner], cfg: ExperimentConfig, wall_seconds: float) -> None:
    """Write every node's state after `round_index` (atomically: a kill leaves the last one)."""
    state: dict[str, torch.Tensor] = {}
    for node, runner in runners.items():
        if runner.holds_messages:
            raise RuntimeError(f"{node} still holds messages after round {round_index}: not a consistent cut")
        state.update({f"{node}{SEPARATOR}{key}": tensor for key, tensor in runner.state_dict().items()})
    extra = {"config_hash": config_hash(cfg), "setting": canonical_config(cfg), "nodes": sorted(runners), "wall_seconds": wall_seconds}
    save_checkpoint(folder / CHECKPOINT_NAME, round_index, state, extra)


def same_but_newer_defaults(stored: object, cfg: ExperimentConfig) -> bool:
    """Whether a checkpoint's canonical setting is `cfg`'s (resolved) once the options added
    since it was written take their defaults: a run is not refused for an option it could not
    have had."""
    if not isinstance(stored, dict) or not all(isinstance(stored.get(section, {}), dict) for section in ("run", "task", "method")):
        return False
    tables = {section: dict(stored.get(section, {})) for section in ("run", "task", "method")}
    tables["run"] |= {key: value for key, value in cfg.run.to_dict().items() if key in NODE_LOCAL_KEYS}  # not part of the experiment: this run's
    try:
        rebuilt = resolve(build_config(tables, "checkpoint"))
    except Exception:  # a setting this version cannot build at all is simply another experiment
        return False
    return canonical_config(rebuilt) == canonical_config(cfg)


def load_network_checkpoint(folder: Path, cfg: ExperimentConfig, hint: str = "") -> Checkpoint | None:
    """The checkpoint in `folder` if it is one of `cfg`'s (resolved) experiment; None when there is none.
    Raises `CheckpointError` naming the settings that differ (when the file names its own),
    followed by `hint`: what the caller's user can do about it."""
    checkpoint = load_checkpoint(folder / CHECKPOINT_NAME)
    if checkpoint is not None and checkpoint.extra.get("config_hash") != config_hash(cfg) and not same_but_newer_defaults(checkpoint.extra.get("setting"), cfg):
        sides = ("in this run", "in the checkpoint")
        differ = ", ".join(config_differences(canonical_config(cfg), checkpoint.extra.get("setting"), sides)) or "settings it does not name"
        raise CheckpointError(f"{folder / CHECKPOINT_NAME} belongs to another experiment (differs in {differ}){hint}")
    return checkpoint


def load_into_runners(path: Path, checkpoint: Checkpoint, runners: Mapping[str, NodeRunner]) -> None:
    """Give every runner its state from `checkpoint` (read from `path`, named in errors).
    Raises `CheckpointError` when the checkpoint holds other nodes or a state does not fit."""
    if checkpoint.extra.get("nodes") != sorted(runners):
        raise CheckpointError(f"{path} holds nodes {checkpoint.extra.get('nodes')}, this run has {sorted(runners)}")
    states: dict[str, dict[str, torch.Tensor]] = {node: {} for node in runners}
    for key, tensor in checkpoint.state.items():
        node, _, name = key.partition(SEPARATOR)
        if node not in states or not name:
            raise CheckpointError(f"{path}: key {key!r} names no node of this run")
        states[node][name] = tensor
    for node, runner in runners.items():
        try:
            runner.load_state_dict(states[node])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: {node}'s state does not fit its model ({exc})") from None


def resume_network(folder: Path, runners: Mapping[str, NodeRunner], cfg: ExperimentConfig) -> Resumed | None:
    """Load the checkpoint in `folder` into `runners` and cut the folder's files at its round;
    None when there is none. Raises `CheckpointError`, before any file is touched, when the
    checkpoint is unreadable, belongs to another experiment or does not fit the nodes."""
    checkpoint = load_network_checkpoint(folder, cfg, "; use another --out, or start afresh without --resume")
    if checkpoint is None:
        return None
    path = folder / CHECKPOINT_NAME
    rounds = cfg.run.rounds
    if not 0 <= checkpoint.round < rounds:
        raise CheckpointError(f"{path} is after round {checkpoint.round}, outside this run's {rounds} rounds")
    load_into_runners(path, checkpoint, runners)
    for runner in runners.values():
        runner.round = checkpoint.round
    try:
        rows, ledger = cut_records(folder, checkpoint.round)
    except ValueError as exc:
        raise CheckpointError(f"{folder}: cannot cut its records at round {checkpoint.round} ({exc})") from None
    wall = checkpoint.extra.get("wall_seconds", 0.0)
    return Resumed(checkpoint.round, rows, ledger, float(wall) if isinstance(wall, (int, float)) else 0.0)


def restored_experiment(folder: Path, cfg: ExperimentConfig, hint: str) -> tuple[Experiment, int]:
    """Every node of `cfg`'s experiment with the state of the checkpoint in `folder`, and the
    round it holds: what scoring a finished run again (fine-tuning, probes) starts from."""
    resolved = resolve_experiment(cfg)
    checkpoint = load_network_checkpoint(folder, resolved.cfg, hint)
    if checkpoint is None:
        raise CheckpointError(f"{folder} has no {CHECKPOINT_NAME}: make the run with checkpoint_every (--checkpoint-every)")
    experiment = build_experiment(resolved)
    load_into_runners(folder / CHECKPOINT_NAME, checkpoint, {node: NodeRunner(node, method) for node, method in experiment.nodes.items()})
    return experiment, checkpoint.round
