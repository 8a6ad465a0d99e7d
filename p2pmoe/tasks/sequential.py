"""Cross-domain sequential recommendation: one client per domain, next-item prediction.

Data: FedDCSR-format folders (FKCB: `--data fkcb --data-root DIR`, or the P2PMOE_FKCB
environment variable), MovieLens genre domains in the non-overlapped view (`--data ml-1m`,
`--data ml-100k`), or any RecBole atomic files with a domain field in the non-overlapped view
(`--data atomic --data-root DIR --domain-field FIELD`). The default model is SASRec with tied scores; a method brings its own with
a factory `model(cfg, domain, k, num_domains)` where `domain` is None for a coordinator's
template (no method shares item-dependent tensors, so their size does not matter there).
Evaluation is FedDCSR's: sampled negatives drawn once, MRR/NDCG/HR on valid and test;
the run's result is the round with the best mean validation MRR.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from p2pmoe.data.crossdomain import load_atomic_domains
from p2pmoe.data.crossdomain import non_overlapped_domains as atomic_non_overlapped
from p2pmoe.data.errors import DataNotFoundError
from p2pmoe.data.feddcsr import load_feddcsr
from p2pmoe.data.movielens import GENRE_DOMAINS, load_movielens, non_overlapped_domains
from p2pmoe.data.sequences import DomainSequences, unseen_targets
from p2pmoe.eval.negatives import check_negatives_fit
from p2pmoe.learners.base import Learner
from p2pmoe.learners.sequential import METRICS, NextItemLearner, SASRecNextItem
from p2pmoe.options import Options, option, options_as
from p2pmoe.seeds import node_stream, seeded_init
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import ModelFactory, Selection, Task, ranking_profile, register_task, resolve_device

FKCB_ENV = "P2PMOE_FKCB"


@dataclass(frozen=True)
class SequenceOptions(Options):
    """The SASRec-style encoder every sequential model shares, and the evaluation protocol."""

    section: ClassVar[str] = "task"

    embed_dim: int = option(64, "hidden size of item embeddings and encoders", minimum=1)
    max_len: int = option(16, "newest items of a sequence the model reads", minimum=1)
    heads: int = option(4, "attention heads per block", minimum=1)
    blocks: int = option(2, "self-attention blocks", minimum=1)
    dropout: float = option(0.3, "dropout rate", minimum=0, maximum=1)
    domain_field: str = option("category", "atomic data: the .item field naming each item's domain (token, token_seq: first token, or float)")
    negatives: int = option(999, "sampled negatives per evaluated sequence (drawn once, fixed seed)", minimum=1)
    train_negatives: int = option(
        0,
        "training loss: 0 = cross-entropy over all of the domain's items (the papers'); N = sampled softmax, each prediction"
        " against N items drawn uniformly each step (a project option for large catalogues; evaluation is unchanged)",
        minimum=0,
    )


def sasrec_model(cfg: ExperimentConfig, domain: DomainSequences | None, k: int, num_domains: int) -> nn.Module:
    """The family's default model: SASRec over the domain's items, scores tied to item embeddings."""
    opts = options_as(cfg.task, SequenceOptions, "sequential data")
    items = domain.num_items if domain is not None else 1
    return SASRecNextItem(items, opts.max_len, opts.embed_dim, opts.heads, opts.blocks, opts.dropout, train_negatives=opts.train_negatives)


def _fkcb_root(root: str | None) -> Path:
    root = root or os.environ.get(FKCB_ENV)
    if not root:
        raise DataNotFoundError("fkcb", "(no path given)", f"pass --data-root DIR (a FedDCSR-format folder) or set {FKCB_ENV}")
    return Path(root)


@lru_cache(maxsize=4)
def sequence_domains(data: str, root: str | None, domain_field: str = "category") -> tuple[DomainSequences, ...]:
    """The run's domains, in client order (node-00 is the first domain)."""
    if data == "fkcb":
        return tuple(load_feddcsr(_fkcb_root(root)))
    if data == "atomic":
        if not root:
            raise DataNotFoundError("atomic", "(no path given)", "pass --data-root DIR, a folder holding NAME.inter and NAME.item")
        return tuple(atomic_non_overlapped(load_atomic_domains(root, domain_field)))
    return tuple(non_overlapped_domains(load_movielens(root or data)))


