"""Task families: what data a run reads, what model a node trains and how it is scored.

A task family (image classification, cross-domain sequential recommendation, ...) declares its
data sets, its own options (`[task]` in TOML), a learner for client k, a model template a
coordinator can build without any data, the names of its evaluation metrics and the key used
for model selection. Methods are written against this interface, so a method runs on every
family whose learners offer what it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from p2pmoe.eval.metrics import random_ranking_metrics
from p2pmoe.learners.base import Learner
from p2pmoe.options import Options, describe, flag, options_as
from p2pmoe.plugins import ordered
from p2pmoe.settings import ExperimentConfig, RunOptions

ModelFactory = Callable[..., nn.Module]
"""A model for one client; the arguments are the task family's (see each family's docs)."""


@dataclass(frozen=True)
class Selection:
    """Model selection: the evaluated round with the best mean over clients of `key` (`higher`
    is better) is the run's result; without a key, the last evaluated round is."""

    key: str | None = None
    higher: bool = True


CAPABILITIES = {
    "whole_model": "every client's model has the same tensors, so whole models can be averaged (FedAvg, D-PSGD)",
    "expert_slots": "a client's model has a `moe` layer with the ExpertSlots contract (FedMoE-DA)",
    "domain_sequences": "one client per domain of next-item sequences, SASRec-style models with per-domain item tables (FMoE-CDSR, FedSASRec)",
    "multi_task": "one client per scenario with several prediction tasks, MMoE-style models (PF-MSMTrec)",
    "text_encoder": "a pretrained text encoder adapted with LoRA, one client per domain (FeDecider)",
}
"""What a task family can offer a method. A method declares what it needs (`MethodSpec.needs`)
and runs on every family that provides it, so a new family (a plugin) works with every
method it suits without editing any method."""


T = TypeVar("T", bound=Options)


