"""From a RunConfig to the set of nodes (method objects) that run it.

One place builds nodes for every driver, so a simulation and a swarm of daemons run the same
methods over the same data splits for the same seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import networkx as nx
import torch

from p2pmoe.config import RunConfig
from p2pmoe.data.images import ImageDataset, load_image_dataset
from p2pmoe.data.partition import partition_clients
from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.methods.base import Learner, Method
from p2pmoe.methods.fedavg import FedAvgClient, FedAvgServer
from p2pmoe.methods.fedmoe_da import EMBEDDING_PREFIX, FedMoEDANode, FedMoEDAServer
from p2pmoe.methods.gossip import GossipNode
from p2pmoe.methods.local import LocalMethod
from p2pmoe.methods.params import float_state
from p2pmoe.models import CNNEmbedder, MoEClassifier
from p2pmoe.naming import SERVER_ID, client_ids
from p2pmoe.sequential_experiment import SEQUENCE_DATA, SEQUENCE_SERVER_METHODS, build_sequence_nodes, sequence_domains
from p2pmoe.sim.topology import load_topology, make_topology, neighbours_within

IMAGE_DATA = ("fmnist", "mnist", "mnist5k", "cifar10")


@dataclass
class Experiment:
    """The nodes of one run, which of them are clients holding data, and their topology."""

    nodes: dict[str, Method]
    clients: list[str]
    graph: nx.Graph


def build_image_model(cfg: RunConfig, data: ImageDataset) -> torch.nn.Module:
    """The per-node MoE classifier: CNN embedder φ, gate Π and E expert heads."""
    channels, size = data.train_x.shape[1], data.train_x.shape[2]
    embedder = CNNEmbedder(in_channels=channels, out_dim=cfg.embed_dim, image_size=size)
    return MoEClassifier(embedder, cfg.embed_dim, cfg.experts, cfg.expert_hidden, data.num_classes, gate=cfg.gate, top_k=cfg.top_k)


def build_image_learners(cfg: RunConfig, indices: list[int]) -> dict[int, Learner]:
    """Partition the image data set and give clients `indices` learners with identically
    initialised weights (the shared starting point every federated method assumes)."""
    data = load_image_dataset(cfg.data, cfg.data_root)
    splits = partition_clients(data.train_y.numpy(), data.test_y.numpy(), cfg.nodes, cfg.partition, cfg.seed)
    learners: dict[int, Learner] = {}
    for k in indices:
        split = splits[k]
        torch.manual_seed(cfg.seed)
        model = build_image_model(cfg, data)
        train_idx, test_idx = torch.from_numpy(split.train), torch.from_numpy(split.test)
        if cfg.max_train_per_node is not None and len(train_idx) > cfg.max_train_per_node:
            keep = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + k))
            train_idx = train_idx[keep[: cfg.max_train_per_node]].sort().values
        learners[k] = ImageClassifierLearner(
            model,
            (data.train_x[train_idx], data.train_y[train_idx]),
            (data.test_x[test_idx], data.test_y[test_idx]),
            global_test=(data.test_x, data.test_y),
            batch_size=cfg.batch_size,
            lr=cfg.lr or 0.05,
            momentum=cfg.momentum,
            seed=cfg.seed * 1000 + k,
            )
    return learners


def build_topology(cfg: RunConfig) -> nx.Graph:
    """The clients' graph: a file (node-link JSON or edge list) or a kind such as 'ring'."""
    if cfg.nodes == 1:  # a lone node has no links to lay out
        graph = nx.Graph(name="single")
        graph.add_nodes_from(client_ids(1))
        return graph
    if Path(cfg.topology).suffix in (".json", ".edges", ".txt"):
        return load_topology(cfg.topology, cfg.nodes)
    return make_topology(cfg.topology, cfg.nodes, cfg.seed, cfg.link_bandwidth, cfg.link_latency)


Builder = Callable[[RunConfig, list[str], set[str], nx.Graph], dict[str, Method]]


def _learners(cfg: RunConfig, ids: list[str], wanted: set[str]) -> dict[str, Learner]:
    """Learners of the wanted clients (one, for a template, when only a server is wanted)."""
    indices = [k for k, node in enumerate(ids) if node in wanted]
    built = build_image_learners(cfg, indices or [0])
    return {ids[k]: learner for k, learner in built.items()}


def _local(cfg: RunConfig, ids: list[str], wanted: set[str], graph: nx.Graph) -> dict[str, Method]:
    learners = _learners(cfg, ids, wanted)
    return {node: LocalMethod(node, learners[node], cfg.local_epochs) for node in ids if node in wanted}


def _fedavg(cfg: RunConfig, ids: list[str], wanted: set[str], graph: nx.Graph) -> dict[str, Method]:
    learners = _learners(cfg, ids, wanted)
    nodes: dict[str, Method] = {}
    if SERVER_ID in wanted:
        nodes[SERVER_ID] = FedAvgServer(SERVER_ID, ids, float_state(next(iter(learners.values())).model))
    nodes.update({n: FedAvgClient(n, learners[n], SERVER_ID, cfg.local_epochs) for n in ids if n in wanted})
    return nodes


