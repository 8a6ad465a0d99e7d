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


def build_image_learners(cfg: RunConfig) -> list[Learner]:
    """Partition the image data set and give each client a learner with identically
    initialised weights (the shared starting point every federated method assumes)."""
    data = load_image_dataset(cfg.data, cfg.data_root)
    splits = partition_clients(data.train_y.numpy(), data.test_y.numpy(), cfg.nodes, cfg.partition, cfg.seed)
    learners: list[Learner] = []
    for k, split in enumerate(splits):
        torch.manual_seed(cfg.seed)
        model = build_image_model(cfg, data)
        train_idx, test_idx = torch.from_numpy(split.train), torch.from_numpy(split.test)
        if cfg.max_train_per_node is not None and len(train_idx) > cfg.max_train_per_node:
            keep = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + k))
            train_idx = train_idx[keep[: cfg.max_train_per_node]].sort().values
        learners.append(
            ImageClassifierLearner(
                model,
                (data.train_x[train_idx], data.train_y[train_idx]),
                (data.test_x[test_idx], data.test_y[test_idx]),
                global_test=(data.test_x, data.test_y),
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                momentum=cfg.momentum,
                seed=cfg.seed * 1000 + k,
            )
        )
    return learners


def _local(cfg: RunConfig, ids: list[str], learners: list[Learner]) -> dict[str, Method]:
    return {node: LocalMethod(node, learner, cfg.local_epochs) for node, learner in zip(ids, learners)}


def _fedavg(cfg: RunConfig, ids: list[str], learners: list[Learner]) -> dict[str, Method]:
    nodes: dict[str, Method] = {SERVER_ID: FedAvgServer(SERVER_ID, ids, float_state(learners[0].model))}
    nodes.update({node: FedAvgClient(node, learner, SERVER_ID, cfg.local_epochs) for node, learner in zip(ids, learners)})
    return nodes


METHODS: dict[str, Callable[[RunConfig, list[str], list[Learner]], dict[str, Method]]] = {
    "local": _local,
    "fedavg": _fedavg,
}


def build_experiment(cfg: RunConfig) -> Experiment:
    """Load data, build learners and wrap each in the configured method."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {sorted(METHODS)}")
    if cfg.data not in IMAGE_DATA:
        raise ValueError(f"unknown data {cfg.data!r}; choose from {list(IMAGE_DATA)}")
    learners = build_image_learners(cfg)
    ids = client_ids(cfg.nodes)
    return Experiment(METHODS[cfg.method](cfg, ids, learners), ids)
