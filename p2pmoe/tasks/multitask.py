"""Multi-scenario multi-task recommendation: one client per scenario, one MMoE each.

Data: MovieLens-1M with the seven age groups as scenarios and tasks click (rated vs a sampled
unrated item) and like (rated >= 4; like implies click, CTCVR-style) (`--data ml-1m-mtl`), or
the AliExpress CSV layout (`--data aliexpress --data-root DIR`: one sub-folder per country
holding ``train.csv`` and optionally ``test.csv``, plain or ``.gz``; the folder name minus an
``AliExpress_`` prefix names the scenario; tasks click and conversion).

Every client is scored per task on its own test rows: ``auc/<task>`` and ``logloss/<task>``,
their means over tasks ``auc`` and ``logloss``; the summary's metrics are the means over
scenarios. Model selection: the round with the best mean validation AUC, on validation rows
carved at random from each scenario's training rows.

A model factory is called as ``model(cfg, features)`` with a `FeatureSpec`; the coordinator's
template needs no data: ML-1M's vocabulary sizes are the data set's published schema (checked
against the data when clients load it), and AliExpress codes are hashed into `buckets` rows
per field over the declared number of fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
from torch import nn

from p2pmoe.data.aliexpress import read_aliexpress_csv
from p2pmoe.data.errors import DataFormatError, DataNotFoundError
from p2pmoe.data.movielens import AGE_GROUPS, load_movielens, multi_scenario_multi_task
from p2pmoe.data.multitask import ScenarioData, keep_rows, random_split
from p2pmoe.learners.base import Learner
from p2pmoe.learners.multitask import MultiTaskLearner
from p2pmoe.models.mmoe import MMoE
from p2pmoe.options import Options, option, options_as
from p2pmoe.seeds import node_stream, seeded_init
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import ModelFactory, Selection, Task, register_task, resolve_device

ML1M_VOCABULARY = (6040, 3706, 5, 2, 21)
"""ML-1M's feature vocabularies in `multi_scenario_multi_task` order: users, items, genre
domains, genders, occupations (the published data set's sizes)."""
ML1M_TASKS = ("click", "like")
ALIEXPRESS_TASKS = ("click", "conversion")


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know about the features: one vocabulary size per categorical
    field, the number of numerical features and the number of tasks."""

    cardinalities: tuple[int, ...]
    num_numerical: int
    num_tasks: int


@dataclass(frozen=True)
class MultiTaskOptions(Options):
    """The MMoE every client trains, the data view and the validation split."""

    section: ClassVar[str] = "task"

    embed_dim: int = option(16, "width of every categorical feature embedding", minimum=1)
    experts: int = option(4, "expert networks per MMoE", minimum=1)
    expert_hidden: int = option(64, "width of each expert's hidden layers", minimum=1)
    expert_layers: int = option(1, "hidden layers per expert", minimum=1)
    tower_hidden: int = option(16, "hidden width of each task tower", minimum=1)
    expert_norm: bool = option(True, "BatchNorm on each expert's output (project decision: the layers classic FedBN keeps local)")
    neg_per_pos: int = option(1, "ML-1M: sampled unrated items per rating (click = 0)", minimum=1)
    test_fraction: float = option(0.2, "share of each scenario's rows held out for test (random, seeded)", minimum=0, maximum=0.9)
    valid_fraction: float = option(0.1, "share of each scenario's training rows carved out for model selection", minimum=0, maximum=0.9)
    users_per_scenario: int | None = option(None, "ML-1M: keep this many users per age group (drawn with the seed), to fit a CPU budget", minimum=1)
    buckets: int = option(10000, "AliExpress: embedding rows per categorical field; codes are taken modulo (data-free template)", minimum=1)
    categorical_fields: int = option(16, "AliExpress: categorical columns each file must have", minimum=0)
    numerical_fields: int = option(63, "AliExpress: numerical columns each file must have", minimum=0)


def mmoe_model(cfg: ExperimentConfig, features: FeatureSpec, template: bool = False) -> nn.Module:
    """The family's model: an MMoE sized by the options (`template` for PF-MSMTrec's experts)."""
    opts = options_as(cfg.task, MultiTaskOptions, "multitask data")
    return MMoE(
        features.cardinalities,
        features.num_numerical,
        opts.embed_dim,
        opts.experts,
        [opts.expert_hidden] * opts.expert_layers,
        features.num_tasks,
        opts.tower_hidden,
        template=template,
        expert_norm=opts.expert_norm,
    )


def feature_spec(cfg: ExperimentConfig) -> FeatureSpec:
    """The run's features, from the options alone (no data read)."""
    return _spec(cfg.run.data, options_as(cfg.task, MultiTaskOptions, "multitask data"))


def _spec(data: str, opts: MultiTaskOptions) -> FeatureSpec:
    if data == "aliexpress":
        return FeatureSpec((opts.buckets,) * opts.categorical_fields, opts.numerical_fields, len(ALIEXPRESS_TASKS))
    return FeatureSpec(ML1M_VOCABULARY, 0, len(ML1M_TASKS))


def _aliexpress_folders(root: str | None) -> list[Path]:
    hint = "pass --data-root DIR holding one folder per country with train.csv (and test.csv)"
    if not root:
        raise DataNotFoundError("aliexpress", "(no path given)", hint)
    folder = Path(root)
    found = sorted(p for p in folder.iterdir() if _csv(p, "train") is not None) if folder.is_dir() else []
    if not found:
        raise DataNotFoundError("aliexpress", folder, hint)
    return found