def domain_names(data: str, root: str | None, domain_field: str = "category") -> list[str]:
    """The run's domains in client order (node-00 holds the first), without reading any
    sequence (a coordinator's question; atomic files are read to find their domains)."""
    if data == "atomic":
        return [d.name for d in sequence_domains(data, root, domain_field)]
    if data == "fkcb":
        folder = _fkcb_root(root)
        if not folder.is_dir():
            raise DataNotFoundError("fkcb", folder, "pass --data-root DIR (a FedDCSR-format folder)")
        return sorted(p.name for p in folder.iterdir() if (p / "train_data.txt").is_file())
    return list(GENRE_DOMAINS)


class SequentialTask(Task[SequenceOptions]):
    name = "sequential"
    summary = "cross-domain sequential recommendation, one client per domain; FedDCSR's sampled ranking"
    data = ("fkcb", "ml-1m", "ml-100k", "atomic")
    options = SequenceOptions
    metrics = tuple(METRICS) + tuple(f"valid_{m}" for m in METRICS)
    selection = Selection("valid_mrr", higher=True)
    default_lr = 1e-3
    provides = frozenset({"domain_sequences"})

    unused_run_options: ClassVar[Mapping[str, str]] = {
        "partition": "each domain's users are one client's data",
        "max_train_per_node": "a client trains on its whole domain",
    }

    def resolve(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """One client per domain: `nodes` follows the data."""
        cfg = super().resolve(cfg)
        return self.nodes_from_data(cfg, domain_names(cfg.run.data, cfg.run.data_root, self.options_of(cfg).domain_field), "domain")

    def client_names(self, cfg: ExperimentConfig) -> list[str]:
        return domain_names(cfg.run.data, cfg.run.data_root, self.options_of(cfg).domain_field)

    def learners(self, cfg: ExperimentConfig, indices: list[int], model: ModelFactory | None = None) -> dict[int, Learner]:
        run, opts = cfg.run, self.options_of(cfg)
        assert run.lr is not None  # `resolve` set it
        domains = sequence_domains(run.data, run.data_root, opts.domain_field)
        pools = {d.name: d.num_items - 1 for d in domains}
        check_negatives_fit(pools, opts.negatives)  # every domain, not only this node's
        check_negatives_fit(pools, opts.train_negatives, "train_negatives")
        device = resolve_device(run.device)
        factory = model or sasrec_model
        out: dict[int, Learner] = {}
        for k in indices:
            with seeded_init(run.seed):  # identical initial encoder weights on every client
                built = factory(cfg, domains[k], k, len(domains))
                if getattr(built, "train_negatives", 0) != opts.train_negatives:
                    raise ValueError(
                        f"[task] train_negatives = {opts.train_negatives} (--train-negatives): the model {type(built).__name__} does not"
                        " train with sampled negatives (no matching `train_negatives` attribute); leave the option out or give the model one"
                    )
                out[k] = NextItemLearner(
                    built,
                    domains[k],
                    opts.max_len,
                    batch_size=run.batch_size,
                    lr=run.lr,
                    num_negatives=opts.negatives,
                    negative_seed=run.seed,
                    seed=node_stream(run.seed, "shuffle", k),
                    device=device,
                )
        return out

    def template(self, cfg: ExperimentConfig, model: ModelFactory | None = None) -> nn.Module:
        with seeded_init(cfg.run.seed):
            return (model or sasrec_model)(cfg, None, 0, cfg.run.nodes)

    def profile(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """Per domain, the share of valid and test targets that no training sequence holds, and
        what random ranking scores against `negatives` + 1 candidates."""
        opts = self.options_of(cfg)
        return ranking_profile(unseen_targets(sequence_domains(cfg.run.data, cfg.run.data_root, opts.domain_field)), opts.negatives + 1)


register_task(SequentialTask())
