"""Image classification on one node: its train split, its own test split, the global test set."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.sgd import sgd

from p2pmoe.data.images import float_images
from p2pmoe.eval.memo import ScoreMemo
from p2pmoe.eval.metrics import accuracy
from p2pmoe.learners.base import shuffled_batches
from p2pmoe.models.params import float_state, load_float_state


class ImageClassifierLearner:
    """SGD training of any classifier module on in-memory image tensors.

    Project decision: the optimiser (SGD with momentum) is rebuilt at the start of every
    `train` call, so every method starts each round from the same optimiser state and no
    momentum computed for weights that were since replaced by an aggregate carries over.

    Images may be uint8 (as stored) or float32: uint8 ones are kept so and converted a batch
    at a time (`_floats`), for training and evaluation alike. Project decision (memory of a
    swarm process): float32 copies of a node's split and of the global test sample cost four
    times the bytes (~30 MB on Fashion-MNIST) for the whole life of every node process.
    Float input (e.g. `pretrain_embedder`'s) is used as given.

    ``global_memo``, shared by the learners that share ``global_test``, scores a model whose
    weights equal one already scored on it without running it again (`p2pmoe.eval.memo`).
    """

    def __init__(
        self,
        model: nn.Module,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        global_test: tuple[torch.Tensor, torch.Tensor] | None = None,
        batch_size: int = 64,
        lr: float = 0.05,
        momentum: float = 0.9,
        seed: int = 0,
        device: torch.device | str = "cpu",
        global_memo: ScoreMemo | None = None,
    ) -> None:
        if len(train[0]) == 0:
            raise ValueError("a learner needs at least one training example")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_x, self.train_y = train
        self.test_x, self.test_y = test
        self.global_test = global_test
        self.global_memo = global_memo
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.num_train_examples = len(self.train_y)
        self._shuffle = torch.Generator().manual_seed(seed)

    def train(self, epochs: int) -> dict[str, float]:
        optimiser = MomentumSGD(list(self.model.parameters()), lr=self.lr, momentum=self.momentum)
        self.model.train()
        total, batches = 0.0, 0
        for _ in range(epochs):
            for idx in shuffled_batches(self.num_train_examples, self.batch_size, self._shuffle):
                x, y = _floats(self.train_x[idx]).to(self.device), self.train_y[idx].to(self.device)
                loss = F.cross_entropy(self.model(x), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
                batches += 1
        return {"train_loss": total / max(batches, 1)}

    def hold_out(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove a seeded sample of `count` training examples from training for good and
        return them as float images and labels: a node's own validation data (FedMoE-DA's
        validated aggregation). At least one training example must remain."""
        if not 0 < count < self.num_train_examples:
            raise ValueError(f"cannot hold out {count} of {self.num_train_examples} training examples: at least one must stay for training")
        order = torch.randperm(self.num_train_examples, generator=torch.Generator().manual_seed(seed))
        held, kept = order[:count].sort().values, order[count:].sort().values
        out = (_floats(self.train_x[held]).to(self.device), self.train_y[held].to(self.device))
        self.train_x, self.train_y = self.train_x[kept], self.train_y[kept]
        self.num_train_examples = len(self.train_y)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Model weights and the shuffling RNG: enough to resume training exactly."""
        return {**{f"model.{k}": v for k, v in float_state(self.model).items()}, "rng": self._shuffle.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()` output; shapes are checked before anything changes."""
        load_float_state(self.model, {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
        self._shuffle.set_state(state["rng"])

    @torch.inference_mode()
    def _accuracy(self, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
        """Accuracy over `x` in batches of `batch`: 2,048 images at a time made the CNN's
        activations (~300 MB) a swarm process's largest allocation, and 256 at a time still
        made evaluation its peak (25-55 MB above training on Fashion-MNIST); 64, the training
        batch, adds nothing to it, is faster, and gave bit-identical logits (checked on the CPU)."""
        self.model.eval()
        preds = torch.cat([self.model(_floats(x[i : i + batch]).to(self.device)).argmax(dim=1).cpu() for i in range(0, len(x), batch)])
        return accuracy(preds, y)

    def evaluate(self) -> dict[str, float]:
        """Personalised accuracy (own test split) and, if given, accuracy on the global test set."""
        metrics = {"accuracy": self._accuracy(self.test_x, self.test_y)} if len(self.test_y) else {}
        if self.global_test is not None:
            score = functools.partial(self._accuracy, *self.global_test)
            metrics["global_accuracy"] = self.global_memo.score(self.model, score) if self.global_memo is not None else score()
        return metrics


class MomentumSGD:
    """``torch.optim.SGD(params, lr, momentum)``'s update through its functional form
    (`torch.optim.sgd.sgd`, public), not the class.

    Project decision (memory of a swarm process): constructing and stepping the class imports
    torch._dynamo, about 800 modules and ~70 MB of resident memory in every node process on
    torch 2.13, though a node never compiles anything. The functional form is the same code
    path the class calls, so the weights are bit-identical (tested); a parameter without a
    gradient is skipped and keeps its momentum, as the class does.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float) -> None:
        self.params, self.lr, self.momentum = params, lr, momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        buffers = [self.buffers[i] for i in live]
        grads = [self.params[i].grad for i in live]
        sgd(
            [self.params[i] for i in live],
            grads,  # type: ignore[arg-type]  # none is None: `live` filtered them
            buffers,
            weight_decay=0.0,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        for i, buffer in zip(live, buffers, strict=True):
            self.buffers[i] = buffer


def _floats(x: torch.Tensor) -> torch.Tensor:
    """A batch as float32: uint8 images converted by `float_images` itself, so every value is
    bit-identical to converting the whole set up front; any other tensor is returned as is."""
    return float_images(x.numpy()) if x.dtype == torch.uint8 else x
