"""Robust aggregation rules: tensor maths only, shared by the methods that aggregate what
peers send (issue 30). Each takes the round's states (name -> tensor, one per sender, in a
fixed order) and returns one state; none trusts any single sender's numbers.

- `median`: coordinate-wise median (Yin et al., ICML 2018).
- `trimmed_mean`: per coordinate, drop the ⌊βn⌋ largest and smallest values, average the rest
  (Yin et al. 2018).
- `krum` / multi-Krum: score each state by its squared distances to its n − f − 2 nearest
  others and average the m best scored (Blanchard et al., NeurIPS 2017; m = 1 is Krum).
- `centred_clip`: clip each state's difference from a centre (the current model) to norm τ
  and add the mean of the clipped differences to the centre (centred clipping, Karimireddy,
  He and Jaggi, ICML 2021, one iteration).
The robust rules weigh senders equally: an upload's example count is its sender's claim.
Callers refuse non-finite uploads before any rule sees them.
`parse_rule` reads the `--fedavg-aggregation` spelling of each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from p2pmoe.models.params import weighted_average

State = Mapping[str, torch.Tensor]
RULES = ("mean", "median", "trimmed", "krum", "clip")


@dataclass(frozen=True)
class Rule:
    """One aggregation rule and its parameter (β, f and m, or τ)."""

    name: str
    beta: float = 0.0
    f: int = 0
    m: int = 1
    tau: float = 0.0


def parse_rule(spec: str) -> Rule:
    """`mean`, `median`, `trimmed:BETA` (0 <= β < 0.5), `krum:F` or `krum:F:M` (multi-Krum),
    `clip:TAU` (τ > 0)."""
    name, *args = spec.split(":")
    try:
        if name in ("mean", "median") and not args:
            return Rule(name)
        if name == "trimmed" and len(args) == 1 and 0 <= float(args[0]) < 0.5:
            return Rule(name, beta=float(args[0]))
        if name == "krum" and 1 <= len(args) <= 2 and int(args[0]) >= 0 and (len(args) == 1 or int(args[1]) >= 1):
            return Rule(name, f=int(args[0]), m=int(args[1]) if len(args) == 2 else 1)
        if name == "clip" and len(args) == 1 and float(args[0]) > 0:
            return Rule(name, tau=float(args[0]))
    except ValueError:
        pass
    raise ValueError(f"aggregation must be mean, median, trimmed:BETA (0 <= BETA < 0.5), krum:F[:M] or clip:TAU (TAU > 0), got {spec!r}")


def _stacked(states: Sequence[State], name: str) -> torch.Tensor:
    return torch.stack([s[name].to(torch.float64) for s in states])


def median(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """The coordinate-wise median; of an even count, the mean of the two middle values."""
    out = {}
    for name, first in states[0].items():
        values = _stacked(states, name)
        out[name] = torch.quantile(values.reshape(len(states), -1), 0.5, dim=0).reshape(first.shape).to(first.dtype)
    return out


def trimmed_mean(states: Sequence[State], beta: float) -> dict[str, torch.Tensor]:
    """Per coordinate, the mean of the values left after dropping ⌊βn⌋ from each end."""
    cut = math.floor(beta * len(states))
    if len(states) - 2 * cut < 1:
        raise ValueError(f"trimming {cut} from each end of {len(states)} states leaves none")
    out = {}
    for name, first in states[0].items():
        ordered = _stacked(states, name).sort(dim=0).values
        out[name] = ordered[cut : len(states) - cut].mean(dim=0).to(first.dtype)
    return out


def _flat(state: State) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in state.values()])


def krum_choice(states: Sequence[State], f: int, m: int = 1) -> list[int]:
    """Indices of the m states with the lowest Krum scores (ties: the earlier sender)."""
    n = len(states)
    near = n - f - 2
    if near < 1:
        raise ValueError(f"Krum with f = {f} needs more than f + 2 = {f + 2} states, got {n}")
    flat = torch.stack([_flat(s) for s in states])
    distances = torch.cdist(flat, flat).pow(2)
    scores = [float(distances[i][torch.arange(n) != i].sort().values[:near].sum()) for i in range(n)]
    scores = [score if math.isfinite(score) else math.inf for score in scores]  # a NaN never sorts first
    return sorted(range(n), key=lambda i: (scores[i], i))[: min(m, n)]


def krum(states: Sequence[State], f: int, m: int = 1) -> dict[str, torch.Tensor]:
    """Krum (m = 1) or multi-Krum: the plain mean of the m best-scored states (a sender's
    example count is its own claim, so it weighs nothing here)."""
    chosen = krum_choice(states, f, m)
    return weighted_average([dict(states[i]) for i in chosen], [1] * len(chosen))


def clipped_difference(state: State, centre: State, tau: float) -> dict[str, torch.Tensor]:
    """state − centre in float64, scaled down to whole-state norm `tau` if it is longer: the
    step every clipping rule here (centred clipping, ClippedGossip, DP-FedAvg) bounds."""
    delta = {name: state[name].to(torch.float64) - centre[name].to(torch.float64) for name in centre}
    norm = math.sqrt(sum(float((d * d).sum()) for d in delta.values()))
    scale = min(1.0, tau / norm) if norm > 0 else 1.0
    return {name: scale * d for name, d in delta.items()}


def centred_clip(states: Sequence[State], centre: State, tau: float) -> dict[str, torch.Tensor]:
    """centre + Σ_i clip(s_i − centre, τ) / n: a sender moves the result by at most τ / n
    however far its numbers lie (equal weights: an example count is the sender's own claim,
    and weighting by it would let a liar claim all the weight)."""
    moved = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in centre.items()}
    for state in states:
        for name, d in clipped_difference(state, centre, tau).items():
            moved[name] += d / len(states)
    return {name: (centre[name].to(torch.float64) + moved[name]).to(centre[name].dtype) for name in centre}


def aggregate(rule: Rule, states: Sequence[State], counts: Sequence[int], centre: State) -> dict[str, torch.Tensor]:
    """`rule` applied to one round's states (`centre`: the current model, for clipping)."""
    if rule.name == "median":
        return median(states)
    if rule.name == "trimmed":
        return trimmed_mean(states, rule.beta)
    if rule.name == "krum":
        return krum(states, rule.f, rule.m)
    if rule.name == "clip":
        return centred_clip(states, centre, rule.tau)
    return weighted_average([dict(s) for s in states], counts)


