"""Cross-domain recommendation on merged timelines (SyNCRec's setting), users split over nodes.

A node is a platform or region holding its own users' timelines across all domains. Data:
MovieLens genre domains (`--data ml-1m-timelines`, `ml-100k-timelines`) or any folder of
RecBole atomic files (`--data atomic-timelines --data-root DIR --domain-field FIELD`). The
model is SyNCRec or one of its SASRec baselines (`--model`); SyNCRec's decisions are options
here because the model is what every method (local, FedAvg, FedMoE-DA) trains.
Evaluation: leave-one-out, 1 positive + 100 negatives the user never touched
(`p2pmoe.learners.timelines`); the run's result is the round with the best mean validation MRR.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from p2pmoe.data.crossdomain import CrossDomainInteractions, load_atomic_domains, overlapped_timelines
from p2pmoe.data.errors import DataNotFoundError
from p2pmoe.data.movielens import genre_interactions, load_movielens
from p2pmoe.data.sequences import Timeline, unseen_share
from p2pmoe.eval.negatives import check_negatives_fit
from p2pmoe.learners.base import Learner
from p2pmoe.learners.timelines import TIMELINE_METRICS, TimelineLearner, negative_pools
from p2pmoe.models.syncrec import SCORE_MODES, CrossSASRec, SingleSASRec, SyNCRec, SyNCRecConfig
from p2pmoe.options import Options, option, options_as
from p2pmoe.seeds import node_stream, seeded_init
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import ModelFactory, Selection, Task, ranking_profile, register_task, resolve_device

MODELS = ("syncrec", "sasrec-single", "sasrec-cross")
ATOMIC = "atomic-timelines"


@dataclass(frozen=True)
class TimelineOptions(Options):
    """Data, encoder sizes, evaluation and SyNCRec's decisions (METHODS §5). Defaults not fixed
    by the paper (sizes for CPU runs, noise, SC-MIM weight and temperature, the read-out) are
    project decisions."""

    section: ClassVar[str] = "task"

    model: str = option("syncrec", "the model every node trains: SyNCRec, SASRec per domain, or SASRec on the merged timeline", choices=MODELS)
    domain_field: str = option("category", "atomic data: the .item field naming each item's domain (token, token_seq: first token, or float)")
    users: int | None = option(None, "use this many users drawn with the run's seed (none: all), before splitting them over nodes", minimum=2)
    min_len: int = option(5, "drop users with fewer items in all domains together", minimum=4)
    embed_dim: int = option(32, "hidden size of embeddings and experts", minimum=1)
    max_len: int = option(50, "newest items of a timeline the model reads", minimum=2)
    heads: int = option(2, "attention heads per block", minimum=1)
    blocks: int = option(1, "self-attention blocks per expert", minimum=1)
    dropout: float = option(0.2, "dropout rate", minimum=0, maximum=1)
    negatives: int = option(100, "negatives per target, drawn once from items the user never touched", minimum=1)
    negatives_from: str = option(
        "domain", "draw a target's negatives from its domain's items or from all items (project decision: domain)", choices=("domain", "all")
    )
    experts: int = option(5, "K: ACMoE experts (distinct modules)", minimum=2)
    cross_expert_ratio: float = option(0.8, "share of the K experts in the cross-domain group (the rest are single-domain)", above=0, maximum=1)
    own_mass: float = option(0.8, "gate mass a task puts on its own expert group (the rest on the other)", minimum=0, maximum=1)
    gate_noise: float = option(1.0, "std of Gaussian noise on the gate logits while training (project decision)", minimum=0)
    stop_gradient: bool = option(True, "asymmetric stop-gradients: a task's loss does not train the other group's experts")
    lc_ntg: bool = option(True, "LC-NTG: weight each domain's cross-task loss by softmax(gap / T) (false: uniform)")
    ntg_alpha: float = option(0.9, "LC-NTG moving-average decay alpha", minimum=0, maximum=1)
    ntg_beta: float = option(1.0, "LC-NTG weight beta of the new gap", minimum=0)
    ntg_temperature: float = option(1.0, "LC-NTG softmax temperature T", above=0)
    mim_weight: float = option(0.1, "SC-MIM loss weight (0: without SC-MIM; project decision)", minimum=0)
    mim_temperature: float = option(0.2, "SC-MIM InfoNCE temperature on cosine similarities (project decision)", above=0)
    score_with: str = option("single", "SyNCRec's read-out for a domain-d target: single-domain task, cross-domain task, or their sum", choices=SCORE_MODES)


def syncrec_config(opts: TimelineOptions) -> SyNCRecConfig:
    return SyNCRecConfig(
        experts=opts.experts,
        cross_expert_ratio=opts.cross_expert_ratio,
        own_mass=opts.own_mass,
        gate_noise=opts.gate_noise,
        stop_gradient=opts.stop_gradient,
        lc_ntg=opts.lc_ntg,
        ntg_alpha=opts.ntg_alpha,
        ntg_beta=opts.ntg_beta,
        ntg_temperature=opts.ntg_temperature,
        mim_weight=opts.mim_weight,
        mim_temperature=opts.mim_temperature,
        score_with=opts.score_with,
    )


def timeline_model(cfg: ExperimentConfig, item_domain: torch.Tensor, num_domains: int) -> nn.Module:
    """The model `--model` names over the catalogue's items and domains."""
    opts = options_as(cfg.task, TimelineOptions, "timelines data")
    if opts.model == "syncrec":
        return SyNCRec(item_domain, num_domains, opts.max_len, opts.embed_dim, syncrec_config(opts), opts.heads, opts.blocks, opts.dropout)
    kind = SingleSASRec if opts.model == "sasrec-single" else CrossSASRec
    return kind(item_domain, num_domains, opts.max_len, opts.embed_dim, opts.heads, opts.blocks, opts.dropout)


