"""A user's own MoE model on their own data, trained by FedMoE-DA peer to peer (no file of p2pmoe edited):

    p2pmoe simulate --plugins examples/own_moe_model.py --data my-csv --data-root DIR --method fedmoe-da
DIR holds train.csv and test.csv: numeric feature columns and an integer `label` column. The
model is this file's: an MLP embedder (φ, which FedMoE-DA gossips as `embedder.*`) and a
mixture of MLP experts behind a linear gate. Its `moe` follows the ExpertSlots contract
(experts by slot, a gating matrix whose row e is expert e's proxy): all FedMoE-DA needs to
select, fetch and aggregate experts. It provides `expert_slots` and `whole_model`: FedMoE-DA,
FedAvg, D-PSGD and Local all run on it."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from p2pmoe.data.partition import partition_clients
from p2pmoe.learners.vision import ImageClassifierLearner
from p2pmoe.models.moe import ExpertSlots
from p2pmoe.options import Options, option
from p2pmoe.seeds import node_stream, seeded_init
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import Selection, Task, register_task


@dataclass(frozen=True)
class CsvOptions(Options):
    section: ClassVar[str] = "task"
    classes: int = option(4, "labels are 0 .. classes - 1", minimum=2)
    hidden: int = option(32, "width of the embedder and of each expert", minimum=1)
    experts: int = option(4, "experts per node", minimum=1)


class MyMoE(ExpertSlots):
    def __init__(self, width: int, classes: int, experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)) for _ in range(experts))
        self.gate = nn.Linear(width, experts, bias=False)

    def gating_matrix(self) -> torch.Tensor:
        return self.gate.weight  # row e is expert e's proxy: what FedMoE-DA correlates across nodes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([expert(h) for expert in self.experts], dim=1)  # [batch, experts, classes]
        return torch.einsum("be,bec->bc", self.gate(h).softmax(dim=-1), outputs)


class MyModel(nn.Module):
    def __init__(self, features: int, classes: int, opts: CsvOptions) -> None:
        super().__init__()
        self.embedder = nn.Sequential(nn.Linear(features, opts.hidden), nn.ReLU())
        self.moe = MyMoE(opts.hidden, classes, opts.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.embedder(x))


def read_csv(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "label" not in rows[0]:
        raise ValueError(f"{path}: needs a header with a `label` column and at least one row")
    features = [name for name in rows[0] if name != "label"]
    return torch.tensor([[float(r[n]) for n in features] for r in rows]), torch.tensor([int(r["label"]) for r in rows])


class CsvTask(Task):
    name, data = "my-csv", ("my-csv",)
    summary = "a user's CSV classification data with their own MoE model"
    options, metrics, selection, default_lr = CsvOptions, ("accuracy",), Selection(), 0.05
    provides = frozenset({"whole_model", "expert_slots"})
    unused_run_options = {"max_train_per_node": "a node trains on its whole partition"}

    def _model(self, cfg: ExperimentConfig, features: int) -> MyModel:
        assert isinstance(cfg.task, CsvOptions)
        with seeded_init(cfg.run.seed):  # every node starts from the same weights
            return MyModel(features, cfg.task.classes, cfg.task)

    def learners(self, cfg: ExperimentConfig, indices: list[int], model: object = None) -> dict[int, ImageClassifierLearner]:  # type: ignore[override]
        root = Path(cfg.run.data_root or ".")
        (x, y), (tx, ty) = read_csv(root / "train.csv"), read_csv(root / "test.csv")
        splits = partition_clients(y.numpy(), ty.numpy(), cfg.run.nodes, cfg.run.partition, cfg.run.seed)
        learners = {}
        for k in indices:
            a, b, lr, net = splits[k].train, splits[k].test, cfg.run.lr or self.default_lr, self._model(cfg, x.shape[1])
            learners[k] = ImageClassifierLearner(net, (x[a], y[a]), (tx[b], ty[b]), None, cfg.run.batch_size, lr, seed=node_stream(cfg.run.seed, "shuffle", k))
        return learners

    def template(self, cfg: ExperimentConfig, model: object = None) -> nn.Module:
        """A coordinator reads no example: only the header names the features."""
        with open(Path(cfg.run.data_root or ".") / "train.csv", newline="") as f:
            return self._model(cfg, len(next(csv.reader(f))) - 1)


register_task(CsvTask())
