"""The method registry: a method is one module that declares itself with `register_method`.

A `MethodSpec` says what the framework needs to know and nothing else: the method's name, the
task families it runs on, its own options (a frozen `Options` dataclass: TOML `[method]`,
CLI flags, `--help` and the docs' tables come from it), which peers a client talks to, and how
to build a client (and, for server-mediated methods, the coordinator). Adding a method is one
module under `p2pmoe/methods/` plus its line in `BUILTIN_METHODS`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import networkx as nx
from torch import nn

from p2pmoe.learners.base import Learner
from p2pmoe.methods.base import Method
from p2pmoe.naming import SERVER_ID
from p2pmoe.options import Options, describe, flag
from p2pmoe.participation import Participation
from p2pmoe.plugins import ordered
from p2pmoe.settings import ExperimentConfig, RunOptions
from p2pmoe.tasks.base import CAPABILITIES, ModelFactory, Task, all_tasks
from p2pmoe.topology import neighbours_within

BUILTIN_METHODS = (
    "p2pmoe.methods.local",
    "p2pmoe.methods.fedavg",
    "p2pmoe.methods.gossip",
    "p2pmoe.methods.fedmoe_da",
    "p2pmoe.methods.fedsasrec",
    "p2pmoe.methods.fmoe_cdsr",
    "p2pmoe.methods.pf_msmtrec",
    "p2pmoe.methods.fedecider",
)
"""Modules that register the built-in methods, in the order `--help` lists them."""


@dataclass(frozen=True)
class NoOptions(Options):
    """A method without options of its own."""

    section: ClassVar[str] = "method"


@dataclass
class BuildContext:
    """What a method's builders get: the config, the task family, the clients and the graph.

    Learners are built lazily and together (the data is read once), and only for the clients
    this process runs; `template` gives a coordinator its weight shapes without any data.
    """

    cfg: ExperimentConfig
    task: Task
    clients: list[str]
    graph: nx.Graph
    wanted: set[str]
    _learners: dict[str, Learner] = field(default_factory=dict)

    def index(self, node: str) -> int:
        return self.clients.index(node)

    def with_method_options(self, options: Options) -> BuildContext:
        """The same context (and learner cache) seeing `options` as the run's `[method]` table."""
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, method=options))

    def learner(self, node: str, model: ModelFactory | None = None) -> Learner:
        """Client `node`'s learner (every wanted client's learner is built on the first call)."""
        if not self._learners:
            wanted = [k for k, n in enumerate(self.clients) if n in self.wanted]
            build = self.task.accounting_learners if self.cfg.run.train == "none" else self.task.learners
            built = build(self.cfg, wanted, model)
            # in place: a context seen through `with_method_options` shares this dict
            self._learners.update({self.clients[k]: learner for k, learner in built.items()})
        return self._learners[node]

    def template(self, model: ModelFactory | None = None) -> nn.Module:
        return self.task.template(self.cfg, model)

    @functools.cached_property
    def participation(self) -> Participation:
        """The run's participation (option `participation`), one object for every node built
        here: each node, server and daemon derives the same sets from the same seed."""
        return run_participation(self.cfg, self.clients)


PeerRule = Callable[[ExperimentConfig, nx.Graph, list[str]], dict[str, set[str]]]


def no_peers(cfg: ExperimentConfig, graph: nx.Graph, clients: list[str]) -> dict[str, set[str]]:
    """Clients talk to nobody but the server (if there is one)."""
    return {n: set() for n in clients}


def topology_peers(cfg: ExperimentConfig, graph: nx.Graph, clients: list[str]) -> dict[str, set[str]]:
    """Direct neighbours and everyone within `hops` of the topology."""
    return {n: set(neighbours_within(graph, n, cfg.run.hops)) | set(graph.neighbors(n)) for n in clients}


def all_peers(cfg: ExperimentConfig, graph: nx.Graph, clients: list[str]) -> dict[str, set[str]]:
    """Every client talks to every other (experts fetched from anyone)."""
    return {n: set(clients) - {n} for n in clients}


