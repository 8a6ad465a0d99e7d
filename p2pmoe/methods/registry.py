"""The method registry: a method is one module that declares itself with `register_method`.

A `MethodSpec` says what the framework needs to know and nothing else: the method's name, the
task families it runs on, its own options (a frozen `Options` dataclass: TOML `[method]`,
CLI flags, `--help` and the docs' tables come from it), which peers a client talks to, and how
to build a client (and, for server-mediated methods, the coordinator). A built-in method is one
module under `p2pmoe/methods/` plus its line in `BUILTIN_METHODS`; a user's is a plugin.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import networkx as nx
from torch import nn

from p2pmoe.learners.base import Learner
from p2pmoe.methods.base import Method
from p2pmoe.naming import SERVER_ID
from p2pmoe.options import OptionInfo, Options, describe, flag, from_mapping, options_as
from p2pmoe.participation import Participation, parse_churn
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


OptionsT = TypeVar("OptionsT", bound=Options)


@dataclass
class BuildContext(Generic[OptionsT]):
    """What a method's builders get: the resolved config, its method options typed as the
    method declares them, the task family, the clients and the graph.

    Learners are built lazily and together (the data is read once), and only for the clients
    this process runs; `template` gives a coordinator its weight shapes without any data.
    """

    cfg: ExperimentConfig
    options: OptionsT
    task: Task[Any]
    clients: list[str]
    graph: nx.Graph
    wanted: set[str]
    _learners: dict[str, Learner] = field(default_factory=dict)

    def index(self, node: str) -> int:
        return self.clients.index(node)

    def learner(self, node: str, model: ModelFactory | None = None) -> Learner:
        """Client `node`'s learner (every wanted client's learner is built on the first call)."""
        if not self._learners:
            wanted = [k for k, n in enumerate(self.clients) if n in self.wanted]
            build = self.task.accounting_learners if self.cfg.run.train == "none" else self.task.learners
            built = build(self.cfg, wanted, model)
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
class MethodSpec(Generic[OptionsT]):
    """Everything the framework knows about a method; generic over its options, so a builder
    receives `BuildContext[ItsOptions]` and reads typed options without a cast.

    A variant (an ablation, a baseline pinned to one setting) is the same spec with some
    options fixed (`variant`); `pinned` holds them. The config fills them in (so summaries and
    the experiment hash show what ran), a user value that differs is refused, and they are
    not flags of the variant.
    """

    name: str
    summary: str
    needs: frozenset[str]
    options: type[OptionsT]
    build_client: Callable[[BuildContext[OptionsT], str], Method]
    flag_prefix: str = ""
    build_server: Callable[[BuildContext[OptionsT]], Method] | None = None
    uses_server: Callable[[OptionsT], bool] | None = None
    peers: PeerRule = no_peers
    pinned: Mapping[str, Any] = field(default_factory=dict)
    variant_of: str | None = None
    summary_extra: Callable[[OptionsT, ExperimentConfig], dict[str, Any]] | None = None  # more for summary.json (e.g. privacy spent)

    def __post_init__(self) -> None:
        unknown = sorted(self.needs - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"method {self.name!r} needs unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")

    def variant(self, name: str, summary: str, fixed: Mapping[str, Any] | Options) -> MethodSpec[OptionsT]:
        """Another registered name for the same method with the options in `fixed` pinned (all
        of them when `fixed` is an options object: a baseline that takes no options)."""
        if isinstance(fixed, Options):
            if not isinstance(fixed, self.options):
                raise TypeError(f"variant {name!r}: fixed options must be {self.options.__name__}, got {type(fixed).__name__}")
            fixed = fixed.to_dict()
        from_mapping(self.options, fixed, f"variant {name!r}")  # unknown keys and bad values are errors now, not at run time
        return dataclasses.replace(self, name=name, summary=summary, pinned={**self.pinned, **fixed}, variant_of=self.variant_of or self.name)

    def own_options(self) -> list[OptionInfo]:
        """The options a user may set: the declared ones less those the variant pins."""
        return [info for info in describe(self.options) if info.name not in self.pinned]

    def method_options(self, values: Mapping[str, Any], source: str) -> OptionsT:
        """The `[method]` table as this method's typed options, pinned values filled in."""
        for key, value in values.items():
            if key in self.pinned and value != self.pinned[key]:
                raise ValueError(
                    f"{source}: [method] {key} = {value!r}, but {self.name!r} is {self.variant_of!r} with {key} = {self.pinned[key]!r}; "
                    f"leave it out, or use method {self.variant_of!r} to choose it"
                )
        built: OptionsT = from_mapping(self.options, {**values, **self.pinned}, source)
        return built

    def options_of(self, cfg: ExperimentConfig) -> OptionsT:
        """`cfg.method` as this method's options; a config of another method is an error."""
        return options_as(cfg.method, self.options, f"method {self.name!r}")

    def context(self, cfg: ExperimentConfig, task: Task[Any], clients: list[str], graph: nx.Graph, wanted: set[str]) -> BuildContext[OptionsT]:
        return BuildContext(cfg, self.options_of(cfg), task, clients, graph, wanted)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The registered task families that provide everything the method needs."""
        return tuple(task.name for task in all_tasks().values() if self.needs <= task.provides)

    def has_server(self, cfg: ExperimentConfig) -> bool:
        """Whether a run has a coordinator: when the method builds one and, if it says so, only
        for some of its options (FedMoE-DA's `server` embedding mode)."""
        if self.build_server is None:
            return False
        return self.uses_server(self.options_of(cfg)) if self.uses_server is not None else True

    def links(self, cfg: ExperimentConfig, graph: nx.Graph, clients: list[str]) -> dict[str, list[str]]:
        """Who talks to whom: the method's client links plus client <-> server when there is one."""
        peers = self.peers(cfg, graph, clients)
        if self.has_server(cfg):
            for n in clients:
                peers[n].add(SERVER_ID)
            peers[SERVER_ID] = set(clients)
        return {n: sorted(p) for n, p in peers.items()}


_METHODS: dict[str, MethodSpec[Any]] = {}


def run_participation(cfg: ExperimentConfig, clients: list[str]) -> Participation:
    """What `participation` means for the run's method: client sampling when it has a server,
    availability (each node online with that probability, churn) when its models live on
    the nodes and nobody samples them (peer-to-peer methods, Local)."""
    mode = "sample" if get_method(cfg.run.method).has_server(cfg) else "availability"
    return Participation(cfg.run.seed, cfg.run.participation, clients, mode, parse_churn(cfg.run.churn))


def register_method(spec: MethodSpec[OptionsT]) -> MethodSpec[OptionsT]:
    """Declare a method; its options' flags must not collide with the `[run]` flags or those
    of any task family (they share one command line), which is checked here."""
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    taken = {flag(info.name): "[run]" for info in describe(RunOptions)}
    taken |= {flag(info.name): f"task family {task.name!r}" for task in all_tasks().values() for info in describe(task.options)}
    clashes = [
        f"{flag(info.name, spec.flag_prefix)} (also an option of {taken[flag(info.name, spec.flag_prefix)]})"
        for info in spec.own_options()
        if flag(info.name, spec.flag_prefix) in taken
    ]
    if clashes:
        raise ValueError(f"method {spec.name!r}: its flags collide: {', '.join(clashes)}; rename the options or set flag_prefix")
    _METHODS[spec.name] = spec
    return spec


def all_methods() -> dict[str, MethodSpec[Any]]:
    """Every method: the built-ins in `BUILTIN_METHODS` order, then plugins."""
    return ordered(_METHODS, BUILTIN_METHODS, lambda spec: spec.build_client.__module__)


def get_method(name: str, task: str | None = None) -> MethodSpec[Any]:
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
