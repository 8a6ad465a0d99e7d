"""Moving model weights in and out of named-tensor maps, and averaging them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from p2pmoe.wire.codec import ProtocolError, check_like


def float_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Floating-point entries of the state dict whose names start with `prefix`: detached copies
    on the CPU (what the codec and the methods' arithmetic take, wherever the model trains)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items() if name.startswith(prefix) and tensor.is_floating_point()}


def load_float_state(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `state` into the model after checking it matches the model's own names and shapes.

    Raises ProtocolError (and changes nothing) on any mismatch: the state may come from a peer.
    """
    own = {name: t for name, t in model.state_dict().items() if name.startswith(prefix) and t.is_floating_point()}
    check_like(state, own)
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def weighted_average(states: Sequence[dict[str, torch.Tensor]], weights: Iterable[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i · state_i with weights normalised to sum to 1."""
    weights = [float(w) for w in weights]
    if not states or len(weights) != len(states) or sum(weights) <= 0:
        raise ValueError("need one positive weight per state")
    total = sum(weights)
    keys = states[0].keys()
    if any(s.keys() != keys for s in states):
        raise ProtocolError("states to average hold different tensor names")
    return {
        name: sum((w / total * s[name].to(torch.float32) for w, s in zip(weights, states, strict=True)), torch.zeros((), dtype=torch.float32)).to(
            states[0][name].dtype
        )
        for name in keys
    }