@dataclass(frozen=True)
class MethodSpec:
    """Everything the framework knows about a method."""

    name: str
    summary: str
    needs: frozenset[str]
    build_client: Callable[[BuildContext, str], Method]
    options: type[Options] = NoOptions
    flag_prefix: str = ""
    build_server: Callable[[BuildContext], Method] | None = None
    uses_server: Callable[[ExperimentConfig], bool] | None = None
    peers: PeerRule = no_peers

    def __post_init__(self) -> None:
        unknown = sorted(self.needs - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"method {self.name!r} needs unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")

    def variant(self, name: str, summary: str, fixed: Options | None = None) -> MethodSpec:
        """Another registered name for the same method: with `fixed`, its builders always see
        those options (a baseline or ablation pinned to one setting) and the variant takes no
        `[method]` options of its own, so nothing the user sets is silently replaced."""
        if fixed is None:
            return dataclasses.replace(self, name=name, summary=summary)
        if not isinstance(fixed, self.options):
            raise TypeError(f"variant {name!r}: fixed options must be {self.options.__name__}, got {type(fixed).__name__}")
        client, server, uses_server = self.build_client, self.build_server, self.uses_server

        @functools.wraps(client)  # keeps the method's module: the registry orders by it
        def pinned_client(ctx: BuildContext, node: str) -> Method:
            return client(ctx.with_method_options(fixed), node)

        def pinned_server(ctx: BuildContext) -> Method:
            assert server is not None  # only set when the base spec has one
            return server(ctx.with_method_options(fixed))

        def pinned_uses_server(cfg: ExperimentConfig) -> bool:
            assert uses_server is not None  # only set when the base spec has one
            return uses_server(dataclasses.replace(cfg, method=fixed))

        return dataclasses.replace(
            self,
            name=name,
            summary=summary,
            options=NoOptions,
            flag_prefix="",
            build_client=pinned_client,
            build_server=None if server is None else pinned_server,
            uses_server=None if uses_server is None else pinned_uses_server,
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        """The registered task families that provide everything the method needs."""
        return tuple(task.name for task in all_tasks().values() if self.needs <= task.provides)

    def has_server(self, cfg: ExperimentConfig) -> bool:
        """Whether a run has a coordinator: when the method builds one and, if it says so, only
        for some of its options (FedMoE-DA's `server` embedding mode)."""
        if self.build_server is None:
            return False
        return self.uses_server(cfg) if self.uses_server is not None else True

    def links(self, cfg: ExperimentConfig, graph: nx.Graph, clients: list[str]) -> dict[str, list[str]]:
        """Who talks to whom: the method's client links plus client <-> server when there is one."""
        peers = self.peers(cfg, graph, clients)
        if self.has_server(cfg):
            for n in clients:
                peers[n].add(SERVER_ID)
            peers[SERVER_ID] = set(clients)
        return {n: sorted(p) for n, p in peers.items()}


_METHODS: dict[str, MethodSpec] = {}


def run_participation(cfg: ExperimentConfig, clients: list[str]) -> Participation:
    """What `participation` means for the run's method: client sampling when it has a server,
    availability (each node online with that probability, churn) when its models live on
    the nodes and nobody samples them (peer-to-peer methods, Local)."""
    mode = "sample" if get_method(cfg.run.method).has_server(cfg) else "availability"
    return Participation(cfg.run.seed, cfg.run.participation, clients, mode)


def register_method(spec: MethodSpec) -> MethodSpec:
    """Declare a method; its options' flags must not collide with the `[run]` flags or those
    of any task family (they share one command line), which is checked here."""
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    taken = {flag(info.name): "[run]" for info in describe(RunOptions)}
    taken |= {flag(info.name): f"task family {task.name!r}" for task in all_tasks().values() for info in describe(task.options)}
    clashes = [
        f"{flag(info.name, spec.flag_prefix)} (also an option of {taken[flag(info.name, spec.flag_prefix)]})"
        for info in describe(spec.options)
        if flag(info.name, spec.flag_prefix) in taken
    ]
    if clashes:
        raise ValueError(f"method {spec.name!r}: its flags collide: {', '.join(clashes)}; rename the options or set flag_prefix")
    _METHODS[spec.name] = spec
    return spec


def all_methods() -> dict[str, MethodSpec]:
    """Every method: the built-ins in `BUILTIN_METHODS` order, then plugins."""
    return ordered(_METHODS, BUILTIN_METHODS, lambda spec: spec.build_client.__module__)


def get_method(name: str, task: str | None = None) -> MethodSpec:
    """The method called `name`; with `task`, it must run on that family."""
    methods = all_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(methods)}")
    spec = methods[name]
    if task is not None and task not in spec.tasks:
        raise ValueError(f"method {name!r} does not run on {task} data; methods for {task}: {methods_for(task)}")
    return spec


def methods_for(task: str) -> list[str]:
    """The names of the methods that run on task family `task`, sorted."""
    return sorted(name for name, spec in all_methods().items() if task in spec.tasks)