class Task(ABC, Generic[T]):
    """One task family. Subclasses set the class attributes and implement the three builders;
    generic over the family's options, so `options_of` gives them typed."""

    name: ClassVar[str]
    summary: ClassVar[str]
    data: ClassVar[tuple[str, ...]]
    options: type[T]
    metrics: ClassVar[tuple[str, ...]]
    selection: ClassVar[Selection] = Selection()
    default_lr: ClassVar[float]
    provides: ClassVar[frozenset[str]] = frozenset()
    """Which of `CAPABILITIES` the family's data, models and learners offer."""
    unused_run_options: ClassVar[Mapping[str, str]] = {}
    """`[run]` options the family never reads, each with the reason: a value other than the
    default is refused (issue 28: `--partition` on timelines was silently ignored)."""

    def options_of(self, cfg: ExperimentConfig) -> T:
        """`cfg.task` as this family's options; a config of another family is an error."""
        return options_as(cfg.task, self.options, f"task family {self.name!r}")

    def resolve(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """Settle what the data or the family decides (the learning rate, the client count),
        refusing `[run]` options the family does not use."""
        defaults = RunOptions()
        for name, why in self.unused_run_options.items():
            value = getattr(cfg.run, name)
            if value != getattr(defaults, name):
                raise ValueError(f"[run] {name} = {value!r} ({flag(name)}) does not apply to {self.name} data ({cfg.run.data}): {why}; leave it out")
        return cfg if cfg.run.lr is not None else cfg.replace_run(lr=self.default_lr)

    def client_names(self, cfg: ExperimentConfig) -> list[str] | None:
        """What each client holds, in client order (node-00 first), for a family with one client
        per domain or scenario: people read these names in summaries, reports and figures
        (issue 28). None when clients are anonymous parts of one data set."""
        return None

    def nodes_from_data(self, cfg: ExperimentConfig, units: Sequence[str], unit: str) -> ExperimentConfig:
        """For a family with one client per `unit` of the data (a domain, a scenario): `nodes`
        is `len(units)`; another value than that or the default is refused, naming the units."""
        count = len(units)
        if cfg.run.nodes == count:
            return cfg
        if cfg.run.nodes != RunOptions().nodes:
            raise ValueError(
                f"{cfg.run.data} has one client per {unit}: its {count} {unit}s ({', '.join(units)}) make {count} nodes, "
                f"but [run] nodes = {cfg.run.nodes} ({flag('nodes')}); set it to {count} or leave it out"
            )
        return cfg.replace_run(nodes=count)

    @abstractmethod
    def learners(self, cfg: ExperimentConfig, indices: list[int], model: ModelFactory | None = None) -> dict[int, Learner]:
        """Learners of clients `indices` with identically initialised shared weights; `model`
        replaces the family's default model (a method with its own architecture)."""

    def accounting_learners(self, cfg: ExperimentConfig, indices: list[int], model: ModelFactory | None = None) -> dict[int, Learner]:
        """Learners of an accounting-only run (`--train none`): the driver never trains or
        evaluates them, so a family may skip its data and share tensors between nodes; by
        default they are the ordinary learners."""
        return self.learners(cfg, indices, model)

    @abstractmethod
    def template(self, cfg: ExperimentConfig, model: ModelFactory | None = None) -> nn.Module:
        """A freshly initialised model whose shared tensors have their true names and shapes,
        built without reading any client's data (what a coordinator needs)."""

    def profile(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """What a reader of the results must know about the data, for summary.json (e.g. the
        share of evaluation targets never seen in training, the random-ranking level of a
        ranking protocol); nothing by default."""
        return {}

    def release_data(self) -> None:
        """Forget data sets cached for building more learners. A daemon builds its one learner
        once; what that learner holds (its own split) stays, the rest need not. By default
        there is no such cache."""
        return


def ranking_profile(unseen: dict[str, dict[str, float | None]], candidates: int) -> dict[str, Any]:
    """A ranking family's `Task.profile`: cold-start shares per domain, and the random-ranking
    level for the candidate count, under the test metrics' names and the valid_ ones."""
    level = random_ranking_metrics(candidates)
    return {"unseen_targets": unseen, "random_ranking": {"candidates": candidates, **level, **{f"valid_{m}": v for m, v in level.items()}}}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


_TASKS: dict[str, Task[Any]] = {}
BUILTIN_TASKS = ("p2pmoe.tasks.image", "p2pmoe.tasks.sequential", "p2pmoe.tasks.multitask", "p2pmoe.tasks.timelines", "p2pmoe.tasks.text")
"""Modules that register the built-in families; a new family is one module and one line here."""


def register_task(task: Task[T]) -> Task[T]:
    """Declare a task family; its capabilities must be known and its option flags must not
    collide with the `[run]` flags (they share one command line; methods are checked against
    both when they register)."""
    unknown = sorted(task.provides - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"task {task.name!r} provides unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")
    common = {info.name for info in describe(RunOptions)}
    clashes = sorted(flag(info.name) for info in describe(task.options) if info.name in common)
    if clashes:
        raise ValueError(f"task {task.name!r}: its option flags {clashes} are also [run] options; rename them")
    for other in _TASKS.values():
        shared = set(other.data) & set(task.data)
        if shared:
            raise ValueError(f"task {task.name!r}: data {sorted(shared)} already belong to {other.name!r}")
    _TASKS[task.name] = task
    return task


def all_tasks() -> dict[str, Task[Any]]:
    """Every family: the built-ins in `BUILTIN_TASKS` order, then plugins."""
    return ordered(_TASKS, BUILTIN_TASKS, lambda task: type(task).__module__)


def task_for_data(data: str) -> Task[Any]:
    """The family a data set belongs to; an unknown name lists every known data set."""
    for task in all_tasks().values():
        if data in task.data:
            return task
    known = sorted(d for t in _TASKS.values() for d in t.data)
    raise ValueError(f"unknown data {data!r}; choose from {known}")
