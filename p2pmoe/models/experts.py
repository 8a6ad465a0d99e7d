"""Plain MLPs used as experts and towers.

Linear layers live in one ``nn.ModuleList`` called ``linears`` and activation and dropout are
applied functionally, so parameter names (``linears.<i>.weight``/``.bias``) depend only on the
layer sizes. Two peers whose experts differ only in dropout can therefore swap state dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "MLPExpert"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class MLP(nn.Module):
    """``d_in -> hidden[0] -> ... -> hidden[-1] [-> d_out]``.

    Every hidden layer is followed by the activation and dropout. With ``d_out`` the last layer
    is a plain linear map (logits, say); without it the output is the last hidden layer's
    activation, which is what MMoE experts feed to their towers.
    """

    def __init__(
        self,
        d_in: int,
        hidden: Sequence[int],
        d_out: int | None = None,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be in {sorted(_ACTIVATIONS)}, got {activation!r}")
        if not hidden and d_out is None:
            raise ValueError("an MLP needs at least one hidden layer or an output size")
        sizes = [d_in, *hidden] + ([d_out] if d_out is not None else [])
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.num_hidden = len(hidden)
        self.dropout = dropout
        self.activation = activation
        self.in_features = d_in
        self.out_features = sizes[-1]

    def forward(self, x: Tensor) -> Tensor:
        act = _ACTIVATIONS[self.activation]
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < self.num_hidden:
                x = act(x)
                if self.dropout > 0.0:
                    x = F.dropout(x, self.dropout, self.training)
        return x


class MLPExpert(MLP):
    """The FedMoE-DA expert head ``d_in -> hidden -> d_out`` (one hidden layer).

    Parameter names: ``linears.0.weight``, ``linears.0.bias``, ``linears.1.weight``,
    ``linears.1.bias``.
    """

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float = 0.0, activation: str = "relu") -> None:
        super().__init__(d_in, [hidden], d_out, dropout=dropout, activation=activation)
