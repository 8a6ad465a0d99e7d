"""Text-based recommendation with a LoRA-adapted sentence encoder (FeDecider's setting).

A user is a prompt listing the titles of their most recent items (newest first, so cutting
the prompt to its token budget drops the oldest); a candidate is its title; the score is the
inner product of the two L2-normalised encodings. Training is in-batch softmax over (prompt,
next title) pairs; evaluation ranks each user's leave-one-out target against sampled negatives
drawn once with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from p2pmoe.data.sequences import DomainSequences
from p2pmoe.eval.metrics import ranking_metrics
from p2pmoe.eval.negatives import sample_negatives
from p2pmoe.learners.base import shuffled_batches
from p2pmoe.models.text_lora import LoraTextEncoder
from p2pmoe.wire.codec import check_like

METRICS = ("mrr", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10")
PROMPT_HEAD = "Recently watched: "


@dataclass(frozen=True)
class TextSetup:
    """How prompts are built and how the learner trains (the text task's options)."""

    history: int = 10
    prompt_tokens: int = 64
    title_tokens: int = 24
    train_targets: int = 3
    temperature: float = 0.05
    negatives: int = 99


@dataclass
class Tokens:
    """Padded token ids and attention mask of a list of texts."""

    ids: Tensor
    mask: Tensor

    def rows(self, index: Tensor | slice, device: torch.device) -> tuple[Tensor, Tensor]:
        ids, mask = self.ids[index], self.mask[index]
        width = max(int(mask.sum(1).max()), 1)  # drop all-padding columns of this batch
        return ids[:, :width].to(device), mask[:, :width].to(device)


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> Tokens:
    batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    return Tokens(batch["input_ids"], batch["attention_mask"])


def prompt(titles: Sequence[str], history: Sequence[int]) -> str:
    """The user's prompt: newest title first."""
    return PROMPT_HEAD + "; ".join(titles[i] for i in reversed(history))


class TextRecLearner:
    """One domain's encoder, tokenised examples, Adam over the LoRA parameters and evaluation.

    Training pairs: for each user the last `train_targets` positions of the training sequence,
    each with the `history` items before it. Valid/test: the user's next-to-last/last item
    against `negatives` items of the domain other than the target and the items its prompt
    lists (valid seed `negative_seed`, test `negative_seed + 1`; project decision: a heavy
    user may have rated nearly all of a small domain, so "never interacted" cannot always
    leave 99). `evaluate` encodes every candidate title once (the encoder is fixed
    while it evaluates) and scores all users against them.
    """

    def __init__(
        self,
        model: LoraTextEncoder,
        tokenizer: Any,
        data: DomainSequences,
        titles: Sequence[str],
        setup: TextSetup,
        batch_size: int = 32,
        lr: float = 1e-3,
        negative_seed: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(titles) != data.num_items:
            raise ValueError(f"{data.name}: {len(titles)} titles for {data.num_items} items")
        self.device = torch.device(device)
        self.encoder: LoraTextEncoder = model.to(self.device)
        self.model: torch.nn.Module = self.encoder
        self.setup = setup
        self.titles = tokenize(tokenizer, titles, setup.title_tokens)
        prompts, targets = [], []
        for seq in data.train:
            for t in range(max(1, len(seq) - setup.train_targets), len(seq)):
                prompts.append(prompt(titles, seq[max(0, t - setup.history) : t]))
                targets.append(seq[t])
        if not prompts:
            raise ValueError(f"{data.name}: no training sequence has two items")
        self.train_prompts = tokenize(tokenizer, prompts, setup.prompt_tokens)
        self.train_targets = torch.tensor(targets, dtype=torch.long)
        self.num_train_examples = len(targets)
        self.splits: dict[str, tuple[Tokens, Tensor]] = {}
        for offset, split in enumerate(("valid", "test")):
            seqs = getattr(data, split)
            target = torch.tensor([s[-1] for s in seqs], dtype=torch.long)
            history = [s[:-1][-setup.history :] for s in seqs]
            exclude = [set(h) for h in history]
            negatives = sample_negatives(data.num_items, target, setup.negatives, negative_seed + offset, exclude=exclude)
            tokens = tokenize(tokenizer, [prompt(titles, h) for h in history], setup.prompt_tokens)
            self.splits[split] = (tokens, torch.cat([target[:, None], negatives], dim=1))
        self.batch_size = batch_size
        self.lr = lr
        self._shuffle = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.encoder.lora_parameters(), lr=lr)

    def loss(self, index: Tensor) -> Tensor:
        """In-batch softmax: each prompt against every title of the batch; another row with the
        same target item is masked out (it is not a negative)."""
        targets = self.train_targets[index]
        users = self.model(*self.train_prompts.rows(index, self.device))
        items = self.model(*self.titles.rows(targets, self.device))
        logits = users @ items.T / self.setup.temperature
        same = (targets[:, None] == targets[None, :]) & ~torch.eye(len(targets), dtype=torch.bool)
        logits = logits.masked_fill(same.to(self.device), float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(targets), device=self.device))

    def train(self, epochs: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """`epochs` shuffled passes stepping `optimizer` (default: Adam over the LoRA
        parameters); returns the mean loss."""
        optimizer = optimizer or self.optimizer
        self.model.train()
        total, steps = 0.0, 0
        for _ in range(epochs):
            for rows in shuffled_batches(self.num_train_examples, self.batch_size, self._shuffle):
                loss = self.loss(rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                steps += 1
        return {"train_loss": total / steps} if steps else {}

    @torch.no_grad()
    def encode(self, tokens: Tokens, rows: Tensor | None = None, batch: int = 256) -> Tensor:
        """Encodings of `rows` (default: all), in that order. Rows are encoded shortest first so
        that a batch carries little padding (the mask makes the result independent of it)."""
        index = rows if rows is not None else torch.arange(len(tokens.ids))
        order = torch.argsort(tokens.mask[index].sum(1), stable=True)
        self.model.eval()
        sorted_index = index[order]
        encoded = torch.cat([self.model(*tokens.rows(sorted_index[s : s + batch], self.device)) for s in range(0, len(index), batch)])
        return encoded[torch.argsort(order)]

    def evaluate(self) -> dict[str, float]:
        """Test metrics (``ndcg@5``, ``hr@5``, ...) and validation metrics (``valid_ndcg@5``, ...).

        Every candidate title of both splits is encoded once (the encoder does not change while
        it evaluates); rank = 1 + negatives scoring strictly higher than the target."""
        items = torch.unique(torch.cat([candidates.flatten() for _, candidates in self.splits.values()]))
        lookup = torch.full((int(items.max()) + 1,), -1, dtype=torch.long)
        lookup[items] = torch.arange(len(items))
        item_vecs = self.encode(self.titles, items).cpu()
        metrics: dict[str, float] = {}
        for split, prefix in (("test", ""), ("valid", "valid_")):
            tokens, candidates = self.splits[split]
            users = self.encode(tokens).cpu()
            scores = torch.einsum("bd,bcd->bc", users, item_vecs[lookup[candidates]])
            values = ranking_metrics(1 + (scores[:, 1:] > scores[:, :1]).sum(1), ks=(1, 5, 10))
            metrics.update({prefix + name: values[name] for name in METRICS})
        return metrics

    def state_dict(self) -> dict[str, Tensor]:
        """LoRA tensors (``lora.<name>``), their Adam moments (``optim.<name>.<key>``) and the
        shuffle RNG; the frozen backbone is not saved (it is read from its folder)."""
        names = {p: n for n, p in self.model.named_parameters()}
        state = {f"lora.{names[p]}": p.detach().to("cpu", copy=True) for p in self.encoder.lora_parameters()}
        for p in self.encoder.lora_parameters():
            for key, value in self.optimizer.state.get(p, {}).items():
                state[f"optim.{names[p]}.{key}"] = value.detach().to("cpu", copy=True)
        state["rng"] = self._shuffle.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()` output; names and shapes are checked before anything changes."""
        params = {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        check_like({k[len("lora.") :]: v for k, v in state.items() if k.startswith("lora.")}, {n: p.detach() for n, p in params.items()})
        moments: dict[Tensor, dict[str, Tensor]] = {}
        for name, value in state.items():
            if name.startswith("optim."):
                param, _, key = name[len("optim.") :].rpartition(".")
                if param not in params or (key != "step" and value.shape != params[param].shape):
                    raise ValueError(f"optimiser state {name!r} does not fit the model")
                moments.setdefault(params[param], {})[key] = value.clone() if key == "step" else value.to(self.device, copy=True)
        if "rng" not in state:
            raise ValueError("state has no shuffle RNG ('rng')")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[f"lora.{name}"])
        self.optimizer.state.clear()
        self.optimizer.state.update(moments)
        self._shuffle.set_state(state["rng"])
