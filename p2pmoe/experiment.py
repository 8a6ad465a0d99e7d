"""From a RunConfig to the set of nodes (method objects) that run it.

One place builds nodes for every driver, so a simulation and a swarm of daemons run the same
methods over the same data splits for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from p2pmoe.config import RunConfig
from p2pmoe.data.images import ImageDataset, load_image_dataset
from p2pmoe.data.partition import partition_clients
from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.methods.base import Learner, Method
from p2pmoe.methods.fedavg import FedAvgClient, FedAvgServer
from p2pmoe.methods.local import LocalMethod
from p2pmoe.methods.params import float_state
from p2pmoe.models import CNNEmbedder, MoEClassifier

SERVER_ID = "server"
IMAGE_DATA = ("fmnist", "mnist", "mnist5k", "cifar10")


@dataclass
class Experiment:
    """The nodes of one run, and which of them are clients holding data."""

    nodes: dict[str, Method]
    clients: list[str]


def client_ids(count: int) -> list[str]:
    """Stable node names: node-00, node-01, ... (zero-padded so they sort)."""
    width = max(2, len(str(count - 1)))
    return [f"node-{i:0{width}d}" for i in range(count)]


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
            lr=cfg.lr,
            momentum=cfg.momentum,
            seed=cfg.seed * 1000 + k,
            )
    return learners


def _local(cfg: RunConfig, ids: list[str], wanted: set[str]) -> dict[str, Method]:
    learners = build_image_learners(cfg, [k for k, node in enumerate(ids) if node in wanted])
    return {ids[k]: LocalMethod(ids[k], learner, cfg.local_epochs) for k, learner in learners.items()}


def _fedavg(cfg: RunConfig, ids: list[str], wanted: set[str]) -> dict[str, Method]:
    indices = [k for k, node in enumerate(ids) if node in wanted]
    learners = build_image_learners(cfg, indices or [0])  # the server needs one model as its template
    nodes: dict[str, Method] = {}
    if SERVER_ID in wanted:
        nodes[SERVER_ID] = FedAvgServer(SERVER_ID, ids, float_state(next(iter(learners.values())).model))
    nodes.update({ids[k]: FedAvgClient(ids[k], learners[k], SERVER_ID, cfg.local_epochs) for k in indices})
    return nodes


MethodBuilder = Callable[[RunConfig, list[str], set[str]], dict[str, Method]]
METHODS: dict[str, MethodBuilder] = {"local": _local, "fedavg": _fedavg}
SERVER_METHODS = {"fedavg"}


def node_ids(cfg: RunConfig) -> list[str]:
    """Every node a run of `cfg` has: the clients, then the server if the method needs one."""
    return client_ids(cfg.nodes) + ([SERVER_ID] if cfg.method in SERVER_METHODS else [])


def build_experiment(cfg: RunConfig, only: str | None = None) -> Experiment:
    """Load data, build learners and wrap each in the configured method; with `only`, build
    just that node (what one daemon process needs)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {sorted(METHODS)}")
    if cfg.data not in IMAGE_DATA:
        raise ValueError(f"unknown data {cfg.data!r}; choose from {list(IMAGE_DATA)}")
    ids = client_ids(cfg.nodes)
    everyone = node_ids(cfg)
    if only is not None and only not in everyone:
        raise ValueError(f"node {only!r} is not part of this run; its nodes are {everyone}")
    wanted = set(everyone) if only is None else {only}
    return Experiment(METHODS[cfg.method](cfg, ids, wanted), [node for node in ids if node in wanted])