@lru_cache(maxsize=4)
def interactions(data: str, root: str | None, domain_field: str) -> CrossDomainInteractions:
    """The run's catalogue and interactions."""
    if data == ATOMIC:
        if not root:
            raise DataNotFoundError(ATOMIC, "(no path given)", "pass --data-root DIR, a folder holding NAME.inter and NAME.item")
        return load_atomic_domains(root, domain_field)
    return genre_interactions(load_movielens(root or data.removesuffix("-timelines")))


@lru_cache(maxsize=4)
def node_users(data: str, root: str | None, domain_field: str, min_len: int, users: int | None, nodes: int, seed: int) -> tuple[tuple[Timeline, ...], ...]:
    """Each node's timelines: the kept users (``users`` of them drawn with ``seed`` when set),
    shuffled with ``seed`` and cut into ``nodes`` near-equal parts (project decision)."""
    timelines = overlapped_timelines(interactions(data, root, domain_field), min_len)
    rng = np.random.default_rng(seed)
    if users is not None:
        if users > len(timelines):
            raise ValueError(f"{data}: {users} users asked for, {len(timelines)} have {min_len} or more items")
        timelines = [timelines[i] for i in sorted(rng.choice(len(timelines), users, replace=False))]
    if nodes > len(timelines):
        raise ValueError(f"{data}: {nodes} nodes but only {len(timelines)} users")
    parts = np.array_split(rng.permutation(len(timelines)), nodes)
    return tuple(tuple(timelines[i] for i in sorted(part)) for part in parts)


class TimelineTask(Task[TimelineOptions]):
    name = "timelines"
    summary = "cross-domain recommendation on merged timelines (SyNCRec), users split over nodes; 100 sampled negatives"
    data = ("ml-1m-timelines", "ml-100k-timelines", ATOMIC)
    options = TimelineOptions
    metrics = TIMELINE_METRICS + tuple(f"valid_{m}" for m in TIMELINE_METRICS)
    selection = Selection("valid_mrr", higher=True)
    default_lr = 1e-3
    provides = frozenset({"whole_model", "expert_slots"})

    unused_run_options: ClassVar[Mapping[str, str]] = {
        "partition": "users are split over the nodes at random (--users picks how many)",
        "max_train_per_node": "a node trains on all of its users' timelines",
    }

    def _catalogue(self, cfg: ExperimentConfig) -> tuple[torch.Tensor, int]:
        opts = self.options_of(cfg)
        data = interactions(cfg.run.data, cfg.run.data_root, opts.domain_field)
        return torch.from_numpy(data.item_domain), len(data.domains)

    def learners(self, cfg: ExperimentConfig, indices: list[int], model: ModelFactory | None = None) -> dict[int, Learner]:
        run, opts = cfg.run, self.options_of(cfg)
        assert run.lr is not None  # `resolve` set it
        data = interactions(run.data, run.data_root, opts.domain_field)
        parts = node_users(run.data, run.data_root, opts.domain_field, opts.min_len, opts.users, run.nodes, run.seed)
        item_domain, num_domains = self._catalogue(cfg)
        negatives_from = data.item_domain if opts.negatives_from == "domain" else None
        everyone = [t for part in parts for t in part]  # every node's users: one remedy fits the whole run
        check_negatives_fit(negative_pools(everyone, data.num_items, data.domains, negatives_from), opts.negatives)
        device = resolve_device(run.device)
        out: dict[int, Learner] = {}
        for k in indices:
            with seeded_init(run.seed):  # identical initial weights on every node
                out[k] = TimelineLearner(
                    (model or timeline_model)(cfg, item_domain, num_domains),
                    parts[k],
                    data.num_items,
                    data.domains,
                    opts.max_len,
                    batch_size=run.batch_size,
                    lr=run.lr,
                    num_negatives=opts.negatives,
                    negative_seed=run.seed,
                    item_domain=negatives_from,
                    seed=node_stream(run.seed, "shuffle", k),
                    device=device,
                )
        return out

    def profile(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """Per domain of the target, the share of valid and test targets that no node's
        training items hold, and what random ranking scores against `negatives` + 1 candidates."""
        opts = self.options_of(cfg)
        data = interactions(cfg.run.data, cfg.run.data_root, opts.domain_field)
        parts = node_users(cfg.run.data, cfg.run.data_root, opts.domain_field, opts.min_len, opts.users, cfg.run.nodes, cfg.run.seed)
        everyone = [t for part in parts for t in part]
        seen = {int(i) for t in everyone for i in t.items[:-2]}
        unseen = {}
        for d, name in enumerate(data.domains):
            unseen[name] = {
                split: unseen_share([int(t.items[-cut]) for t in everyone if int(t.domains[-cut]) == d], seen) for split, cut in (("valid", 2), ("test", 1))
            }
        return ranking_profile(unseen, opts.negatives + 1)

    def template(self, cfg: ExperimentConfig, model: ModelFactory | None = None) -> nn.Module:
        """Project decision: the coordinator reads the item catalogue (item ids and domains, the
        same for every node) to size the item table; it reads no user's timeline."""
        with seeded_init(cfg.run.seed):
            return (model or timeline_model)(cfg, *self._catalogue(cfg))


register_task(TimelineTask())
