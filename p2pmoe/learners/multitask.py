"""Multi-task training of one scenario's model: per-task BCE, AUC and log loss per task.

The learner trains any module mapping ``(categorical, numerical)`` to ``[B, T]`` logits (the
MMoE). A method may anchor the shared weights (`set_anchor`): the loss then adds
``prox_weight * sum ||theta - anchor||^2`` over the anchored tensors (PF-MSMTrec's term that
keeps a client near its personalised aggregate).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from p2pmoe.data.multitask import ScenarioData
from p2pmoe.eval.metrics import auc
from p2pmoe.learners.base import shuffled_batches
from p2pmoe.models.params import float_state, load_float_state


class MultiTaskLearner:
    """Adam on BCE summed over tasks; validation and test AUC and log loss per task.

    Project decision: the optimiser is rebuilt at every `train` call (as for images), so no
    moment estimate of weights the method has since replaced carries into the next round.
    """

    def __init__(
        self,
        model: nn.Module,
        data: ScenarioData,
        valid_idx: np.ndarray,
        batch_size: int = 512,
        lr: float = 1e-3,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        train_idx = np.setdiff1d(data.train_idx, valid_idx)
        if len(train_idx) == 0:
            raise ValueError(f"scenario {data.name!r} has no training rows")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.tasks = data.tasks
        self.batch_size = batch_size
        self.lr = lr
        self._splits = {name: self._tensors(data, idx) for name, idx in (("train", train_idx), ("valid", valid_idx), ("test", data.test_idx))}
        self.num_train_examples = len(train_idx)
        self._shuffle = torch.Generator().manual_seed(seed)
        self.prox_weight = 0.0
        self.anchor: dict[str, torch.Tensor] = {}

    @staticmethod
    def _tensors(data: ScenarioData, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(data.categorical[idx]), torch.from_numpy(data.numerical[idx]), torch.from_numpy(data.labels[idx]))

    def set_anchor(self, anchor: dict[str, torch.Tensor], weight: float) -> None:
        """Pull the named parameters towards `anchor` with `weight` in the next trainings."""
        params = dict(self.model.named_parameters())
        self.anchor = {name: t.detach().to(self.device) for name, t in anchor.items() if name in params}
        self.prox_weight = weight

    def _proximal(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return sum((params[n] - a).pow(2).sum() for n, a in self.anchor.items())  # type: ignore[return-value]

    def train(self, epochs: int) -> dict[str, float]:
        optimiser = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        cat, num, y = self._splits["train"]
        self.model.train()
        total, batches = 0.0, 0
        for _ in range(epochs):
            for idx in shuffled_batches(self.num_train_examples, self.batch_size, self._shuffle):
                logits = self.model(cat[idx].to(self.device), num[idx].to(self.device))
                loss = F.binary_cross_entropy_with_logits(logits, y[idx].to(self.device), reduction="none").mean(0).sum()
                if self.prox_weight > 0 and self.anchor:
                    loss = loss + self.prox_weight * self._proximal()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
                batches += 1
        return {"train_loss": total / max(batches, 1)}

    @torch.inference_mode()
    def _scores(self, split: str, batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        cat, num, y = self._splits[split]
        self.model.eval()
        logits = [self.model(cat[i : i + batch].to(self.device), num[i : i + batch].to(self.device)).cpu() for i in range(0, len(y), batch)]
        return torch.cat(logits) if logits else torch.zeros(0, len(self.tasks)), y

    def evaluate(self) -> dict[str, float]:
        """``auc/<task>``, ``logloss/<task>``, their means over tasks (``auc``, ``logloss``), and
        the same on the validation split prefixed ``valid_`` (model selection)."""
        out: dict[str, float] = {}
        for split, prefix in (("test", ""), ("valid", "valid_")):
            logits, y = self._scores(split)
            if len(y) == 0:
                continue
            for t, task in enumerate(self.tasks):
                out[f"{prefix}auc/{task}"] = auc(y[:, t], logits[:, t])
                out[f"{prefix}logloss/{task}"] = float(F.binary_cross_entropy_with_logits(logits[:, t], y[:, t]))
            out[f"{prefix}auc"] = float(np.mean([out[f"{prefix}auc/{t}"] for t in self.tasks]))
            out[f"{prefix}logloss"] = float(np.mean([out[f"{prefix}logloss/{t}"] for t in self.tasks]))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Model weights (BatchNorm statistics included) and the shuffling RNG."""
        return {**{f"model.{k}": v for k, v in float_state(self.model).items()}, "rng": self._shuffle.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()` output; shapes are checked before anything changes."""
        if "rng" not in state:
            raise ValueError("state has no shuffle RNG ('rng')")
        load_float_state(self.model, {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
        self._shuffle.set_state(state["rng"])