def _gossip(cfg: RunConfig, ids: list[str], wanted: set[str], graph: nx.Graph) -> dict[str, Method]:
    learners = _learners(cfg, ids, wanted)
    return {n: GossipNode(n, learners[n], sorted(graph.neighbors(n)), cfg.local_epochs) for n in ids if n in wanted}


def _fedmoe_da(cfg: RunConfig, ids: list[str], wanted: set[str], graph: nx.Graph) -> dict[str, Method]:
    """Peer-to-peer FedMoE-DA, or (method fedmoe-da-server) the paper's server-assisted variant,
    which always FedAvgs φ on the server (its original embedding handling)."""
    assisted = cfg.method == "fedmoe-da-server"
    embedding = "server" if assisted else cfg.embedding
    learners = _learners(cfg, ids, wanted)
    nodes: dict[str, Method] = {}
    if SERVER_ID in wanted:
        template = float_state(next(iter(learners.values())).model, EMBEDDING_PREFIX) if embedding == "server" else None
        nodes[SERVER_ID] = FedMoEDAServer(SERVER_ID, ids, template, cfg.fedmoe_p, cfg.fedmoe_tau, plans=assisted, interval=cfg.fedmoe_interval)
    for n in ids:
        if n in wanted:
            visible = [m for m in ids if m != n] if assisted else neighbours_within(graph, n, cfg.hops)
            nodes[n] = FedMoEDANode(
                n, learners[n], visible, sorted(graph.neighbors(n)), p=cfg.fedmoe_p, tau=cfg.fedmoe_tau,
                interval=cfg.fedmoe_interval, embedding=embedding, server_id=SERVER_ID if embedding == "server" else None,
                planner="server" if assisted else "p2p", local_epochs=cfg.local_epochs,
            )
    return nodes


METHODS: dict[str, Builder] = {
    "local": _local,
    "fedavg": _fedavg,
    "gossip": _gossip,
    "fedmoe-da": _fedmoe_da,
    "fedmoe-da-server": _fedmoe_da,
}


def needs_server(cfg: RunConfig) -> bool:
    """Whether a run of `cfg` has a coordinator node."""
    if cfg.data in SEQUENCE_DATA:
        return cfg.method in SEQUENCE_SERVER_METHODS
    return cfg.method in ("fedavg", "fedmoe-da-server") or (cfg.method == "fedmoe-da" and cfg.embedding == "server")


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Settle what the data decides: sequence data sets have one client per domain."""
    if cfg.data in SEQUENCE_DATA:
        domains = len(sequence_domains(cfg))
        if cfg.nodes != domains:
            return dataclasses.replace(cfg, nodes=domains)
    return cfg


def peers_of(cfg: RunConfig, graph: nx.Graph) -> dict[str, list[str]]:
    """Who talks to whom in a run of `cfg`: the peers each node's daemon connects to."""
    ids = client_ids(cfg.nodes)
    if cfg.method == "local":
        peers: dict[str, set[str]] = {n: set() for n in ids}
    elif cfg.method == "fedavg" or cfg.data in SEQUENCE_DATA:
        peers = {n: set() for n in ids}
    elif cfg.method == "fedmoe-da-server":
        peers = {n: set(ids) - {n} for n in ids}
    else:
        peers = {n: set(neighbours_within(graph, n, cfg.hops)) | set(graph.neighbors(n)) for n in ids}
    if needs_server(cfg):
        for n in ids:
            peers[n].add(SERVER_ID)
        peers[SERVER_ID] = set(ids)
    return {n: sorted(p) for n, p in peers.items()}


def node_ids(cfg: RunConfig) -> list[str]:
    """Every node a run of `cfg` has: the clients, then the server if the method needs one."""
    return client_ids(cfg.nodes) + ([SERVER_ID] if needs_server(cfg) else [])


def build_experiment(cfg: RunConfig, only: str | None = None) -> Experiment:
    """Load data, build learners and wrap each in the configured method; with `only`, build
    just that node (what one daemon process needs)."""
    if cfg.data not in IMAGE_DATA + SEQUENCE_DATA:
        raise ValueError(f"unknown data {cfg.data!r}; choose from {list(IMAGE_DATA + SEQUENCE_DATA)}")
    if cfg.data in IMAGE_DATA and cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r} for image data; choose from {sorted(METHODS)}")
    cfg = resolve_config(cfg)
    ids = client_ids(cfg.nodes)
    everyone = node_ids(cfg)
    if only is not None and only not in everyone:
        raise ValueError(f"node {only!r} is not part of this run; its nodes are {everyone}")
    wanted = set(everyone) if only is None else {only}
    graph = build_topology(cfg)
    if cfg.data in SEQUENCE_DATA:
        nodes = build_sequence_nodes(cfg, wanted)
    else:
        nodes = METHODS[cfg.method](cfg, ids, wanted, graph)
    return Experiment(nodes, [node for node in ids if node in wanted], graph)
