"""Next-item recommendation on one domain: batching, training and the FedDCSR evaluation.

``NextItemLearner`` is shared by every sequential model (plain SASRec for FedSASRec and the
local baseline, the FMoE-CDSR client model), so all of them are trained and scored the same
way. The model brings its own objective (``loss``) and its own scoring (``score_candidates``);
the learner owns the data, the optimiser and the protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from p2pmoe.data.sequences import DomainSequences
from p2pmoe.eval.metrics import ranking_metrics, ranks_against_negatives
from p2pmoe.eval.negatives import sample_negatives
from p2pmoe.learners.base import shuffled_batches
from p2pmoe.models.sampled_softmax import draw_train_negatives, sampled_cross_entropy, sampled_logits
from p2pmoe.models.sasrec import SASRec
from p2pmoe.wire.codec import check_like

METRICS = ("mrr", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10")
"""What `NextItemLearner.evaluate` reports per split (FedDCSR's table columns, RecBole names)."""


@dataclass(frozen=True)
class SequenceBatch:
    """Left-padded training sequences: ``targets[b, t]`` is the item after ``inputs[b, t]``.

    All three are ``[B, L]``; ``pad_mask`` is True at padding, where inputs and targets hold the
    padding id. Every non-padding position is one next-item prediction.
    """

    inputs: Tensor
    targets: Tensor
    pad_mask: Tensor

    def to(self, device: torch.device) -> SequenceBatch:
        """The batch on `device` (itself when already there)."""
        if self.inputs.device == device:
            return self
        return SequenceBatch(self.inputs.to(device), self.targets.to(device), self.pad_mask.to(device))

    def select(self, rows: Tensor) -> SequenceBatch:
        """The given rows, cut to the longest of them: columns of pure padding cost attention
        time and change nothing (positions count from the newest slot)."""
        width = int((~self.pad_mask[rows]).sum(dim=1).max())
        return SequenceBatch(self.inputs[rows, -width:], self.targets[rows, -width:], self.pad_mask[rows, -width:])


class SequenceBatcher:
    """Item-id lists to left-padded ``LongTensor`` batches of at most ``max_len`` positions.

    The padding id is ``num_items`` (as in ``p2pmoe.models.SASRec``). Only the newest
    ``max_len`` positions of a sequence are kept; the newest item sits in the last column.
    """

    def __init__(self, num_items: int, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.pad_index = num_items
        self.max_len = max_len

    def left_pad(self, seqs: Sequence[Sequence[int]]) -> Tensor:
        """``[N, W]`` with ``W = min(max_len, longest)``: each row's last ``W`` items, padded left."""
        width = min(self.max_len, max((len(s) for s in seqs), default=0))
        out = torch.full((len(seqs), width), self.pad_index, dtype=torch.long)
        for row, seq in enumerate(seqs):
            kept = list(seq[-width:]) if width else []
            if kept:
                out[row, width - len(kept) :] = torch.tensor(kept, dtype=torch.long)
        return out

    def training(self, seqs: Sequence[Sequence[int]]) -> SequenceBatch:
        """Inputs ``seq[:-1]`` and targets ``seq[1:]``, predicting at every position.

        Raises ValueError for a sequence of fewer than two items: it has nothing to predict.
        """
        if any(len(s) < 2 for s in seqs):
            raise ValueError("every training sequence needs at least two items")
        inputs = self.left_pad([s[:-1] for s in seqs])
        return SequenceBatch(inputs, self.left_pad([s[1:] for s in seqs]), inputs == self.pad_index)

    def evaluation(self, seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Inputs ``seq[:-1]`` ``[N, W]`` and targets ``seq[-1]`` ``[N]`` (FedDCSR's valid/test)."""
        if any(len(s) < 2 for s in seqs):
            raise ValueError("every evaluation sequence needs an input and a target")
        return self.left_pad([s[:-1] for s in seqs]), torch.tensor([s[-1] for s in seqs], dtype=torch.long)


class SequenceModel(Protocol):
    """What `NextItemLearner` needs of a model besides being an `nn.Module`."""

    def loss(self, batch: SequenceBatch) -> tuple[Tensor, dict[str, float]]: ...

    def score_candidates(self, inputs: Tensor, candidates: Tensor) -> Tensor: ...


def _trim(inputs: Tensor, pad_index: int) -> Tensor:
    """Drop leading columns that are padding in every row."""
    width = int((inputs != pad_index).sum(dim=1).max())
    return inputs[:, -width:]


class NextItemLearner:
    """Adam training and FedDCSR's sampled-negative evaluation of one domain's model.

    The model is an ``nn.Module`` whose padding id is ``data.num_items`` and which provides
    ``loss(batch: SequenceBatch) -> (loss, stats)`` (its own objective, and floats to report)
    and ``score_candidates(inputs [B, L], candidates [B, C]) -> scores [B, C]`` (the item after
    ``inputs``; a model may score only the candidates instead of every item). A model may also
    provide ``sequence_stats(inputs [B, L]) -> {name: [B]}`` (FMoE-CDSR's gate weights): their
    means over the test split join the metrics `evaluate` reports.

    Evaluation (METHODS §2): each valid/test sequence's target is ranked against
    ``num_negatives`` items drawn uniformly from the domain excluding only the target, once,
    with a fixed seed (valid uses ``negative_seed``, test ``negative_seed + 1``); rank = 1 +
    negatives scoring strictly higher. `evaluate` scores the current model on both splits;
    model selection (early stopping on validation MRR) is the caller's job, because it spans
    rounds and, for the federated methods, the mean over domains.

    The optimiser holds only parameters with ``requires_grad`` and persists across `train`
    calls (Adam moments carry over rounds, as in the official FMoE-CDSR code). Whoever changes
    which parameters are trainable (a method freezing foreign experts) calls
    `refresh_optimizer`.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DomainSequences,
        max_len: int,
        batch_size: int = 256,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        num_negatives: int = 999,
        negative_seed: int = 0,
        seed: int = 0,
        eval_batch_size: int = 512,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.batcher = SequenceBatcher(data.num_items, max_len)
        usable = [s for s in data.train if len(s) >= 2]
        if not usable:
            raise ValueError(f"{data.name}: no training sequence has two items")
        if num_negatives > data.num_items - 1:
            raise ValueError(f"{data.name}: {num_negatives} negatives need more than {data.num_items} items")
        self.train_set = self.batcher.training(usable)
        self.num_train_examples = len(usable)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.lr, self.betas = lr, betas
        self._shuffle = torch.Generator().manual_seed(seed)
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        for offset, split in enumerate(("valid", "test")):
            seqs = getattr(data, split)
            if seqs:
                inputs, targets = self.batcher.evaluation(seqs)
                negatives = sample_negatives(data.num_items, targets, num_negatives, negative_seed + offset)
                self.splits[split] = (inputs, torch.cat([targets[:, None], negatives], dim=1))
        self.optimizer = self._new_optimizer()

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _new_optimizer(self) -> torch.optim.Adam:
        return torch.optim.Adam(self._trainable(), lr=self.lr, betas=self.betas)

    def refresh_optimizer(self) -> None:
        """Rebuild the optimiser if the set of trainable parameters changed.

        Parameters trainable before and after keep their Adam moments; newly frozen ones leave
        the optimiser, so Adam's momentum can never move a frozen expert.
        """
        current = [p for group in self.optimizer.param_groups for p in group["params"]]
        wanted = self._trainable()
        if [id(p) for p in current] == [id(p) for p in wanted]:
            return
        old = self.optimizer
        self.optimizer = self._new_optimizer()
        for p in wanted:
            if p in old.state:
                self.optimizer.state[p] = old.state[p]

    def batches(self) -> Iterator[SequenceBatch]:
        """One shuffled pass over the training sequences."""
        for rows in shuffled_batches(self.num_train_examples, self.batch_size, self._shuffle):
            yield self.train_set.select(rows).to(self.device)

    def train(self, epochs: int) -> dict[str, float]:
        """``epochs`` passes; returns the mean loss and the mean of each statistic the model reports."""
        self.model.train()
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(epochs):
            for batch in self.batches():
                loss, stats = cast(SequenceModel, self.model).loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                for name, value in {"train_loss": float(loss.detach()), **stats}.items():
                    sums[name] = sums.get(name, 0.0) + value
                steps += 1
        return {name: total / steps for name, total in sums.items()} if steps else {}

    @torch.no_grad()
    def ranks(self, split: str) -> Tensor:
        """1-based rank of each target of ``split`` ("valid" or "test") among its negatives."""
        inputs, candidates = self.splits[split]
        self.model.eval()
        out = []
        pad = self.batcher.pad_index
        for start in range(0, len(inputs), self.eval_batch_size):
            rows = slice(start, start + self.eval_batch_size)
            model = cast(SequenceModel, self.model)
            scores = model.score_candidates(_trim(inputs[rows], pad).to(self.device), candidates[rows].to(self.device)).cpu()
            out.append(ranks_against_negatives(scores[:, 0], scores[:, 1:]))
        return torch.cat(out)

    @torch.no_grad()
    def mean_sequence_stats(self, split: str) -> dict[str, float]:
        """Means over ``split`` of the model's ``sequence_stats`` (empty if it has none)."""
        stats = getattr(self.model, "sequence_stats", None)
        if stats is None:
            return {}
        inputs = self.splits[split][0]
        self.model.eval()
        sums: dict[str, float] = {}
        for start in range(0, len(inputs), self.eval_batch_size):
            for name, values in stats(_trim(inputs[start : start + self.eval_batch_size], self.batcher.pad_index).to(self.device)).items():
                sums[name] = sums.get(name, 0.0) + float(values.sum())
        return {name: total / len(inputs) for name, total in sums.items()}

    def evaluate(self) -> dict[str, float]:
        """Test metrics (``mrr``, ``ndcg@10``, ...), validation metrics (``valid_mrr``, ...) and
        the test-split means of the model's ``sequence_stats``, if any."""
        metrics: dict[str, float] = {}
        for split, prefix in (("test", ""), ("valid", "valid_")):
            if split in self.splits:
                values = ranking_metrics(self.ranks(split), ks=(1, 5, 10))
                metrics.update({prefix + name: values[name] for name in METRICS})
        if "test" in self.splits:
            metrics.update(self.mean_sequence_stats("test"))
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Model tensors (``model.*``), Adam moments (``optim.<param>.<key>``) and the shuffle RNG.

        The whole model state is kept, integer and boolean buffers included (a model's step
        counter, which branches are available), so training resumes where it stopped.
        """
        state = {f"model.{k}": v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        names = {p: n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        state[f"optim.{names[p]}.{key}"] = value.detach().to("cpu", copy=True)
        state["rng"] = self._shuffle.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()` output; every name and shape is checked before anything changes."""
        model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        check_like(model_state, self.model.state_dict())
        params = dict(self.model.named_parameters())
        moments: dict[nn.Parameter, dict[str, Tensor]] = {}
        for name, value in state.items():
            if not name.startswith("optim."):
                continue
            param_name, _, key = name[len("optim.") :].rpartition(".")
            if param_name not in params or (key != "step" and value.shape != params[param_name].shape):
                raise ValueError(f"optimiser state {name!r} does not fit the model")
            moments.setdefault(params[param_name], {})[key] = value.clone() if key == "step" else value.to(params[param_name].device, copy=True)
        if "rng" not in state:
            raise ValueError("state has no shuffle RNG ('rng')")
        self.model.load_state_dict(model_state)
        self.optimizer.state.clear()
        self.optimizer.state.update(moments)  # type: ignore[arg-type]  # torch types the state's keys as Tensor; they are Parameters
        self._shuffle.set_state(state["rng"])


class SASRecNextItem(SASRec):
    """SASRec trained with full-softmax cross-entropy at every non-padding position.

    Padding positions are dropped before the ``[positions, items]`` logits are formed: those
    logits dominate the step's cost, and about half the slots of an FKCB batch are padding.
    Scores are tied to the item embeddings; the encoder is ``encoder`` so
    FedSASRec can average ``encoder.*`` alone. ``train_negatives`` > 0 swaps the full softmax
    for a sampled one (`p2pmoe.models.sampled_softmax`, a project option).
    """

    def __init__(self, num_items: int, max_len: int, hidden: int = 64, heads: int = 4, blocks: int = 2, dropout: float = 0.2, train_negatives: int = 0) -> None:
        super().__init__(num_items, max_len, hidden, heads, blocks, dropout)
        self.train_negatives = train_negatives

    def loss(self, batch: SequenceBatch) -> tuple[Tensor, dict[str, float]]:
        keep = ~batch.pad_mask
        hidden, targets = self(batch.inputs)[keep], batch.targets[keep]
        if self.train_negatives:
            negatives = draw_train_negatives(self.num_items, self.train_negatives, hidden.device)
            ce = sampled_cross_entropy(sampled_logits(hidden, self.item_emb.weight, targets, negatives), targets, negatives)
        else:
            ce = F.cross_entropy(self.all_scores(hidden), targets)
        return ce, {"ce": float(ce.detach())}

    def score_candidates(self, inputs: Tensor, candidates: Tensor) -> Tensor:
        return self.all_scores(self(inputs)[:, -1]).gather(1, candidates)
