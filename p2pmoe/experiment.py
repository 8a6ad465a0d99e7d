"""From an experiment config to the nodes (method objects) that run it.

A config is resolved once, at the edge (a command, a node file, `run_simulation`), into a
`ResolvedExperiment`: what the task family settles (the learning rate, one client per
domain), the family, the method, the clients and their graph. Everything below receives that
and never resolves again (issue 27). One place then builds nodes for every driver, so a
simulation, a swarm and a LAN of daemons run the same methods over the same data splits for
the same seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from p2pmoe.config import resolve, spec_of
from p2pmoe.methods.attacks import Adversary, attacker_nodes, flip_labels, parse_attack
from p2pmoe.methods.base import Method
from p2pmoe.methods.registry import MethodSpec
from p2pmoe.naming import SERVER_ID, client_ids
from p2pmoe.participation import Window, check_churn, parse_churn
from p2pmoe.seeds import node_stream, runner_stream
from p2pmoe.settings import ExperimentConfig, RunOptions, canonical_config, config_hash
from p2pmoe.tasks.base import Task
from p2pmoe.topology import load_topology, make_topology


@dataclass(frozen=True)
class ResolvedExperiment:
    """One experiment with everything settled; immutable, made only by `resolve_experiment`."""

    cfg: ExperimentConfig
    task: Task
    spec: MethodSpec[Any]
    clients: tuple[str, ...]
    graph: nx.Graph
    has_server: bool

    @property
    def run(self) -> RunOptions:
        return self.cfg.run

    @property
    def node_ids(self) -> list[str]:
        """Every node the run has: the clients, then the server if the method has one."""
        return [*self.clients, *([SERVER_ID] if self.has_server else [])]

    def links(self) -> dict[str, list[str]]:
        """Who talks to whom: the peers each node's daemon connects to."""
        return self.spec.links(self.cfg, self.graph, list(self.clients))

    def window(self, node: str) -> Window:
        """The rounds `node` is part of the swarm: (first, first gone or None), from `churn`."""
        return parse_churn(self.cfg.run.churn).get(node, (0, None))

    @functools.cached_property
    def attackers(self) -> frozenset[str]:
        """The clients that lie (`[run] attack`, `attackers`), the same set in every process."""
        return attacker_nodes(self.cfg.run.seed, self.clients, self.cfg.run.attackers) if self.cfg.run.attack else frozenset()

    def adversary(self, node: str) -> Adversary | None:
        """`node`'s lies, if it is an attacker."""
        if node not in self.attackers:
            return None
        return Adversary(node, parse_attack(self.cfg.run.attack), node_stream(self.cfg.run.seed, "attack", self.clients.index(node)))

    def node_seed(self, node: str) -> int:
        """The seed of a node's own RNG stream, from the run's seed and the node's name."""
        return runner_stream(self.cfg.run.seed, node)

    @functools.cached_property
    def config_hash(self) -> str:
        """What peers compare at start-up: equal exactly when the experiments are."""
        return config_hash(self.cfg)

    @functools.cached_property
    def canonical(self) -> dict[str, dict[str, Any]]:
        return canonical_config(self.cfg)


def _topology(cfg: ExperimentConfig) -> nx.Graph:
    """The clients' graph: a file (node-link JSON or edge list) or a kind such as 'ring'."""
    run = cfg.run
    if run.nodes == 1:  # a lone node has no links to lay out
        graph = nx.Graph(name="single")
        graph.add_nodes_from(client_ids(1))
        return graph
    if Path(run.topology).suffix in (".json", ".edges", ".txt"):
        return load_topology(run.topology, run.nodes)
    return make_topology(run.topology, run.nodes, run.seed, run.link_bandwidth, run.link_latency)


def resolve_experiment(cfg: ExperimentConfig) -> ResolvedExperiment:
    """Settle `cfg` once: the task family's decisions, its method, clients and graph."""
    cfg = resolve(cfg)
    task, spec = spec_of(cfg)
    clients = tuple(client_ids(cfg.run.nodes))
    check_churn(parse_churn(cfg.run.churn), clients, cfg.run.rounds)
    attack = parse_attack(cfg.run.attack)
    if attack.any != (cfg.run.attackers > 0):
        raise ValueError("[run] attack and attackers go together: name the lie (--attack) and the fraction that tells it (--attackers)")
    if attack.mimic not in (None, "mean") and attack.mimic not in clients:
        raise ValueError(f"[run] attack: mimic:{attack.mimic} names no client of this run")
    return ResolvedExperiment(cfg, task, spec, clients, _topology(cfg), spec.has_server(cfg))


@dataclass
class Experiment:
    """The nodes of one run (or of one process) and which of them are clients."""

    resolved: ResolvedExperiment
    nodes: dict[str, Method]
    clients: list[str]

    @property
    def cfg(self) -> ExperimentConfig:
        return self.resolved.cfg

    @property
    def task(self) -> Task:
        return self.resolved.task

    @property
    def graph(self) -> nx.Graph:
        return self.resolved.graph


def _train_on_flipped_labels(node: str, method: Method) -> None:
    """A label-flip attacker's learner trains on class C - 1 - c (issue 30)."""
    learner = getattr(method, "learner", None)
    labels = getattr(learner, "train_y", None)
    if learner is None or not isinstance(labels, torch.Tensor):
        raise ValueError(f"[run] attack label-flip needs a classifier's training labels; {node}'s method has none (image data has them)")
    classes = getattr(learner.model, "num_classes", None)
    if not isinstance(classes, int):
        raise ValueError(f"[run] attack label-flip needs a model that says its number of classes; {node}'s does not")
    learner.train_y = flip_labels(labels, classes)


def build_experiment(experiment: ResolvedExperiment, only: str | None = None) -> Experiment:
    """Load data and build every node; with `only`, just that node (what one daemon process
    needs: a coordinator builds its template without reading any data)."""
    everyone = experiment.node_ids
    if only is not None and only not in everyone:
        raise ValueError(f"node {only!r} is not part of this run; its nodes are {everyone}")
    wanted = set(everyone) if only is None else {only}
    clients = list(experiment.clients)
    spec = experiment.spec
    ctx = spec.context(experiment.cfg, experiment.task, clients, experiment.graph, wanted)
    nodes: dict[str, Method] = {node: spec.build_client(ctx, node) for node in clients if node in wanted}
    if parse_attack(experiment.cfg.run.attack).label_flip:
        for node in experiment.attackers & set(nodes):
            _train_on_flipped_labels(node, nodes[node])
    if SERVER_ID in wanted and spec.build_server is not None:
        nodes[SERVER_ID] = spec.build_server(ctx)
    return Experiment(experiment, nodes, [n for n in clients if n in wanted])