def _csv(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.csv", folder / f"{stem}.csv.gz") if p.is_file()), None)


def _hashed(data: ScenarioData, spec: FeatureSpec, path: Path) -> ScenarioData:
    if data.categorical.shape[1] != len(spec.cardinalities) or data.numerical.shape[1] != spec.num_numerical:
        expected = f"{len(spec.cardinalities)} categorical and {spec.num_numerical} numerical columns (task options)"
        raise DataFormatError(path, 1, expected, got=f"{data.categorical.shape[1]} and {data.numerical.shape[1]}")
    buckets = np.asarray(spec.cardinalities, dtype=np.int64)
    return replace(data, categorical=data.categorical % buckets, cardinalities=spec.cardinalities)


def _sample_users(data: ScenarioData, count: int, rng: np.random.Generator) -> ScenarioData:
    users = np.unique(data.categorical[:, 0])
    if len(users) <= count:
        return data
    chosen = rng.choice(users, size=count, replace=False)
    return keep_rows(data, np.flatnonzero(np.isin(data.categorical[:, 0], chosen)))


def scenarios(cfg: ExperimentConfig) -> tuple[ScenarioData, ...]:
    """The run's scenarios in client order (node-00 is the first)."""
    return _scenarios(cfg.run.data, cfg.run.data_root, cfg.run.seed, options_as(cfg.task, MultiTaskOptions, "multitask data"))


@lru_cache(maxsize=2)
def _scenarios(data: str, root: str | None, seed: int, opts: MultiTaskOptions) -> tuple[ScenarioData, ...]:
    spec = _spec(data, opts)
    if data == "aliexpress":
        out = []
        for k, folder in enumerate(_aliexpress_folders(root)):
            train = _csv(folder, "train")
            assert train is not None
            name, split_seed = folder.name.removeprefix("AliExpress_"), node_stream(seed, "split", k)
            country = read_aliexpress_csv(train, name, _csv(folder, "test"), opts.test_fraction, split_seed)
            out.append(_hashed(country, spec, train))
        return tuple(out)
    found = multi_scenario_multi_task(load_movielens(root or "ml-1m"), opts.neg_per_pos, seed, opts.test_fraction)
    if found and found[0].cardinalities != spec.cardinalities:
        raise ValueError(f"ML-1M vocabularies {found[0].cardinalities} differ from the schema {spec.cardinalities}")
    if opts.users_per_scenario is not None:
        rng = np.random.default_rng(seed)
        found = [_sample_users(d, opts.users_per_scenario, rng) for d in found]
    return tuple(found)


class MultiTaskTask(Task[MultiTaskOptions]):
    name = "multitask"
    summary = "multi-scenario multi-task recommendation, one client per scenario, an MMoE each; AUC per task"
    data = ("ml-1m-mtl", "aliexpress")
    options = MultiTaskOptions
    metrics = ("auc", "logloss", *(f"{m}/{t}" for m in ("auc", "logloss") for t in dict.fromkeys(ML1M_TASKS + ALIEXPRESS_TASKS)))
    selection = Selection("valid_auc", higher=True)
    default_lr = 1e-3
    provides = frozenset({"whole_model", "multi_task"})

    unused_run_options: ClassVar[Mapping[str, str]] = {"partition": "each scenario is one client's data"}

    def resolve(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """One client per scenario: `nodes` follows the data."""
        return self.nodes_from_data(super().resolve(cfg), self.client_names(cfg), "scenario")

    def client_names(self, cfg: ExperimentConfig) -> list[str]:
        if cfg.run.data == "aliexpress":
            return [p.name.removeprefix("AliExpress_") for p in _aliexpress_folders(cfg.run.data_root)]
        return list(AGE_GROUPS.values())

    def learners(self, cfg: ExperimentConfig, indices: list[int], model: ModelFactory | None = None) -> dict[int, Learner]:
        run, opts = cfg.run, self.options_of(cfg)
        assert run.lr is not None  # `resolve` set it
        found = scenarios(cfg)
        spec = feature_spec(cfg)
        device = resolve_device(run.device)
        factory = model or mmoe_model
        out: dict[int, Learner] = {}
        for k in indices:
            data = found[k]
            if run.max_train_per_node is not None and len(data.train_idx) > run.max_train_per_node:
                keep = np.random.default_rng(node_stream(run.seed, "cap", k)).choice(data.train_idx, run.max_train_per_node, replace=False)
                data = replace(data, train_idx=np.sort(keep))
            _, held = random_split(len(data.train_idx), opts.valid_fraction, np.random.default_rng(node_stream(run.seed, "shuffle", k)))
            with seeded_init(run.seed):  # identical initial weights on every client
                out[k] = MultiTaskLearner(
                    factory(cfg, spec),
                    data,
                    data.train_idx[held],
                    batch_size=run.batch_size,
                    lr=run.lr,
                    seed=node_stream(run.seed, "shuffle", k),
                    device=device,
                )
        return out

    def template(self, cfg: ExperimentConfig, model: ModelFactory | None = None) -> nn.Module:
        with seeded_init(cfg.run.seed):
            return (model or mmoe_model)(cfg, feature_spec(cfg))


register_task(MultiTaskTask())