def self_centred_mix(own: State, others: Sequence[tuple[State, float]], tau: float) -> dict[str, torch.Tensor]:
    """Self-centred clipping for gossip (ClippedGossip, He, Karimireddy and Jaggi 2022):
    own + Σ_j w_j clip(x_j − own, τ), with each neighbour's whole-state difference clipped to
    norm τ, so a neighbour moves this node by at most w_j τ per round whatever it sends."""
    mixed = {name: t.to(torch.float64).clone() for name, t in own.items()}
    for state, weight in others:
        for name, d in clipped_difference(state, own, tau).items():
            mixed[name] += weight * d
    return {name: mixed[name].to(own[name].dtype) for name in own}


def cap_source_share(weights: torch.Tensor, sources: Sequence[tuple[str, int]], own: str, cap: float) -> torch.Tensor:
    """FedMoE-DA's aggregation weights [E, M] with no peer holding more than `cap` of any own
    slot's row (summed over that peer's columns); what is cut goes to the slot's own expert
    (column e of row e: the first E columns are the node's own). A peer that every gate
    correlation picks (gate mimicry) still moves a slot by at most `cap` of the way."""
    capped = weights.clone()
    peers = sorted({node for node, _ in sources if node != own})
    for slot in range(capped.shape[0]):
        for peer in peers:
            columns = [c for c, (node, _) in enumerate(sources) if node == peer]
            share = float(capped[slot, columns].sum())
            if share > cap:
                capped[slot, columns] *= cap / share
                capped[slot, slot] += share - cap
    return capped
