"""Task families: what data a run reads, what model a node trains and how it is scored.

A task family (image classification, cross-domain sequential recommendation, ...) declares its
data sets, its own options (`[task]` in TOML), a learner for client k, a model template a
coordinator can build without any data, the names of its evaluation metrics and the key used
for model selection. Methods are written against this interface, so a method runs on every
family whose learners offer what it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from p2pmoe.learners.base import Learner
from p2pmoe.options import Options
from p2pmoe.plugins import ordered
from p2pmoe.settings import ExperimentConfig

ModelFactory = Callable[..., nn.Module]
"""A model for one client; the arguments are the task family's (see each family's docs)."""


@dataclass(frozen=True)
class Selection:
    """Model selection: the evaluated round with the best mean over clients of `key` (`higher`
    is better) is the run's result; without a key, the last evaluated round is."""

    key: str | None = None
    higher: bool = True


class Task(ABC):
    """One task family. Subclasses set the class attributes and implement the three builders."""

    name: ClassVar[str]
    summary: ClassVar[str]
    data: ClassVar[tuple[str, ...]]
    options: ClassVar[type[Options]]
    metrics: ClassVar[tuple[str, ...]]
    selection: ClassVar[Selection] = Selection()
    default_lr: ClassVar[float]

    def resolve(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """Settle what the data or the family decides (the learning rate, the client count)."""
        return cfg if cfg.run.lr is not None else cfg.replace_run(lr=self.default_lr)

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

    def release_data(self) -> None:
        """Forget data sets cached for building more learners. A daemon builds its one learner
        once; what that learner holds (its own split) stays, the rest need not. By default
        there is no such cache."""
        return


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


_TASKS: dict[str, Task] = {}
BUILTIN_TASKS = ("p2pmoe.tasks.image", "p2pmoe.tasks.sequential", "p2pmoe.tasks.multitask", "p2pmoe.tasks.timelines", "p2pmoe.tasks.text")
"""Modules that register the built-in families; a new family is one module and one line here."""


def register_task(task: Task) -> Task:
    for other in _TASKS.values():
        shared = set(other.data) & set(task.data)
        if shared:
            raise ValueError(f"task {task.name!r}: data {sorted(shared)} already belong to {other.name!r}")
    _TASKS[task.name] = task
    return task


def all_tasks() -> dict[str, Task]:
    """Every family: the built-ins in `BUILTIN_TASKS` order, then plugins."""
    return ordered(_TASKS, BUILTIN_TASKS, lambda task: type(task).__module__)


def task_for_data(data: str) -> Task:
    """The family a data set belongs to; an unknown name lists every known data set."""
    for task in all_tasks().values():
        if data in task.data:
            return task
    known = sorted(d for t in _TASKS.values() for d in t.data)
    raise ValueError(f"unknown data {data!r}; choose from {known}")
