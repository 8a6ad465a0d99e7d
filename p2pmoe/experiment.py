"""From an experiment config to the nodes (method objects) that run it.

One place builds nodes for every driver, so a simulation, a swarm and a LAN of daemons run the
same methods over the same data splits for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from p2pmoe.config import resolve, spec_of
from p2pmoe.methods.base import Method
from p2pmoe.methods.registry import BuildContext
from p2pmoe.naming import SERVER_ID, client_ids
from p2pmoe.seeds import runner_stream
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import Task
from p2pmoe.topology import load_topology, make_topology


@dataclass
class Experiment:
    """The nodes of one run (or of one process), which of them are clients, and the topology."""

    cfg: ExperimentConfig
    task: Task
    nodes: dict[str, Method]
    clients: list[str]
    graph: nx.Graph


def build_topology(cfg: ExperimentConfig) -> nx.Graph:
    """The clients' graph: a file (node-link JSON or edge list) or a kind such as 'ring'."""
    run = cfg.run
    if run.nodes == 1:  # a lone node has no links to lay out
        graph = nx.Graph(name="single")
        graph.add_nodes_from(client_ids(1))
        return graph
    if Path(run.topology).suffix in (".json", ".edges", ".txt"):
        return load_topology(run.topology, run.nodes)
    return make_topology(run.topology, run.nodes, run.seed, run.link_bandwidth, run.link_latency)


def node_ids(cfg: ExperimentConfig) -> list[str]:
    """Every node a run has: the clients, then the server if the method has one."""
    _, spec = spec_of(cfg)
    return client_ids(cfg.run.nodes) + ([SERVER_ID] if spec.has_server(cfg) else [])


def links(cfg: ExperimentConfig, graph: nx.Graph | None = None) -> dict[str, list[str]]:
    """Who talks to whom in a run: the peers each node's daemon connects to."""
    _, spec = spec_of(cfg)
    return spec.links(cfg, graph if graph is not None else build_topology(cfg), client_ids(cfg.run.nodes))


def node_seed(cfg: ExperimentConfig, node: str) -> int:
    """The seed of a node's own RNG stream, from the run's seed and the node's name."""
    return runner_stream(cfg.run.seed, node)


def build_experiment(cfg: ExperimentConfig, only: str | None = None) -> Experiment:
    """Resolve the config, load data and build every node; with `only`, just that node (what
    one daemon process needs: a coordinator builds its template without reading any data)."""
    cfg = resolve(cfg)
    task, spec = spec_of(cfg)
    everyone = node_ids(cfg)
    if only is not None and only not in everyone:
        raise ValueError(f"node {only!r} is not part of this run; its nodes are {everyone}")
    wanted = set(everyone) if only is None else {only}
    clients = client_ids(cfg.run.nodes)
    graph = build_topology(cfg)
    ctx = BuildContext(cfg, task, clients, graph, wanted)
    nodes: dict[str, Method] = {node: spec.build_client(ctx, node) for node in clients if node in wanted}
    if SERVER_ID in wanted:
        assert spec.build_server is not None
        nodes[SERVER_ID] = spec.build_server(ctx)
    return Experiment(cfg, task, nodes, [n for n in clients if n in wanted], graph)
